"""The R1 pipeline: stages run in order, each stage's exported model feeding the next.

    torchrun --nproc_per_node=2 train.py pipeline --recipe configs/tiny-r1.yaml
    python train.py                      # the same, with the embedded tiny recipe

A recipe names an output folder and a list of stages; each stage is a command (sft, grpo,
rejection-sample, distill) with its own options. A stage writes into <output_dir>/<name>/ and
is skipped on a re-run once its `stage.json` exists (written last, atomically, and only when the
stage finished) and records the same options as this run resolves for it (a stage.json written
by hand, recording none, marks a stage done as it is). A finished stage whose options changed
is not skipped silently: the run refuses, listing the changes, or with
`--rerun_changed` runs that stage and every later one again (their old folders are kept as
<name>.replaced-<time>), since later stages start from its output.

A stage that stops early (Ctrl-C, SIGTERM, `--<stage>.train.stop_at_step N`) saves a checkpoint
and ends the pipeline there, with exit status 0, no `stage.json` and no later stage started.
Running the same command again resumes that stage from its checkpoint and goes on.

Within a stage's options, `{prev}` is the previous stage's exported model and `{out}` the
pipeline's output folder; a stage without `model.path` starts from `{prev}` (or from the
recipe's `model` for the first stage).

Options (`--key value`, `--key=value`, or a bare `--flag` for true, as for every command):
  --recipe FILE                          the recipe (YAML, TOML or JSON)
  --output_dir DIR                       overrides the recipe's `output_dir`
  --device auto|cpu|cuda                 overrides the recipe's `device`; every stage that does
                                         not set its own `train.device` runs on it
  --<stage>.<section>.<field> VALUE      one stage's option, e.g. --grpo.train.max_steps 50
  --rerun_changed                        run again the finished stages whose options changed,
                                         and every stage after the first of them

The whole recipe is checked before any stage runs: stage names are unique, commands known,
every stage's options parse and validate with its command's config (no model is loaded), and
every `--<stage>....` override names a stage of the recipe.

The output folder is the pipeline's own: it may not be the working directory, the recipe's
folder, or a folder above either (`..`, `.`, `~`), where its stage folders and report would mix
with the user's files, the recipe among them. At its top the pipeline writes `summary.json`,
`results.txt` and `curves.png`, listed in its `manifest.json`; a file of those names that it did
not write is refused before any stage runs (pipeline/report.py).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from r1train.pipeline.report import REPORT_FILES, owned_report, write_report
from r1train.run.config import ConfigError, load_recipe, parse_args, split_argv
from r1train.run.dist import barrier, init_distributed
from r1train.run.folder import MANIFEST, lock_folder, on_main
from r1train.run.logging import finite_or_none
from r1train.run.resume import flatten

COMMANDS = ("sft", "grpo", "rejection-sample", "distill")
RECIPE_KEYS = ("output_dir", "model", "device", "stages")
PIPELINE_OPTIONS = ("output_dir", "device", "rerun_changed")  # and --recipe, --<stage>.<section>.<field>
# Options that change how a stage is watched or where it runs, not what it computes: a re-run
# with other values still counts a finished stage as done.
UNRECORDED = ("train.progress", "train.log_every", "train.wandb", "train.wandb_project",
              "train.device", "train.fsdp", "train.resume")
DEVICES = ("auto", "cpu", "cuda")


def command_entry(command: str):
    """(config class, entry point) of a command (train.py's too); imported late: they pull in
    the trainers."""
    if command == "grpo":
        from r1train.grpo.config import GRPOJobConfig as cls
        from r1train.grpo.trainer import main
    elif command == "sft":
        from r1train.sft.trainer import SFTJobConfig as cls
        from r1train.sft.trainer import main
    elif command == "rejection-sample":
        from r1train.sft.rejection import RejectionJobConfig as cls
        from r1train.sft.rejection import main
    elif command == "distill":
        from r1train.sft.distill import DistillJobConfig as cls
        from r1train.sft.distill import main
    else:
        raise ConfigError(f"unknown command {command!r}; expected one of: {', '.join(COMMANDS)}, "
                          f"pipeline (or none for the tiny pipeline)")
    return cls, main


def _argv(options: dict) -> list[str]:
    """A stage's options as the command line its command parses (lists comma-separated)."""
    argv = []
    for k, v in options.items():
        if v is None:  # str(None) would arrive as the text "None"
            raise ConfigError(f"--{k}: null in the recipe; give it a value or leave it out")
        if isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        argv += [f"--{k}", str(v)]
    return argv


def _subst(value, prev: str, out: str):
    if isinstance(value, str):
        return value.replace("{prev}", prev).replace("{out}", out)
    return value


def _device(recipe: dict, overrides: dict) -> str | None:
    """The pipeline's device when one was given (command line over recipe), else None."""
    device = overrides.get("device", recipe.get("device"))
    if device is not None and device not in DEVICES:
        raise ConfigError(f"--device={device!r}: must be one of {', '.join(DEVICES)}")
    return device


def stage_options(stage: dict, prev: str, out: Path, device: str | None, overrides: dict) -> dict:
    """The flat `section.field -> value` options one stage runs with, lowest precedence first:
    the recipe's options ({prev} and {out} substituted), `model.path` = prev when unset, the
    pipeline's device when the stage sets no `train.device`, then `--<stage>.x` overrides.
    `train.output_dir` is always <out>/<name>: the pipeline finds stage.json and exports there."""
    name = stage["name"]
    opts = {k: _subst(v, prev, str(out)) for k, v in flatten(stage.get("options") or {}).items()}
    opts.setdefault("model.path", prev)
    if device is not None:
        # Without this the stages would pick "auto" (CUDA when present) whatever --device said.
        opts.setdefault("train.device", device)
    for k, v in overrides.items():
        if k.startswith(f"{name}."):
            opts[k[len(name) + 1:]] = v
    opts["train.output_dir"] = str(out / name)
    return opts


def output_folder(recipe: dict, overrides: dict) -> Path:
    """The pipeline's output folder: --output_dir, else the recipe's, else runs/pipeline."""
    return Path(overrides.get("output_dir", recipe.get("output_dir", "runs/pipeline")))


def check_output_folder(out: Path, recipe_path: str | os.PathLike | None = None) -> None:
    """Refuse an output folder that is the working directory, the recipe's folder, or above
    either: the stages' folders and the report would land among the user's files (a recipe's
    `output_dir: ..` put them next to the checkout), and `rm -r` of the run would take those."""
    where = Path(out).resolve()
    homes = [("the working directory", Path.cwd().resolve())]
    if recipe_path is not None:
        homes.append((f"the folder of the recipe {recipe_path}", Path(recipe_path).resolve().parent))
    for what, home in homes:
        if where == home or where in home.parents:
            which = f"{what} ({home})" if where == home else f"a folder above {what} ({home})"
            raise ConfigError(f"--output_dir={str(out)!r} (or the recipe's output_dir) is {which}; the "
                              f"pipeline needs a folder of its own for its stage folders and report. Name "
                              f"a new folder, e.g. runs/<name>")


def check_recipe(recipe: dict, overrides: dict, world_size: int = 1,
                 recipe_path: str | os.PathLike | None = None) -> list[dict]:
    """Fail before anything runs, naming the problem; return the stages.

    Checks the recipe's keys, the output folder (`check_output_folder`), the stages' names and
    commands, that every override names a stage (or is a pipeline option), and that each stage's
    options parse and validate with its command's config as they will be run. `{prev}` stands
    for the previous stage's export here: only its type matters to the check."""
    unknown = [k for k in recipe if k not in RECIPE_KEYS]
    if unknown:
        raise ConfigError(f"recipe: unknown key(s) {unknown}; a recipe has {', '.join(RECIPE_KEYS)}")
    device = _device(recipe, overrides)
    out = output_folder(recipe, overrides)
    check_output_folder(out, recipe_path)
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError("recipe: 'stages' must be a non-empty list of {name, command, options}")
    names = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise ConfigError(f"recipe stage {i}: expected a mapping {{name, command, options}}, got {stage!r}")
        name, command = stage.get("name"), stage.get("command")
        if not isinstance(name, str) or not name or "." in name or "/" in name:
            # A dot would make `--<stage>.<section>.<field>` ambiguous; a slash, a nested folder.
            raise ConfigError(f"recipe stage {i}: needs a name without '.' or '/', got name={name!r}")
        if name in (*REPORT_FILES, MANIFEST):
            raise ConfigError(f"recipe stage {i}: the name {name!r} is taken by the pipeline's report; "
                              f"name the stage otherwise")
        if name in names:
            raise ConfigError(f"recipe stage {i}: duplicate stage name {name!r} (stage {names.index(name)} "
                              f"has it too); names must be unique, each stage writes <output_dir>/<name>/")
        if command not in COMMANDS:
            raise ConfigError(f"recipe stage {name!r}: unknown command {command!r}; expected one of "
                              f"{', '.join(COMMANDS)}")
        if not isinstance(stage.get("options") or {}, dict):
            raise ConfigError(f"recipe stage {name!r}: 'options' must be a mapping of sections")
        extra = [k for k in stage if k not in ("name", "command", "options")]
        if extra:
            raise ConfigError(f"recipe stage {name!r}: unknown key(s) {extra}; a stage has name, command, options")
        names.append(name)
    for key in overrides:
        stage_name, dot, rest = key.partition(".")
        if key in PIPELINE_OPTIONS or (dot and rest and stage_name in names):
            continue
        raise ConfigError(f"unknown option --{key}: a stage option is --<stage>.<section>.<field> with "
                          f"<stage> one of {', '.join(names)}; pipeline options are --recipe, "
                          + ", ".join(f"--{o}" for o in PIPELINE_OPTIONS))
    prev = str(recipe.get("model", "embedded"))
    for stage in stages:
        name = stage["name"]
        if ("train.output_dir" in flatten(stage.get("options") or {})
                or f"{name}.train.output_dir" in overrides):
            raise ConfigError(f"stage {name}: train.output_dir is set by the pipeline to <output_dir>/{name}; "
                              f"set the pipeline's output_dir instead")
        cls, _ = command_entry(stage["command"])
        try:
            cfg = parse_args(cls, _argv(stage_options(stage, prev, out, device, overrides)))
            cfg.validate(world_size)
        except ConfigError as e:
            raise ConfigError(f"stage {name} ({stage['command']}): {e}") from None
        prev = str(out / name / "final")
    return stages


def resolved_options(command: str, options: dict | None) -> dict:
    """The flat resolved config a stage runs with (defaults filled in), minus `UNRECORDED`;
    `options` None: the command's defaults (unchecked: distill's defaults do not validate)."""
    from r1train.run.config import to_dict
    cls, _ = command_entry(command)
    flat = flatten(to_dict(cls() if options is None else parse_args(cls, _argv(options))))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in flat.items() if k not in UNRECORDED}


def _changes(recorded: dict | None, now: dict, command: str = "") -> list[str]:
    if recorded is None:  # a stage.json written by hand (a model brought in as that stage's)
        return []
    keys = sorted(set(recorded) | set(now))
    # An option added since the stage ran (absent from its record) at its default is no change.
    defaults = resolved_options(command, None) if command else {}
    return [f"--{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in keys if recorded.get(k) != now.get(k)
            and (k in recorded or now.get(k) != defaults.get(k))]


def _rerun_flag(overrides: dict) -> bool:
    value = str(overrides.get("rerun_changed", "false")).lower()
    if value not in ("true", "false", "1", "0"):
        raise ConfigError(f"--rerun_changed={value!r}: expected true or false")
    return value in ("true", "1")


def run_pipeline(recipe: dict, overrides: dict, recipe_path: str | os.PathLike | None = None) -> list[dict]:
    """Run the stages not yet done; one row per stage. When a stage stops early the last row is
    {"stage", "command", "stopped": True, "step"} and no later stage has run."""
    device = _device(recipe, overrides)
    info = init_distributed(device or "auto")
    stages = check_recipe(recipe, overrides, info.world_size, recipe_path)
    out = output_folder(recipe, overrides)
    # The report rewrites its files at the end: a foreign one is refused now, not after hours.
    on_main(info, lambda: owned_report(out))
    prev = str(recipe.get("model", "embedded"))
    rerun = _rerun_flag(overrides)
    rows = []
    t_start = time.time()
    rerunning = False  # a stage before this one ran again: this one starts from a new model
    for i, stage in enumerate(stages):
        name, command = stage["name"], stage["command"]
        stage_dir = out / name
        done = stage_dir / "stage.json"
        opts = stage_options(stage, prev, out, device, overrides)
        options = resolved_options(command, opts)
        result = json.loads(done.read_text()) if done.exists() else None
        if result is not None and not rerunning:
            changes = _changes(result.get("options"), options, command)
            if changes and not rerun:
                raise ConfigError(
                    f"stage {name} finished with other options than this run gives it: "
                    f"{'; '.join(changes[:8])}{' ...' if len(changes) > 8 else ''}. Pass "
                    f"--rerun_changed to run it and the stages after it again (the old folders "
                    f"are kept), or go back to the options it ran with")
            rerunning = bool(changes)
        if result is not None and rerunning:
            if info.is_main:  # kept, not deleted: it is the user's earlier result
                aside = stage_dir.with_name(f"{name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(stage_dir, aside)
                print(f"[pipeline] stage {name}: options changed, running it again "
                      f"(the earlier run is in {aside})", flush=True)
            barrier()
            result = None
        if result is not None:
            if info.is_main:
                unrecorded = "" if "options" in result else " (its stage.json records no options to compare)"
                print(f"[pipeline] stage {name}: already done, skipping{unrecorded}", flush=True)
        else:
            rerunning = True  # the stages after this one must start from its new output
            if info.is_main:
                print(f"\n[pipeline] ===== stage {i + 1}/{len(stages)}: {name} ({command}) =====", flush=True)
            t0 = time.time()
            result = _run_stage(command, opts)
            if result.get("stopped"):
                # Its checkpoint is saved (save_and_stop saves before stopping) but there is no
                # export: record nothing, so that the next run resumes this stage.
                step = result.get("step")
                if info.is_main:
                    print(f"\n[pipeline] stopped in stage {name} ({command}) at step {step}; its checkpoint "
                          f"is in {stage_dir}, later stages did not run. Run the same command again to "
                          f"resume {name} from its checkpoint and go on.", flush=True)
                rows.append({"stage": name, "command": command, "stopped": True, "step": step})
                return rows
            result = {k: v for k, v in result.items() if isinstance(v, (int, float, str, list, dict))}
            result.update(stage=name, command=command, wall_time_s=time.time() - t0, options=options)
            # A training stage hands on its export; rejection sampling hands on the model it used.
            result.setdefault("model", str(stage_dir / "final"))
            if info.is_main:
                tmp = done.with_suffix(".tmp")
                tmp.write_text(json.dumps(finite_or_none(result), indent=1, allow_nan=False))
                os.replace(tmp, done)
            barrier()
        rows.append(result)
        prev = result.get("model", str(stage_dir / "final"))
    if info.is_main:
        summary = {"stages": rows, "total_wall_time_s": time.time() - t_start}
        write_report(out, {"summary.json": json.dumps(finite_or_none(summary), indent=1, allow_nan=False).encode()})
    return rows


def _run_stage(command: str, options: dict) -> dict:
    _, main = command_entry(command)
    return main(_argv(options)) or {}


def parse_pipeline_args(argv: list[str]) -> tuple[str | None, dict]:
    """(recipe path, {key: value}), read by the commands' rule (`run.config.split_argv`)."""
    recipe_path, pairs = split_argv(argv, lambda: __doc__, "--<stage>.<section>.<field> value")
    return recipe_path, dict(pairs)


def main(argv: list[str]) -> list[dict]:
    recipe_path, overrides = parse_pipeline_args(argv)
    if recipe_path is None:
        raise ConfigError("pipeline needs --recipe FILE (see configs/)")
    recipe = load_recipe(recipe_path)
    info = init_distributed(_device(recipe, overrides) or "auto")
    out = output_folder(recipe, overrides)
    check_recipe(recipe, overrides, info.world_size, recipe_path)  # before the lock creates the folder
    # The pipeline's own folder is locked for its whole run (each stage also locks its folder).
    with lock_folder(out, info, "pipeline", "--output_dir"):
        rows = run_pipeline(recipe, overrides, recipe_path)
        if rows and rows[-1].get("stopped"):
            return rows  # no report on a partial run; the next run writes it
        from r1train.pipeline.report import finish_report
        finish_report(recipe, overrides, rows)
    return rows
