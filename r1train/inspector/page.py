"""`train.py inspect RUN_DIR [--step N] [--out FILE]`: one self-contained HTML page of a run.

The page holds everything it shows: the run's data as one JSON block, and its own small script
and style sheet (page.js, page.css beside this file) inlined. No server, no network, no external
script or font: it opens from a laptop or from a cluster's file share as it is.

What it shows, per run (a pipeline's folder: one section per stage, in the pipeline's order):
  - the curves of metrics.jsonl (pick the metrics);
  - a step picker over the steps with per-token records (tokens.jsonl, inspector/records.py);
  - GRPO: each recorded group as a table of its completions sorted by reward, with the reward
    breakdown and advantage, and each completion's tokens colored by a quantity the reader picks
    (advantage x loss mask, ratio, clip, KL, entropy, log-prob), the numbers on hover; a run's
    response prefix (--data.response_prefix) in grey before them, prompt text with no numbers;
  - SFT: each recorded packed row's tokens colored by their loss, document boundaries marked;
  - held-out evaluation samples (eval_samples.jsonl) with their verdicts, per evaluation.

A long run's records can outgrow a page: past `MAX_RECORD_BYTES` of records the page keeps
evenly spaced steps (the last one always) and says which it left out.
"""
from __future__ import annotations

import argparse
import html
import json
import math
from pathlib import Path

from r1train.inspector.records import RECORDS_FILE
from r1train.run.config import ConfigError

HERE = Path(__file__).resolve().parent
MAX_RECORD_BYTES = 3_500_000  # the page's per-token part, so that a page stays under ~5 MB
SIGNIFICANT = 5  # digits of the numbers shown (tokens.jsonl keeps them exact)


def _read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl log; a torn last line (a run killed mid-write) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _short(x):
    """Numbers rounded to SIGNIFICANT digits, recursively (the page's size, not its truth)."""
    if isinstance(x, float):
        return float(f"{x:.{SIGNIFICANT}g}") if math.isfinite(x) else None
    if isinstance(x, list):
        return [_short(v) for v in x]
    if isinstance(x, dict):
        return {k: _short(v) for k, v in x.items()}
    return x


def _metrics(rows: list[dict]) -> dict:
    """metrics.jsonl as columns: {"steps": [...], "series": {name: [value or None per row]}}."""
    names = sorted({k for r in rows for k, v in r.items()
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    num = lambda v: v if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # noqa: E731
    return {"steps": [r.get("step") for r in rows], "series": {k: _short([num(r.get(k)) for r in rows]) for k in names}}


def _thin(records: dict[int, list], budget: int) -> tuple[dict[int, list], list[int]]:
    """Evenly spaced steps (the last always) whose records fit `budget` bytes; the steps left out."""
    steps = sorted(records)
    size = {s: len(json.dumps(records[s])) for s in steps}
    if sum(size.values()) <= budget:
        return records, []
    keep_every = 1
    while True:
        keep_every += 1
        kept = set(steps[::-1][::keep_every])
        if sum(size[s] for s in kept) <= budget or len(kept) == 1:
            return {s: records[s] for s in steps if s in kept}, [s for s in steps if s not in kept]


def run_section(folder: Path, name: str, step: int | None = None) -> dict:
    """One run folder's part of the page's data."""
    records: dict[int, list] = {}
    for r in _read_jsonl(folder / RECORDS_FILE):
        if isinstance(r.get("step"), int) and (step is None or r["step"] == step):
            records.setdefault(r["step"], []).append(_short(r))
    kinds = {r["kind"] for rs in records.values() for r in rs}
    config = (folder / "config.yaml").read_text(encoding="utf-8", errors="replace") \
        if (folder / "config.yaml").is_file() else ""
    kind = kinds.pop() if len(kinds) == 1 else ("grpo" if "\ngrpo:" in "\n" + config else "sft")
    records, left_out = _thin(records, MAX_RECORD_BYTES)
    evals: dict[int, list] = {}
    for r in _read_jsonl(folder / "eval_samples.jsonl"):
        if isinstance(r.get("step"), int) and (step is None or r["step"] == step):
            evals.setdefault(r["step"], []).append(_short(r))
    return {"name": name, "kind": kind, "folder": str(folder),
            "metrics": _metrics(_read_jsonl(folder / "metrics.jsonl")),
            "records": {str(s): v for s, v in sorted(records.items())}, "left_out": left_out,
            "evals": {str(s): v for s, v in sorted(evals.items())}}


def _is_run(folder: Path) -> bool:
    return (folder / "metrics.jsonl").is_file() or (folder / RECORDS_FILE).is_file()


def pipeline_stages(folder: Path) -> list[Path]:
    """A pipeline folder's stage folders in the pipeline's order: summary.json's when the pipeline
    finished, else the order they were started in (their config.yaml's time)."""
    summary = folder / "summary.json"
    if summary.is_file():
        try:
            names = [s["stage"] for s in json.loads(summary.read_text())["stages"] if "stage" in s]
            stages = [folder / n for n in names if _is_run(folder / n)]
            if stages:
                return stages
        except (ValueError, KeyError, TypeError):
            pass
    found = [d for d in folder.iterdir() if d.is_dir() and ".replaced-" not in d.name and _is_run(d)]
    return sorted(found, key=lambda d: ((d / "config.yaml").stat().st_mtime if (d / "config.yaml").exists() else 0,
                                        d.name))


def page_data(folder: Path, step: int | None = None) -> dict:
    """The data of the page of `folder`: a run's folder, or a pipeline's (one section per stage)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"inspect: {folder} is not a folder (a run's --train.output_dir or a pipeline's "
                          f"--output_dir)")
    if _is_run(folder):
        sections = [run_section(folder, folder.name, step)]
    else:
        sections = [run_section(d, d.name, step) for d in pipeline_stages(folder)]
    if not sections:
        raise ConfigError(f"inspect: {folder} holds no run: no metrics.jsonl or {RECORDS_FILE} in it or in a "
                          f"stage folder below it")
    if step is not None and not any(s["records"] or s["evals"] for s in sections):
        raise ConfigError(f"inspect: --step {step}: no per-token records or evaluation samples of that step in "
                          f"{folder} (records are kept every --train.sample_every steps)")
    return {"title": str(folder), "step": step, "sections": sections}


def render(data: dict) -> str:
    """The page: data as JSON inside the document, with the inlined script and style."""
    blob = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    blob = blob.replace("</", "<\\/")  # a completion that writes "</script>" must not end the block
    css = (HERE / "page.css").read_text(encoding="utf-8")
    js = (HERE / "page.js").read_text(encoding="utf-8")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>inspect: {html.escape(data['title'])}</title>\n<style>\n{css}</style></head>\n"
            f"<body><div id=\"app\"></div><div id=\"tip\" role=\"tooltip\"></div>\n"
            f"<script type=\"application/json\" id=\"run-data\">{blob}</script>\n"
            f"<script>\n{js}</script></body></html>\n")


def write_page(folder: Path, out: Path | None = None, step: int | None = None) -> Path:
    """Write the page of `folder` to `out` (default: `<folder>/inspect.html`); return its path."""
    data = page_data(folder, step)
    if out is None:
        out = Path(folder) / ("inspect.html" if step is None else f"inspect-step-{step}.html")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(data), encoding="utf-8")
    tmp.replace(out)
    return out


def main(argv: list[str]) -> Path:
    p = argparse.ArgumentParser(prog="train.py inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run's --train.output_dir, or a pipeline's --output_dir")
    p.add_argument("--step", type=int, default=None, help="only this step's records (default: every recorded step)")
    p.add_argument("--out", default=None, help="the HTML file to write (default: RUN_DIR/inspect.html)")
    args = p.parse_args(argv)
    path = write_page(Path(args.run_dir), Path(args.out) if args.out else None, args.step)
    print(f"[inspect] wrote {path} ({path.stat().st_size / 1e6:.2f} MB); open it in a browser", flush=True)
    return path
