"""The pipeline's closing report: a table of held-out results per stage and a PNG of the curves."""
from __future__ import annotations

import json
from pathlib import Path

from r1train.run.dist import init_distributed


def results_table(rows: list[dict]) -> str:
    """stage | accuracy | format rate | mean completion length | wall time."""
    lines = [f"{'stage':<22}{'accuracy':>10}{'format':>10}{'mean len':>10}{'wall time':>11}",
             "-" * 63]
    first = next((r for r in rows if isinstance(r.get("initial"), dict)), None)
    if first is not None:
        e = first["initial"]
        lines.append(f"{'before ' + first['stage']:<22}{e['accuracy']:>10.1%}"
                     f"{e['format']:>10.1%}{e['mean_length']:>10.1f}{'-':>11}")
    for r in rows:
        if "accuracy" not in r:
            lines.append(f"{r['stage']:<22}{'-':>10}{'-':>10}{'-':>10}{r.get('wall_time_s', 0):>10.0f}s")
            continue
        lines.append(f"{r['stage']:<22}{r['accuracy']:>10.1%}{r['format']:>10.1%}"
                     f"{r['mean_length']:>10.1f}{r.get('wall_time_s', 0):>10.0f}s")
    return "\n".join(lines)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(out: Path, rows: list[dict]) -> Path | None:
    """Training reward, accuracy reward and held-out accuracy over GRPO steps, plus SFT loss."""
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
        train = [m for m in metrics if "reward" in m or "loss" in m and "eval/accuracy" not in m]
        evals = [m for m in metrics if "eval/accuracy" in m]
        if r["command"] == "grpo":
            ax.plot([m["step"] for m in train if "reward" in m], [m["reward"] for m in train if "reward" in m],
                    label="total reward (train)", alpha=0.6)
            ax.plot([m["step"] for m in train if "accuracy/mean" in m],
                    [m["accuracy/mean"] for m in train if "accuracy/mean" in m],
                    label="accuracy reward (train)", alpha=0.8)
        else:
            ax.plot([m["step"] for m in train if "loss" in m], [m["loss"] for m in train if "loss" in m],
                    label="SFT loss (train)", alpha=0.8)
        ax.plot([m["step"] for m in evals], [m["eval/accuracy"] for m in evals], "o-",
                label="held-out accuracy", color="black")
        ax.set_title(f"{r['stage']} ({r['command']})")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish_report(recipe: dict, overrides: dict, rows: list[dict]) -> None:
    info = init_distributed(overrides.get("device", recipe.get("device", "auto")))
    if not info.is_main:
        return
    out = Path(overrides.get("output_dir", recipe.get("output_dir", "runs/pipeline")))
    table = results_table(rows)
    (out / "results.txt").write_text(table + "\n")
    png = plot_curves(out, rows)
    print("\n" + table)
    print(f"\n[pipeline] outputs in {out}/: final model {rows[-1].get('model')}, "
          f"per-stage metrics.jsonl and samples.jsonl, results.txt" + (f", {png.name}" if png else ""))
