"""The run inspector: per-token records (tokens.jsonl) hold what the loss computed, are cut back on
resume like the other logs, and `train.py inspect` turns a run into one page that works in a real
browser (headless Chromium, driven by playwright; skipped where neither is installed)."""
import json
import math
import os
import shutil
from pathlib import Path

import pytest

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
        assert [x is None for x in a["nll"]] == [x is None for x in b["nll"]]  # the same label tokens
        assert [x for x in a["nll"] if x is not None] == \
            pytest.approx([x for x in b["nll"] if x is not None], rel=1e-5, abs=1e-6)


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


# --- GRPO ----------------------------------------------------------------------------------------
SFT_MODEL = ROOT / "tests" / "assets" / "tiny-r1-sft"  # the main job's cold start: rewards that differ
G, P, EPS, BETA = 4, 2, 0.2, 0.04
GRPO = ["grpo", "--model.path", str(SFT_MODEL), "--rollout.group_size", str(G), "--grpo.prompts_per_step", str(P),
        "--grpo.micro_batch_size", "4", "--rollout.max_new_tokens", "24", "--data.num_train", "32",
        "--data.num_eval", "4", "--optim.lr", "2e-3", "--optim.warmup_steps", "0", "--grpo.beta", str(BETA),
        "--grpo.epsilon_low", str(EPS), "--train.max_steps", "2", "--train.save_every", "0",
        "--train.eval_every", "0", "--train.sample_every", "1", "--train.token_records", str(P),
        "--train.progress", "false", "--train.export", "false"]


def _grpo(out: Path, *extra) -> tuple[list[dict], dict[int, dict]]:
    res = train_py(*GRPO, "--train.output_dir", str(out), *extra, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = {r["step"]: r for r in _rows(out / "metrics.jsonl") if "loss" in r}
    return _rows(out / "tokens.jsonl"), metrics


def _k3(logp: float, ref: float) -> float:
    return math.exp(ref - logp) - (ref - logp) - 1


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """Two passes over each batch (ratio != 1 in the second, whose numbers are recorded), a KL
    term, and truncated completions left out of the loss."""
    out = tmp_path_factory.mktemp("grpo")
    records, metrics = _grpo(out, "--grpo.num_iterations", "2", "--grpo.mask_truncated", "true",
                             "--rollout.max_new_tokens", "20")
    return out, records, metrics


def test_grpo_records_hold_what_the_loss_computed(grpo_run):
    _, records, metrics = grpo_run
    assert sorted((r["step"], r["group"]) for r in records) == [(s, g) for s in (1, 2) for g in range(P)]
    ratios, truncated = [], 0
    for rec in records:
        assert len(rec["completions"]) == G and rec["reward_names"] == ["accuracy", "format"]
        for c in rec["completions"]:
            v, a = c["values"], c["advantage"]
            assert {"logp", "old_logp", "ref_logp", "ratio", "clip", "kl", "entropy", "loss_mask"} <= set(v)
            assert all(len(x) == len(c["tokens"]) for x in (*v.values(), c["why"]))
            for t in range(len(c["tokens"])):
                if not v["loss_mask"][t]:  # the loss sets a token it ignores to ratio 1, KL 0
                    assert (v["ratio"][t], v["clip"][t], v["kl"][t]) == (1.0, 0.0, 0.0)
                    continue
                ratio = math.exp(v["logp"][t] - v["old_logp"][t])
                assert v["ratio"][t] == pytest.approx(ratio, rel=1e-5)
                clip = 1 if a > 0 and v["ratio"][t] > 1 + EPS else -1 if a < 0 and v["ratio"][t] < 1 - EPS else 0
                assert v["clip"][t] == clip
                assert v["kl"][t] == pytest.approx(_k3(v["logp"][t], v["ref_logp"][t]), rel=1e-4, abs=1e-7)
                ratios.append(v["ratio"][t])
            # Exactly the truncated completions are out of the loss (grpo.mask_truncated), all
            # their tokens, and no other token.
            cut = len(c["tokens"]) == 20 and c["tokens"][-1] != "<|im_end|>"
            assert c["truncated"] == cut
            assert v["loss_mask"] == [0.0 if cut else 1.0] * len(c["tokens"])
            assert c["why"] == ["truncated" if cut else ""] * len(c["tokens"])
            truncated += cut
    assert truncated and max(abs(r - 1) for r in ratios) > 1e-3  # both cases are exercised
    # Every group of the step is recorded, so the step's loss follows from the records alone,
    # in float64: "grpo" normalization, 1/N sum_i 1/|o_i| sum_t (-min(r A, clip(r) A) + beta KL)
    # over the loss tokens, N counting every sampled completion. The logged loss is the mean of
    # the two passes; the first pass ran at the step's starting policy (old_logp: ratio 1).
    for step in (1, 2):
        comps = [c for r in records if r["step"] == step for c in r["completions"]]
        passes = []
        for first_pass in (True, False):
            total = 0.0
            for c in comps:
                v, a, n = c["values"], c["advantage"], sum(c["values"]["loss_mask"])
                terms = []
                for t in range(len(c["tokens"])):
                    if not v["loss_mask"][t]:
                        continue
                    logp = v["old_logp"][t] if first_pass else v["logp"][t]
                    r = math.exp(logp - v["old_logp"][t])
                    surrogate = min(r * a, min(max(r, 1 - EPS), 1 + EPS) * a)
                    terms.append(-surrogate + BETA * _k3(logp, v["ref_logp"][t]))
                total += sum(terms) / max(n, 1)
            passes.append(total / len(comps))
        assert metrics[step]["loss"] == pytest.approx(sum(passes) / 2, rel=1e-4, abs=1e-6)


def test_grpo_records_say_which_tokens_a_selection_left_out(tmp_path):
    """The catalog's per-token selections are visible token by token: top_entropy_quantile's
    low-entropy tokens carry weight 0 and say so, and the logged loss is the records' loss."""
    records, metrics = _grpo(tmp_path, "--grpo.top_entropy_quantile", "0.5", "--grpo.beta", "0")
    for step in (1, 2):
        recs = [r for r in records if r["step"] == step]
        threshold = recs[0]["settings"]["entropy_threshold"]
        assert threshold == metrics[step]["entropy_threshold"]
        total, n_rows, kept, tokens = 0.0, 0, 0, 0
        for c in (c for r in recs for c in r["completions"]):
            v = c["values"]
            low = [v["selection_entropy"][t] < threshold for t in range(len(c["tokens"]))]
            assert v["weight"] == [0.0 if x else 1.0 for x in low]
            assert c["why"] == ["low entropy (policy term 0)" if x else "" for x in low]
            total += sum(-c["advantage"] * w for w in v["weight"]) / len(c["tokens"])  # ratio 1, beta 0
            n_rows, kept, tokens = n_rows + 1, kept + sum(v["weight"]), tokens + len(c["tokens"])
        assert 0.4 <= kept / tokens <= 0.75  # about half keep the policy gradient (ties kept)
        assert metrics[step]["loss"] == pytest.approx(total / n_rows, rel=1e-4, abs=1e-6)


def test_grpo_page_in_a_browser(grpo_run, tmp_path):
    out, _, _ = grpo_run
    path = write_page(out, tmp_path / "grpo.html")
    assert path.stat().st_size < 5_000_000

    def check(page):
        load_ms = page.evaluate("performance.getEntriesByType('navigation')[0].duration")
        assert load_ms < 1000, load_ms
        assert page.locator(".group").count() == P  # the last step's groups
        assert page.locator(".group").first.locator("tr.completion").count() == G
        # Completions sorted by reward, best first.
        cells = page.locator(".group").first.locator("tr.completion td:nth-child(2)")
        rewards = [float(x) for x in cells.all_inner_texts()]
        assert rewards == sorted(rewards, reverse=True)
        token = page.locator("tr.completion .tok:not(.out)").first
        token.hover()
        tip = page.inner_text("#tip")
        for name in ("logp", "old_logp", "ref_logp", "ratio", "clip", "kl", "entropy", "advantage"):
            assert f"\n{name} " in tip, tip
        colors = lambda: page.eval_on_selector_all("tr.completion .tok", "ts => ts.map(t => t.style.background)")  # noqa: E731
        before = colors()
        page.select_option("select.quantity", "entropy")
        after = colors()
        assert before != after and any(after)
        page.select_option("select.step", "1")
        assert page.locator(".group").count() == P
    assert open_page(path, check) == []


def test_a_page_past_its_budget_keeps_evenly_spaced_steps_and_the_last():
    from r1train.inspector.page import _thin
    records = {s: [{"x": "y" * 1000}] for s in range(1, 21)}  # 20 steps of ~1 kB
    kept, left_out = _thin(records, 10**6)
    assert kept == records and left_out == []
    kept, left_out = _thin(records, 7_500)  # room for 7 steps: every third, counted from the last
    assert sorted(kept) == [2, 5, 8, 11, 14, 17, 20]
    assert sorted(left_out) == sorted(set(range(1, 21)) - set(kept))
