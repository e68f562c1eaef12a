"""The pipeline's closing report: a table of held-out results per stage and a PNG of the curves.

The report's files (`REPORT_FILES`) sit at the top of the pipeline's output folder, next to
whatever else a user keeps there, and every run of the pipeline rewrites them. So they follow
the output-folder rule of the trainers (run/folder.py): the pipeline lists each file it writes,
with its size and SHA-256, in `<output_dir>/manifest.json`, and replaces only a file that is
listed and unchanged. A `results.txt` the user wrote, or edited after the run, is refused at
the start of the next run (before any stage runs), naming the file. Each file is written under a
fresh temporary name and renamed into place, then the manifest is rewritten: a crash in between
leaves a file the manifest does not know, which the next run refuses rather than replaces (the
safe side: nothing is lost, the message says what to move).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

from r1train.run.config import ConfigError
from r1train.run.dist import init_distributed
from r1train.run.folder import MANIFEST, fsync_path, manifest_problems, read_manifest, write_manifest

REPORT_FILES = ("summary.json", "results.txt", "curves.png")


def _refuse(out: Path, name: str, why: str) -> ConfigError:
    return ConfigError(f"{out} holds {name}, which this pipeline did not write ({why}); the pipeline's "
                       f"report would replace it. Move it out of {out}, or use another --output_dir")


def owned_report(out: Path) -> dict[str, tuple[int, str]]:
    """name -> (size, sha256) of the report files in `out` that the pipeline wrote, as its
    manifest lists them; ConfigError naming the first file there that it did not write (or that
    changed since), including a manifest.json that is not the pipeline's."""
    out = Path(out)
    present = [n for n in REPORT_FILES if os.path.lexists(out / n)]
    listed: dict[str, dict] = {}
    if os.path.lexists(out / MANIFEST):
        try:
            listed = read_manifest(out)
        except ValueError:
            raise _refuse(out, MANIFEST, "not a manifest of its report") from None
        if not set(listed) <= set(REPORT_FILES) or (out / MANIFEST).is_symlink():
            raise _refuse(out, MANIFEST, "it lists other files than the report's")
    for name in present:
        if (out / name).is_symlink():  # written through, it would change a file elsewhere
            raise _refuse(out, name, "a symbolic link")
        if name not in listed:
            raise _refuse(out, name, f"not in its {MANIFEST}")
        if manifest_problems(out, listed, [name]):
            raise _refuse(out, name, f"changed since the pipeline wrote it, by its {MANIFEST}")
    return {n: (listed[n]["size"], listed[n]["sha256"]) for n in present}


def write_report(out: Path, files: dict[str, bytes]) -> None:
    """Write report files (name -> contents) into `out`, replacing only the pipeline's own
    (`owned_report`), and list them in its manifest with the report files already there."""
    out = Path(out)
    entries = owned_report(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        assert name in REPORT_FILES, name
        # A fresh name, never an existing file's: a user's `results.txt.tmp` is not ours either.
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out / name)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        entries[name] = (len(data), hashlib.sha256(data).hexdigest())
    # write_manifest writes <folder>/manifest.json: built in a folder of its own, then renamed,
    # so that a crash never leaves a torn manifest
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".manifest.", suffix=".tmp"))
    try:
        os.replace(write_manifest(tmp, entries), out / MANIFEST)
    finally:
        os.rmdir(tmp)
    fsync_path(out)


def samples_of(evaluation: dict) -> int:
    """k of an evaluation with --eval.samples k > 1 (it holds pass@1..pass@k, maj@k), else 1."""
    return max((int(n[len("pass@"):]) for n in evaluation if n.startswith("pass@")), default=1)


def _accuracy(e: dict) -> str:
    """'39.0% ± 2.4' (± one standard error over the problems), or '39.0%' for an evaluation
    written before the standard error was kept."""
    se = f" ± {e['accuracy_se']:.1%}".removesuffix("%") if "accuracy_se" in e else ""
    return f"{e['accuracy']:.1%}{se}"


def _gain(e: dict | None) -> str:
    """'+13.0 ± 2.1 (6.2 SE)': the stage's accuracy gain in points since its first evaluation,
    ± its paired standard error, and the gain in standard errors; '-' without one."""
    if not e or "gain" not in e:
        return "-"
    ratio = f" ({e['gain'] / e['gain_se']:.1f} SE)" if e["gain_se"] > 0 else ""
    return f"{100 * e['gain']:+.1f} ± {100 * e['gain_se']:.1f}{ratio}"


def results_table(rows: list[dict]) -> str:
    """stage | accuracy ± standard error | problems | gain over the stage's start ± its paired
    standard error | format rate | mean completion length | wall time; with --eval.samples k > 1
    in a stage, also pass@k and maj@k (a dash for the stages evaluated once)."""
    first = next((r for r in rows if isinstance(r.get("initial"), dict)), None)
    evaluations = [r for r in rows if "accuracy" in r] + ([first["initial"]] if first else [])
    ks = sorted({samples_of(e) for e in evaluations} - {1})
    label, width = (f"@{ks[0]}", 10) if len(ks) == 1 else ("@k", 14)  # different k: each cell says its k

    def sampled(e: dict | None) -> str:  # the pass@k and maj@k cells of a row
        k = samples_of(e) if e else 1
        cells = ["-", "-"] if k == 1 else [f"{e[f'pass@{k}']:.1%}", f"{e[f'maj@{k}']:.1%}"]
        if k > 1 and len(ks) > 1:
            cells = [f"{c} k={k}" for c in cells]
        return "".join(f"{c:>{width}}" for c in cells) if ks else ""

    def cells(e: dict | None) -> str:  # accuracy ± SE, problems, gain, format, mean length
        if e is None:
            return f"{'-':>15}{'-':>9}{'-':>24}{'-':>9}{'-':>10}"
        return (f"{_accuracy(e):>15}{e.get('num_problems', '-'):>9}{_gain(e):>24}{e['format']:>9.1%}"
                f"{e['mean_length']:>10.1f}")
    extra = f"{'pass' + label:>{width}}{'maj' + label:>{width}}" if ks else ""
    header = (f"{'stage':<22}{'accuracy ± SE':>15}{'problems':>9}{'gain ± SE (points)':>24}{'format':>9}"
              f"{'mean len':>10}{extra}{'wall time':>11}")
    lines = [header, "-" * len(header)]
    if first is not None:
        lines.append(f"{'before ' + first['stage']:<22}{cells(first['initial'])}{sampled(first['initial'])}{'-':>11}")
    for r in rows:
        e = r if "accuracy" in r else None
        lines.append(f"{r['stage']:<22}{cells(e)}{sampled(e)}{r.get('wall_time_s', 0):>10.0f}s")
    return "\n".join(lines)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(out: Path, rows: list[dict]) -> bytes | None:
    """A PNG of training reward, accuracy and format rewards and held-out accuracy (with its 95%
    interval, 1.96 standard errors) over GRPO steps, plus SFT loss, from each stage's
    metrics.jsonl in `out`."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[pipeline] matplotlib is not installed (pip install .[plot]): skipping the plot")
        return None
    panels = [r for r in rows if (out / r["stage"] / "metrics.jsonl").exists()]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, r in zip(axes[0], panels):
        metrics = _read_jsonl(out / r["stage"] / "metrics.jsonl")

        def series(key):  # (steps, values) of a metric; null (no value that step) is left out
            kept = [m for m in metrics if m.get(key) is not None]
            return [m["step"] for m in kept], [m[key] for m in kept]
        if r["command"] == "grpo":
            ax.plot(*series("reward"), label="total reward (train)", alpha=0.6)
            ax.plot(*series("accuracy/mean"), label="accuracy reward (train)", alpha=0.8)
            if series("format/mean")[0]:  # the strict R1 format's share of the sampled completions
                ax.plot(*series("format/mean"), label="format reward (train)", alpha=0.6, linestyle="--")
            if series("tools/calls_mean")[0]:  # --rollout.tools: the sampled completions' calls
                ax.plot(*series("tools/calls_mean"), label="tool calls per completion (train)", alpha=0.6,
                        linestyle=":")
        else:
            ax.plot(*series("loss"), label="SFT loss (train)", alpha=0.8)
        steps, acc = series("eval/accuracy")
        se = dict(zip(*series("eval/accuracy_se")))  # absent in metrics written before it was kept
        ax.errorbar(steps, acc, yerr=[1.96 * se.get(s, 0.0) for s in steps], fmt="o-", capsize=3,
                    color="black", label="held-out accuracy (95% interval)" if se else "held-out accuracy")
        ax.set_title(f"{r['stage']} ({r['command']})")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()


def finish_report(recipe: dict, overrides: dict, rows: list[dict]) -> None:
    info = init_distributed(overrides.get("device", recipe.get("device", "auto")))
    if not info.is_main:
        return
    out = Path(overrides.get("output_dir", recipe.get("output_dir", "runs/pipeline")))
    table = results_table(rows)
    png = plot_curves(out, rows)
    files = {"results.txt": (table + "\n").encode(), **({"curves.png": png} if png else {})}
    write_report(out, files)
    print("\n" + table)
    print(f"\n[pipeline] outputs in {out}/: final model {rows[-1].get('model')}, "
          f"per-stage metrics.jsonl and samples.jsonl, {', '.join(files)}")
