"""One import package (`r1train`) that collides with nothing a user has installed, and what the
move into it must not break: the commands from any folder, a GRPO step with Hugging Face's
`kernels` package installed (transformers 5.25 imports it; the project's old top-level `kernels/`
answered instead), checkpoints and reward references written before the move."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "r1-from-scratch"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def project_import_names() -> set[str]:
    """Every top-level name the project makes importable: the packages at the repository's root
    (the first entry of sys.path when train.py or pytest runs from there) and, when installed,
    what its distribution declares."""
    names = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    try:
        names |= set(importlib.metadata.distribution(DISTRIBUTION).read_text("top_level.txt").split())
    except importlib.metadata.PackageNotFoundError:
        pass
    return names


def collisions(names) -> dict[str, list[str]]:
    """{name: other distributions that install a top-level package or module of that name}."""
    owners = importlib.metadata.packages_distributions()
    found = {n: sorted(set(owners.get(n, [])) - {DISTRIBUTION}) for n in names}
    return {n: d for n, d in found.items() if d}


def test_the_project_is_one_package_that_no_other_installed_distribution_names():
    assert project_import_names() == {"r1train"}
    assert not collisions(project_import_names())


def test_the_collision_check_sees_a_collision():
    # A control: a name an installed distribution owns (PyYAML's `yaml`; Hugging Face's `kernels`,
    # the name of this project's old top-level kernels/) is reported with its owner.
    assert collisions({"yaml", "r1train"}) == {"yaml": ["PyYAML"]}
    assert collisions({"kernels"}) == {"kernels": ["kernels"]}


def test_a_grpo_step_runs_with_hugging_face_kernels_installed(tmp_path):
    # The environment transformers >= 5.25 makes for every user: the `kernels` distribution
    # installed. Run from the repository root, where the old top-level kernels/ shadowed it.
    spec = importlib.util.find_spec("kernels")
    assert spec is not None, "Hugging Face's kernels package is missing: pip install -e '.[test]' installs it"
    # Not a folder of this repository (a virtual environment inside the checkout is fine).
    assert Path(spec.origin).resolve().parent != ROOT / "kernels", spec.origin
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "train.py", "grpo", "--model.embedded_size", "small",
                          "--rollout.max_new_tokens", "16", "--rollout.group_size", "2",
                          "--grpo.prompts_per_step", "2", "--grpo.micro_batch_size", "4", "--train.max_steps", "1",
                          "--train.eval_every", "0",
                          "--data.num_eval", "2", "--train.export", "false", "--train.progress", "false",
                          "--train.output_dir", str(out)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]


@pytest.mark.parametrize("how", ["python -m r1train", "r1-train", "train.py by path"])
def test_the_commands_run_from_another_folder(tmp_path, how):
    if how == "r1-train":
        exe = shutil.which("r1-train")
        if exe is None:
            pytest.skip("r1-train is on PATH only after pip install -e .")
        cmd = [exe]
    else:
        cmd = ([sys.executable, "-m", "r1train"] if how.startswith("python -m") else
               [sys.executable, str(ROOT / "train.py")])
    res = subprocess.run([*cmd, "sft", "--help"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("usage: [torchrun --nproc_per_node=N] train.py sft ")


# The run of tests/assets/pre-package-run/, written by the code before the move (commit bf8da5c,
# transformers 5.24): checkpoints/step-2 of a 2-step run with these options, and the metrics of
# the same run uninterrupted to step 3.
PRE_PACKAGE_OPTIONS = ["--model.embedded_size", "small", "--rollout.max_new_tokens", "24",
                       "--rollout.group_size", "4", "--grpo.prompts_per_step", "4", "--grpo.micro_batch_size", "8",
                       "--grpo.rewards", "repetition_penalty,cosine,format", "--optim.lr", "1e-3",
                       "--optim.warmup_steps", "1", "--train.eval_every", "0", "--data.num_eval", "4",
                       "--train.export", "false", "--train.progress", "false"]


def test_a_checkpoint_written_before_the_move_resumes_as_the_old_code_went_on(tmp_path):
    asset = ROOT / "tests" / "assets" / "pre-package-run"
    out = tmp_path / "run"
    shutil.copytree(asset, out, ignore=shutil.ignore_patterns("uninterrupted_metrics.jsonl"))
    res = train_py("grpo", *PRE_PACKAGE_OPTIONS, "--train.max_steps", "3", "--train.save_every", "0",
                   "--train.output_dir", out, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "at step 2" in res.stdout, res.stdout[-2000:]
    step = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    old = {r["step"]: r for r in map(json.loads, (asset / "uninterrupted_metrics.jsonl").read_text().splitlines())
           if "loss" in r}
    assert sorted(step) == [1, 2, 3]
    # Step 3 depends on the restored weights and AdamW moments: the KL to the reference and the
    # gradient norm move with either, and a fresh optimizer would give another step.
    for key in ("loss", "kl", "grad_norm", "reward", "completion_length/mean"):
        assert math.isclose(step[3][key], old[3][key], rel_tol=1e-4, abs_tol=1e-7), (key, step[3], old[3])
    assert old[3]["kl"] > 0 and old[3]["grad_norm"] > 0


def test_a_reward_named_by_its_module_path_before_the_move_gets_its_new_name(tmp_path):
    # A config written before the move (a resumed run's, a recipe) may name a reward by the
    # project's old module path; the refusal is one line that says what to write instead.
    res = train_py("grpo", "--grpo.rewards", "accuracy,rewards.format:format_reward", "--train.max_steps", "1",
                   "--train.output_dir", tmp_path / "run", env=ENV)
    assert res.returncode == 2
    line = res.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, res.stderr
    assert "'r1train.rewards.format:format_reward'" in line, line


def test_the_readmes_python_examples_run_from_another_folder(tmp_path):
    # What a user pastes after `pip install -e .`: no sys.path edits, run wherever they are.
    blocks = (ROOT / "README.md").read_text().split("```python\n")[1:]
    assert blocks, "the README has no Python example"
    for i, block in enumerate(blocks):
        code = block.split("```", 1)[0]
        res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, f"README Python example {i + 1}:\n{code}\n{res.stderr[-3000:]}"
