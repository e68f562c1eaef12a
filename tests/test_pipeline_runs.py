"""The pipeline's control flow: a stopped stage ends the run and resumes, the device reaches every
stage, and a bad recipe or override fails before any stage runs.

The end-to-end tests run `train.py pipeline` on the embedded tiny model (seconds); the rest replace
`_run_stage` with a recorder, so they check what the pipeline hands each stage without training.
"""
import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from r1train import pipeline
from r1train.run.config import ConfigError

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

STAGE_OPTIONS = {
    "data": {"source": "embedded", "num_train": 80, "num_eval": 2, "task": {"max_operands": 2, "max_value": 9}},
    "sft": {"max_seq_len": 256, "rows_per_step": 2, "rows_per_micro_batch": 1, "eval_max_new_tokens": 4},
    "optim": {"lr": 1.0e-3, "warmup_steps": 0, "schedule": "constant"},
    "train": {"max_steps": 3, "eval_every": 0, "save_every": 0, "progress": False},
}


def _recipe(out, **extra) -> dict:
    stages = [{"name": n, "command": "sft", "options": copy.deepcopy(STAGE_OPTIONS)} for n in ("s1", "s2")]
    return {"output_dir": str(out), "model": "embedded", "stages": stages, **extra}


def _write(tmp_path, recipe) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _pipeline(*args):
    return train_py("pipeline", *args, env=ENV)


def test_a_stopped_stage_ends_the_pipeline_and_the_same_command_resumes_it(tmp_path):
    out = tmp_path / "pipe"
    cmd = ["--recipe", _write(tmp_path, _recipe(out)), "--s1.train.stop_at_step", "1"]
    res = _pipeline(*cmd)
    # Exit status 0, as a stopped `train.py sft` has: stopping is asked for, not a failure.
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "stopped in stage s1 (sft) at step 1" in res.stdout
    assert (out / "s1" / "checkpoints" / "step-1").is_dir()
    assert not (out / "s1" / "stage.json").exists()  # not recorded as done
    assert not (out / "s1" / "final").exists()
    assert not (out / "s2").exists()  # the next stage never started
    assert not (out / "results.txt").exists() and not (out / "summary.json").exists()

    # The very same command: s1 resumes from step 1 (stop_at_step 1 is behind it), then s2 runs.
    again = _pipeline(*cmd)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[sft] resumed from" in again.stdout and "at step 1" in again.stdout
    assert "already done" not in again.stdout
    for s in ("s1", "s2"):
        assert json.loads((out / s / "stage.json").read_text())["stage"] == s
    s1_steps = [json.loads(l)["step"] for l in (out / "s1" / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(l)]
    assert s1_steps == [1, 2, 3]
    assert f"path: {out / 's1' / 'final'}" in again.stdout  # s2 started from s1's export
    assert (out / "results.txt").exists()


def test_a_bad_recipe_fails_through_train_py_before_anything_runs(tmp_path):
    out = tmp_path / "pipe"
    recipe = _recipe(out)
    recipe["stages"][1]["name"] = "s1"
    res = _pipeline("--recipe", _write(tmp_path, recipe))
    assert res.returncode == 2
    assert "duplicate stage name 's1'" in res.stderr
    assert not out.exists()


@pytest.fixture
def recorder(monkeypatch):
    """Replace the stages with a recorder of (name, options); `stop_at` names a stage that stops."""
    calls, state = [], {"stop_at": None}

    def fake(command, options):
        out = Path(options["train.output_dir"])
        out.mkdir(parents=True, exist_ok=True)  # as the trainers do
        name = out.name
        calls.append((name, options))
        if name == state["stop_at"]:
            return {"stopped": True, "step": 2}
        return {"final_loss": 1.0}

    monkeypatch.setattr(pipeline, "_run_stage", fake)
    return calls, state


def test_the_device_reaches_every_stage_unless_a_stage_sets_its_own(tmp_path, recorder, monkeypatch):
    calls, _ = recorder
    # The recipe check refuses a cuda stage where CUDA is missing; routing is what is tested here.
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    recipe = _recipe(tmp_path / "pipe")
    recipe["stages"].append({"name": "s3", "command": "sft", "options": copy.deepcopy(STAGE_OPTIONS)})
    recipe["stages"][1]["options"]["train"]["device"] = "cuda"  # this stage asks for its own
    pipeline.run_pipeline(recipe, {"device": "cpu", "s3.train.device": "auto"})
    assert [(n, o["train.device"]) for n, o in calls] == [("s1", "cpu"), ("s2", "cuda"), ("s3", "auto")]


def test_stage_options_without_a_device_leave_the_stage_default():
    stage = {"name": "s1", "command": "sft", "options": {"train": {"max_steps": 3}}}
    opts = pipeline.stage_options(stage, "prev/final", Path("out"), None, {"s1.train.max_steps": "5"})
    assert "train.device" not in opts
    assert opts["train.max_steps"] == "5" and opts["model.path"] == "prev/final"
    assert opts["train.output_dir"] == str(Path("out") / "s1")
    assert pipeline.stage_options(stage, "p", Path("out"), "cpu", {})["train.device"] == "cpu"


def test_a_stopped_stage_is_not_recorded_and_runs_again(tmp_path, recorder):
    calls, state = recorder
    out = tmp_path / "pipe"
    state["stop_at"] = "s1"
    rows = pipeline.run_pipeline(_recipe(out), {})
    assert rows == [{"stage": "s1", "command": "sft", "stopped": True, "step": 2}]
    assert [n for n, _ in calls] == ["s1"] and not (out / "s1" / "stage.json").exists()
    state["stop_at"] = None
    rows = pipeline.run_pipeline(_recipe(out), {})
    assert [n for n, _ in calls] == ["s1", "s1", "s2"] and [r["stage"] for r in rows] == ["s1", "s2"]
    assert calls[2][1]["model.path"] == str(out / "s1" / "final")
    assert "stopped" not in json.loads((out / "s1" / "stage.json").read_text())


def _unknown_command(r):
    r["stages"][1]["command"] = "sfT"


def _bad_option_in_stage_2(r):
    r["stages"][1]["options"]["sft"]["max_seq_len"] = 4


def _typo_in_stage_2(r):
    r["stages"][1]["options"]["train"]["max_step"] = 4


def _duplicate(r):
    r["stages"][1]["name"] = "s1"


@pytest.mark.parametrize("edit, overrides, message", [
    (None, {"train.max_steps": "1"}, "unknown option --train.max_steps: a stage option is "
                                     "--<stage>.<section>.<field> with <stage> one of s1, s2"),
    (None, {"S1.train.max_steps": "1"}, "unknown option --S1.train.max_steps"),
    (None, {"s1.train.max_step": "1"}, "stage s1 (sft): unknown option --train.max_step"),
    (None, {"s2.train.output_dir": "x"}, "stage s2: train.output_dir is set by the pipeline"),
    (None, {"device": "gpu"}, "--device='gpu': must be one of auto, cpu, cuda"),
    (_duplicate, {}, "duplicate stage name 's1'"),
    (_unknown_command, {}, "unknown command 'sfT'"),
    (_bad_option_in_stage_2, {}, "stage s2 (sft): --sft.max_seq_len=4: must be >= 8"),
    (_typo_in_stage_2, {}, "stage s2 (sft): unknown option --train.max_step"),
])
def test_a_bad_recipe_or_override_fails_before_any_stage_runs(tmp_path, recorder, edit, overrides, message):
    calls, _ = recorder
    recipe = _recipe(tmp_path / "pipe")
    if edit:
        edit(recipe)
    with pytest.raises(ConfigError) as e:
        pipeline.run_pipeline(recipe, overrides)
    assert message in str(e.value)
    assert calls == [] and not (tmp_path / "pipe").exists()


@pytest.mark.parametrize("argv, recipe, overrides", [
    (["--recipe", "r.yaml", "--s1.train.wandb"], "r.yaml", {"s1.train.wandb": "true"}),
    (["--s1.train.wandb", "--recipe", "r.yaml"], "r.yaml", {"s1.train.wandb": "true"}),
    (["--s1.train.wandb=false", "--recipe=r.yaml", "--s1.optim.lr", "-1"], "r.yaml",
     {"s1.train.wandb": "false", "s1.optim.lr": "-1"}),
])
def test_bare_flags_mean_true_as_for_every_command(argv, recipe, overrides):
    assert pipeline.parse_pipeline_args(argv) == (recipe, overrides)


def test_recipe_needs_a_value():
    with pytest.raises(ConfigError, match="--recipe needs a file"):
        pipeline.parse_pipeline_args(["--s1.train.wandb", "--recipe"])


# ---------------------------------------------------------------- the report's files
def test_the_report_replaces_only_its_own_files_and_refuses_a_users(tmp_path, recorder):
    """summary.json, results.txt and curves.png sit at the top of the output folder: the
    pipeline replaces them only while its manifest lists them unchanged; a user's file of
    those names is refused (before any stage runs, and again by the report itself)."""
    from r1train.pipeline.report import finish_report
    from r1train.run.folder import read_manifest
    calls, _ = recorder
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "results.txt").write_text("my results\n")
    with pytest.raises(ConfigError, match=rf"{out} holds results\.txt, which this pipeline did not write "
                                          r"\(not in its manifest\.json\).*Move it out of"):
        pipeline.run_pipeline(_recipe(out), {})
    assert calls == [] and (out / "results.txt").read_text() == "my results\n"  # no stage ran
    assert not (out / "summary.json").exists()

    (out / "results.txt").unlink()
    rows = pipeline.run_pipeline(_recipe(out), {})
    assert sorted(read_manifest(out)) == ["summary.json"]
    finish_report(_recipe(out), {"device": "cpu"}, rows)
    assert sorted(read_manifest(out)) == ["results.txt", "summary.json"]
    pipeline.run_pipeline(_recipe(out), {})  # stages done: the report is the pipeline's to replace
    finish_report(_recipe(out), {"device": "cpu"}, rows)
    assert "s2" in (out / "results.txt").read_text()

    # Edited by hand after the run: the user's now. A planted curves.png is refused by the
    # report itself too (it appeared while the stages ran, after the check at the start).
    (out / "summary.json").write_text('{"my": "notes"}')
    with pytest.raises(ConfigError, match=r"holds summary\.json, which this pipeline did not write \(changed"):
        pipeline.run_pipeline(_recipe(out), {})
    assert (out / "summary.json").read_text() == '{"my": "notes"}'
    os.replace(out / "summary.json", tmp_path / "notes.json")  # the user moves theirs out
    (out / "curves.png").write_bytes(b"my plot")
    with pytest.raises(ConfigError, match=r"holds curves\.png"):
        finish_report(_recipe(out), {"device": "cpu"}, rows)
    assert (out / "curves.png").read_bytes() == b"my plot"
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "manifest.json", "results.txt", "s1",
                                                     "s2"]  # no temporary file left


def test_a_manifest_json_the_pipeline_did_not_write_is_refused(tmp_path, recorder):
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "manifest.json").write_text('{"mine": true}')
    with pytest.raises(ConfigError, match=r"holds manifest\.json, which this pipeline did not write"):
        pipeline.run_pipeline(_recipe(out), {})
    assert (out / "manifest.json").read_text() == '{"mine": true}'


@pytest.mark.parametrize("where, what", [
    ("..", "a folder above the working directory"), (".", "the working directory"),
    ("{recipes}", "the folder of the recipe .*r.yaml"), ("{above}", "a folder above the folder of the recipe"),
])
def test_an_output_dir_holding_the_working_directory_or_the_recipe_is_refused(tmp_path, monkeypatch, recorder,
                                                                               where, what):
    """A recipe's `output_dir: ..` wrote the stage folders and the report next to the checkout."""
    calls, _ = recorder
    work, recipes = tmp_path / "work", tmp_path / "recipes" / "exp"
    work.mkdir()
    recipes.mkdir(parents=True)
    monkeypatch.chdir(work)
    recipe = _recipe(where.format(recipes=recipes, above=recipes.parent))
    path = recipes / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=rf"--output_dir='.*' \(or the recipe's output_dir\) is {what}"):
        pipeline.main(["--recipe", str(path)])
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["recipes", "work"]
    assert list(work.iterdir()) == [] and [p.name for p in recipes.iterdir()] == ["r.yaml"]
    recipe["output_dir"] = "runs/pipe"  # a folder of its own, below the working directory: fine
    pipeline.run_pipeline(recipe, {}, recipe_path=path)
    assert [n for n, _ in calls] == ["s1", "s2"] and (work / "runs" / "pipe" / "summary.json").exists()
