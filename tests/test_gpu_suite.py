"""The GPU suite (bench/gpu_suite.py) cannot rot between GPU sessions: its dry run drives every
part's code on the CPU with tiny shapes; its target checks and the kernels' shared-memory step
down are checked on hand-worked numbers."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "suite.md"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run",
                          "--out", str(out), "--workdir", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = out.read_text()
    for part in _bench_module("gpu_suite").PARTS:
        assert f"| {part} | ok |" in report, part
    assert "| GRPO steps under FSDP2 | process group gloo | gloo | yes |" in report
    assert "| compiled decode: greedy rows equal to the eager engine's (float32, 8 tokens) | 4/4 |" in report
    assert "torch " + torch.__version__ in report
    # the block of key: value lines that ends the report (issue 28's figures among them)
    block = report.rsplit("```text\n", 1)[1]
    for key in ("decode_ms_4", "rollout_vs_hf_4", "grpo_generate_share", "main_job_wall_s",
                "host_syncs_per_step_4", "main_status"):  # the dry run's 4 rows stand for 64
        assert f"\n{key}: " in "\n" + block, key


def _row(variant, mode, ms, peak_mib):
    return {"variant": variant, "mode": mode, "T": 1.0, "time_s": ms / 1e3,
            "peak_bytes": peak_mib * 2**20, "N": 16384, "H": 896, "copy_gbps": 3000.0}


def test_targets_hand_worked():
    bench = _bench_module("bench_logprobs")
    args = bench.parse_args(["--device", "cpu", "--dtype", "bfloat16"])
    rows = [_row("mm", "fwd", 1.0, 1), _row("eager", "fwd", 2.0, 100),
            _row("eager", "fwd+bwd", 6.0, 200), _row("triton_fused", "fwd", 1.9, 5),
            _row("triton_fused", "fwd+bwd", 6.6, 10), _row("logits_kernel", "fwd", 2.0, 1)]
    got = {c["name"]: (c["value"], c["ok"]) for c in bench.check_targets(rows, args)}
    # fwd: 1.9 / 2.0 = 0.95 > 0.8; rate: the matmul's 1.0 ms over 1.9 ms = 0.526 >= 0.5
    assert got["triton_fused fwd time / eager's"] == (pytest.approx(0.95), False)
    assert got["triton_fused fwd rate / plain matmul's"] == (pytest.approx(1 / 1.9), True)
    # fwd+bwd: 6.6 / 6.0 = 1.1 <= 1.2; memory 10 / 200 MiB = 0.05 <= 0.1
    assert got["triton_fused fwd+bwd time / eager's"] == (pytest.approx(1.1), True)
    assert got["triton_fused fwd+bwd peak memory / eager's"] == (pytest.approx(0.05), True)
    # the row kernel reads N * V bf16 values: 16384 * 151936 * 2 B in 2 ms = 2489 GB/s of 3000
    moved = 16384 * 151_936 * 2 / 2e-3 / 1e9
    assert got["logits_kernel fwd bytes/s / device copy's"] == (pytest.approx(moved / 3000), True)


def test_fused_tiles_step_down_to_the_shared_memory_there_is(monkeypatch):
    tk = pytest.importorskip("r1train.kernels.triton_logprobs")
    cuda = torch.device("cuda", 0)  # a descriptor only: nothing runs on it
    preferred = tk.TILES[16, "forward"]
    # 3 stages x (128 x 64 + 64 x 256) bf16 values = 144 KiB
    assert tk._shared_bytes(preferred, 2) == 144 * 1024
    monkeypatch.setattr(tk, "_max_shared", lambda device: 227 * 1024)  # H100 / H200
    assert tk._tiles(torch.bfloat16, False, cuda) == preferred
    monkeypatch.setattr(tk, "_max_shared", lambda device: 99 * 1024)  # a consumer GPU
    assert tk._tiles(torch.bfloat16, False, cuda) == tk.Tiles(128, 128, 64, 8, 3)  # 96 KiB
    monkeypatch.setattr(tk, "_max_shared", lambda device: 48 * 1024)
    assert tk._tiles(torch.float16, True, cuda) == tk.Tiles(64, 128, 32, 4, 2)  # 24 KiB
    monkeypatch.setattr(tk, "_max_shared", lambda device: None)  # unknown: as configured
    assert tk._tiles(torch.bfloat16, False, cuda) == preferred


def test_packed_floor_counts_the_models_matmuls(tmp_path):
    """bench_grpo_step's floor of a forward (one prompt, one completion) equals the matmul FLOPs
    torch's FlopCounterMode counts in a real forward of those tokens, less the LM head at the
    prompt positions (which predict nothing the floor needs)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from r1train.data.tiny import build_tiny_model

    bench = _bench_module("bench_grpo_step")
    lm = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "tiny")).eval()
    p, c = 7, 5
    res = {"rows": 1, "distinct_prompts": 1, "distinct_prompt_tokens": p, "completion_tokens": c}
    floor = bench.packed_floor(lm, res, num_iterations=1)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:  # the prompt and all but the last completion token go in
        lm(input_ids=torch.randint(3, 100, (1, p + c - 1)))
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for k, v in counts.items() if str(k) in ("aten.mm", "aten.addmm"))
    head = lm.get_output_embeddings().weight.numel()
    assert floor["old/ref log-probs"] == matmuls - 2 * (p - 1) * head
    assert floor["update"] == 3 * floor["old/ref log-probs"]
