"""The run inspector: per-token records (tokens.jsonl) hold what the loss computed, are cut back on
resume like the other logs, and `train.py inspect` turns a run into one page that works in a real
browser (headless Chromium, driven by playwright; skipped where neither is installed)."""
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from r1train.data.tiny import build_tiny_model
from r1train.inspector.page import MAX_RECORD_BYTES, page_data, write_page

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
SFT = ["sft", "--sft.rows_per_step", "2", "--sft.rows_per_micro_batch", "1", "--sft.max_seq_len", "256",
       "--data.num_train", "40", "--data.num_eval", "2", "--sft.eval_max_new_tokens", "8",
       "--optim.lr", "1e-3", "--optim.warmup_steps", "0", "--train.max_steps", "3", "--train.save_every", "1",
       "--train.eval_every", "0", "--train.sample_every", "1", "--train.token_records", "2",
       "--train.progress", "false"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="module")
def sft_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    res = train_py(*SFT, "--model.path", tiny, "--train.output_dir", str(out), env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_sft_records_hold_the_loss_of_every_trained_token(sft_run):
    records = _rows(sft_run / "tokens.jsonl")
    loss = {r["step"]: r["loss"] for r in _rows(sft_run / "metrics.jsonl") if "loss" in r}
    assert sorted({r["step"] for r in records}) == [1, 2, 3]
    for step in (1, 2, 3):
        rows = [r for r in records if r["step"] == step]
        assert [r["row"] for r in rows] == [0, 1]  # both rows of the step: one from each micro-batch
        # Every row of the step is recorded, so the mean of the recorded per-token losses is the
        # step's loss: the token-level mean NLL over all label tokens.
        nll = [v for r in rows for v in r["nll"] if v is not None]
        assert math.isclose(sum(nll) / len(nll), loss[step], rel_tol=1e-5), (step, loss[step])
        for r in rows:
            assert len(r["tokens"]) == len(r["nll"]) == len(r["doc"])
            assert r["doc"] == sorted(r["doc"])  # documents are contiguous and in order
            for d in set(r["doc"]):
                trained = "".join(t for t, v, k in zip(r["tokens"], r["nll"], r["doc"]) if k == d and v is not None)
                whole = "".join(t for t, k in zip(r["tokens"], r["doc"]) if k == d)
                # Only the assistant's turn is trained on: it starts at <think>, and no system or
                # user turn is in it.
                assert trained.startswith("<think>") and "<|im_start|>" not in trained, trained
                assert whole.index("<|im_start|>assistant") < whole.index(trained)


def test_records_are_cut_back_on_resume(tiny, sft_run, tmp_path):
    res = train_py(*SFT, "--model.path", tiny, "--train.output_dir", str(tmp_path), "--train.stop_at_step", "2",
                   env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    # A crash after step 2's records were written but before its checkpoint: the stopped run's
    # records of step 2 stay, a torn step-3 line is added by hand, and checkpoint step-2 is removed.
    shutil.rmtree(tmp_path / "checkpoints" / "step-2")
    with open(tmp_path / "tokens.jsonl", "a") as f:
        f.write('{"step": 3, "kind": "sft", "row": 0, "tok')
    res = train_py(*SFT, "--model.path", tiny, "--train.output_dir", str(tmp_path), env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed, straight = _rows(tmp_path / "tokens.jsonl"), _rows(sft_run / "tokens.jsonl")
    assert [(r["step"], r["row"]) for r in resumed] == [(r["step"], r["row"]) for r in straight]
    for a, b in zip(resumed, straight):
        assert a["tokens"] == b["tokens"] and a["doc"] == b["doc"]
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5, abs=1e-6)


def test_page_data_of_a_run_and_of_a_pipeline_folder(sft_run, tmp_path):
    data = page_data(sft_run)
    (section,) = data["sections"]
    assert section["kind"] == "sft" and sorted(section["records"]) == ["1", "2", "3"]
    assert {1, 2, 3} <= set(section["metrics"]["steps"]) and len(section["metrics"]["series"]["loss"]) == \
        len(section["metrics"]["steps"])
    # A pipeline's folder: one section per stage, in the pipeline's order (summary.json).
    for name in ("b-stage", "a-stage"):
        shutil.copytree(sft_run, tmp_path / name, ignore=shutil.ignore_patterns("checkpoints", "final", "tiny-model"))
    (tmp_path / "summary.json").write_text(json.dumps({"stages": [{"stage": "b-stage"}, {"stage": "a-stage"}]}))
    assert [s["name"] for s in page_data(tmp_path)["sections"]] == ["b-stage", "a-stage"]
    with pytest.raises(Exception, match="no per-token records or evaluation samples of that step"):
        page_data(sft_run, step=99)
    assert [*page_data(sft_run, step=2)["sections"][0]["records"]] == ["2"]
    page = write_page(sft_run, tmp_path / "page.html")
    assert page.stat().st_size < MAX_RECORD_BYTES


def _browser():
    """(playwright's sync API, a Chromium executable or None for playwright's own), or a skip
    naming what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e .[test])")
    exe = os.environ.get("R1_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if exe is None:
        with sync_playwright() as p:
            if not Path(p.chromium.executable_path).exists():
                pytest.skip("no Chromium: install Debian's `chromium` package (.ci/run does where it can) or set "
                            "R1_CHROMIUM to a Chromium executable")
    return sync_playwright, exe


def open_page(path: Path, check):
    """Open `path` in headless Chromium and run `check(page)`; returns the console errors."""
    sync_playwright, exe = _browser()
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.resolve().as_uri())
            check(page)
        finally:
            browser.close()
    return errors


def test_sft_page_in_a_browser(sft_run, tmp_path):
    path = write_page(sft_run, tmp_path / "sft.html")

    def check(page):
        assert page.locator("h2").first.inner_text() == f"{sft_run.name} (sft)"
        trained = page.locator(".tok:not(.out)").first
        trained.hover()
        tip = page.inner_text("#tip")
        assert "loss (NLL)" in tip and "document 0" in tip
        assert float(tip.split("loss (NLL) ")[1].split()[0]) > 0
        assert page.locator(".chart").count() >= 2  # loss and grad_norm at least
        page.select_option("select.step", "1")
        assert page.locator(".group h3").first.inner_text().startswith("packed row 0")
    assert open_page(path, check) == []
