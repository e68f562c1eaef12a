"""The R1 pipeline: stages run in order, each stage's exported model feeding the next.

    torchrun --nproc_per_node=2 train.py pipeline --recipe configs/tiny-r1.yaml
    python train.py                      # the same, with the embedded tiny recipe

A recipe names an output folder and a list of stages; each stage is a command (sft, grpo,
rejection-sample, distill) with its own options. A stage writes into <output_dir>/<name>/ and
is skipped on a re-run once its `stage.json` exists (written last, atomically), so an interrupted
pipeline resumes at the stage it was in (and that stage resumes from its own checkpoints).

Within a stage's options, `{prev}` is the previous stage's exported model and `{out}` the
pipeline's output folder; a stage without `model.path` starts from `{prev}` (or from the
recipe's `model` for the first stage).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from infra.config import ConfigError, load_recipe
from infra.dist import barrier, init_distributed

COMMANDS = ("sft", "grpo", "rejection-sample", "distill")


def _run_stage(command: str, options: dict) -> dict:
    argv = []
    for k, v in options.items():
        if isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        argv += [f"--{k}", str(v)]
    if command == "grpo":
        from grpo.trainer import main
    elif command == "sft":
        from sft.trainer import main
    elif command == "rejection-sample":
        from sft.rejection import main
    else:
        from sft.distill import main
    return main(argv) or {}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _subst(value, prev: str, out: str):
    if isinstance(value, str):
        return value.replace("{prev}", prev).replace("{out}", out)
    return value


def run_pipeline(recipe: dict, overrides: dict) -> list[dict]:
    info = init_distributed(overrides.get("device", recipe.get("device", "auto")))
    out = Path(overrides.get("output_dir", recipe.get("output_dir", "runs/pipeline")))
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError("recipe: 'stages' must be a non-empty list of {name, command, options}")
    prev = str(recipe.get("model", "embedded"))
    rows = []
    t_start = time.time()
    for i, stage in enumerate(stages):
        name, command = stage.get("name"), stage.get("command")
        if not name or command not in COMMANDS:
            raise ConfigError(f"recipe stage {i}: needs a name and a command in {COMMANDS}, got "
                              f"name={name!r} command={command!r}")
        stage_dir = out / name
        done = stage_dir / "stage.json"
        if done.exists():
            result = json.loads(done.read_text())
            if info.is_main:
                print(f"[pipeline] stage {name}: already done, skipping", flush=True)
        else:
            opts = {k: _subst(v, prev, str(out)) for k, v in _flatten(stage.get("options", {})).items()}
            opts.setdefault("model.path", prev)
            opts["train.output_dir"] = str(stage_dir)
            for k, v in overrides.items():
                if k.startswith(f"{name}."):
                    opts[k[len(name) + 1:]] = v
            if info.is_main:
                print(f"\n[pipeline] ===== stage {i + 1}/{len(stages)}: {name} ({command}) =====", flush=True)
            t0 = time.time()
            result = _run_stage(command, opts)
            result = {k: v for k, v in result.items() if isinstance(v, (int, float, str, list, dict))}
            result.update(stage=name, command=command, wall_time_s=time.time() - t0)
            # A training stage hands on its export; rejection sampling hands on the model it used.
            result.setdefault("model", str(stage_dir / "final"))
            if info.is_main:
                tmp = done.with_suffix(".tmp")
                tmp.write_text(json.dumps(result, indent=1))
                os.replace(tmp, done)
            barrier()
        rows.append(result)
        prev = result.get("model", str(stage_dir / "final"))
    if info.is_main:
        summary = {"stages": rows, "total_wall_time_s": time.time() - t_start}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return rows


def main(argv: list[str]) -> list[dict]:
    recipe_path, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        key, eq, val = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}")
        if not eq:
            i += 1
            if i >= len(argv):
                raise ConfigError(f"option --{key} needs a value")
            val = argv[i]
        if key == "recipe":
            recipe_path = val
        else:
            overrides[key] = val
        i += 1
    if recipe_path is None:
        raise ConfigError("pipeline needs --recipe FILE (see configs/)")
    recipe = load_recipe(recipe_path)
    rows = run_pipeline(recipe, overrides)
    from infra.report import finish_report
    finish_report(recipe, overrides, rows)
    return rows
