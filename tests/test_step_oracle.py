"""A whole GRPO training step, and an SFT step, against an independent float64 oracle
(tests/reference_step.py).

The trainer runs two real steps on the tiny model, in float64 (`--model.dtype float64`), so that
the second starts with the policy away from the reference and with AdamW moments in place, in
one process and in two (FSDP2 over gloo). Of that second step the oracle gets only the inputs: the weights, the
sampled token ids, each reward function's raw values, the optimizer's moments and the options. It
recomputes rewards, advantages, which rows the loss leaves out (grpo.mask_truncated: the rows
whose tokens show that max_new_tokens cut them; grpo.drop_zero_std_groups), log-probs, the loss
with its normalization, the gradient, its norm, the learning rate from the schedule's formula, the
AdamW update, and the logged loss, kl, clip fractions, ratio and entropy (per-token means over the
step), and every one must match the trainer's. A stop string ends some rows early, so that rows
are cut and kept in one step and micro-batches and ranks hold different numbers of tokens. A
trainer that is wrong but consistent with itself fails here: each mutation tested below (doubled
advantages, a wrong denominator, clipping before the logged norm, warm-up one step late, the
reference taken from the policy, rows left out still in the loss, one rank's gradient dropped)
is caught. SFT likewise: packed rows in micro-batches, one conversation a row, the cosine
schedule, and distillation with a KL weight, against each document's cross-entropy on its own;
and an SFT loss backpropagated twice over (its logged loss unchanged) is caught.

Tolerances: the update (clipping, learning rate, AdamW on the trainer's own gradient) is float64
end to end and agrees to 1e-12. The gradient goes through the model class, whose RMSNorm runs in
float32 even in a float64 model (tests/reference_step.py), so it agrees to ~1e-7 of each tensor's
largest element; GRAD_RTOL 1e-6 leaves room for that and is far below any mutation here (the
smallest, a denominator 3/4 of the right one, moves the gradient by 33%). The logged means agree
to ~5e-8 (the entropy, through the same float32 norm); a mean of micro-batch means instead of the
per-token mean moves the kl by 4% in the mask_truncated case.
"""
from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from r1train.data.tiny import build_tiny_model
from r1train.grpo.config import GRPOJobConfig
from r1train.grpo.trainer import GRPOTrainer
from r1train.model.policy import PolicyModel
from r1train.sft.packing import VARLEN_ATTENTION
from r1train.sft.trainer import SFTJobConfig, SFTTrainer

from reference_step import grpo_step, sft_step

GRAD_RTOL = 1e-6
# The logged loss and per-token means are O(1) or 0; an atol far below any real disagreement lets
# a loss whose terms cancel to ~1e-17 (each group's advantages sum to 0) meet the oracle's ~1e-17.
METRIC_ATOL = 1e-12
ROOT = Path(__file__).resolve().parents[1]


class Disagreements(list):
    """What the trainer computed that the oracle did not, one line each."""

    def close(self, name, got, expected, rtol, atol=0.0):
        got, expected = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
        if got.shape != expected.shape:
            self.append(f"{name}: shape {tuple(got.shape)}, the oracle's {tuple(expected.shape)}")
        elif not torch.allclose(got, expected, rtol=rtol, atol=atol):
            self.append(f"{name}: max difference {(got - expected).abs().max().item():.3g} "
                        f"(largest value {expected.abs().max().item():.3g})")

    def gradients(self, label, got: dict, expected: dict):
        for n, x in expected.items():  # the model's own precision: each tensor to GRAD_RTOL of its largest
            self.close(f"{label} gradient of {n}", got.get(n, torch.zeros_like(x)), x, rtol=GRAD_RTOL,
                       atol=GRAD_RTOL * x.abs().max().item())

    def weights(self, label, got: dict, expected: dict, before: dict):
        moved = max((expected[n] - before[n]).abs().max().item() for n in expected)
        for n, x in expected.items():  # float64 end to end
            self.close(f"{label} weights after the update: {n}", got[n], x, rtol=1e-12, atol=1e-12 * moved)


def _config(model_path, out, **options) -> GRPOJobConfig:
    cfg = GRPOJobConfig()
    cfg.model.path, cfg.model.dtype = model_path, "float64"
    cfg.data.num_train, cfg.data.num_eval = 16, 2
    cfg.data.task.max_operands = 2
    cfg.rollout.group_size, cfg.rollout.max_new_tokens = 4, 24
    cfg.grpo.prompts_per_step, cfg.grpo.micro_batch_size = 8, 8
    cfg.grpo.reward_weights = [1.5, 0.5]  # of REWARDS: weights that are not 1 show
    cfg.grpo.beta = 0.04
    # Warm-up longer than the run (the lr of step 2 is 2/3 of the peak), weight decay on, and a
    # clipping bound below the gradient's norm, so that each of them changes the update.
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.optim.max_grad_norm = 2e-2, 3, 0.1, 1e-3
    cfg.train.output_dir, cfg.train.progress, cfg.train.max_steps = str(out), False, 2
    for key, value in options.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    return cfg


def token_sum(completions, completion_ids, **columns):
    return [(sum(ids) % 11) / 11 for ids in completion_ids]


def distinct(completions, completion_ids, **columns):
    return [len(set(ids)) / max(len(ids), 1) for ids in completion_ids]


# A random model is never right and writes 24 tokens of noise, on which the R1 rewards are flat
# (no advantage, nothing to compare); these two differ between any two completions.
REWARDS = [("token_sum", token_sum), ("distinct", distinct)]


def _flat(problem: str) -> bool:
    return " - " in problem  # "What is 63 - 34?": about half of each step's problems


def token_sum_or_flat(completions, completion_ids, problem, **columns):
    return [0.0 if _flat(p) else v for p, v in zip(problem, token_sum(completions, completion_ids))]


def distinct_or_flat(completions, completion_ids, problem, **columns):
    return [0.0 if _flat(p) else v for p, v in zip(problem, distinct(completions, completion_ids))]


# The same, but 0 on every completion of a subtraction: those groups' rewards are all equal
# (advantage 0), for grpo.drop_zero_std_groups to leave out.
SOME_GROUPS_FLAT = [("token_sum", token_sum_or_flat), ("distinct", distinct_or_flat)]


def _float64_trainer(cfg, rewards=REWARDS) -> GRPOTrainer:
    torch.manual_seed(0)
    return GRPOTrainer(cfg, reward_funcs=rewards)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter, gradient or moment (FSDP2 shards them: DTensors)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def two_steps(trainer, seen: dict) -> None:
    """Steps 1 and 2 as the loop runs them, recording into `seen`, for each optimizer step of
    step 2 (one per pass): its starting weights, its gradient, its lr, its norm and the weights
    after it, as whole tensors; AdamW's moments before step 2; and step 2's metrics."""
    named = dict(trainer.policy.lm.named_parameters())
    real_step = trainer.optimizer_step

    def optimizer_step(loss):
        seen["weights"].append({n: _full(p) for n, p in named.items()})
        seen["grads"].append({n: _full(p.grad) for n, p in named.items() if p.grad is not None})
        seen["lrs"].append(trainer.optimizer.param_groups[0]["lr"])
        norm, stepped = real_step(loss)
        seen["norms"].append(float(norm))
        seen["after"].append({n: _full(p) for n, p in named.items()})
        return norm, stepped

    trainer.optimizer_step = optimizer_step
    for step in (1, 2):
        trainer.step = step
        if step == 2:
            by_param = {p: n for n, p in named.items()}
            seen["moments"] = {by_param[p]: (_full(s["exp_avg"]), _full(s["exp_avg_sq"]), int(s["step"]))
                               for p, s in trainer.optimizer.state.items()}
        seen.update(weights=[], grads=[], lrs=[], norms=[], after=[])
        seen["metrics"] = trainer.train_step()
        trainer.scheduler.step()


def capture_grpo(trainer: GRPOTrainer) -> dict:
    """Two trainer steps as the loop runs them, and what the oracle needs of the second: whole
    tensors and every rank's rows (the collectives run on every rank; every rank gets it all)."""
    seen = {"ref_weights": ({n: _full(p) for n, p in trainer.ref.lm.named_parameters()}
                            if trainer.ref is not None else None)}
    real_rollout = trainer.rollout

    def rollout():
        batch, timings = real_rollout()
        seen["batch"] = batch
        return batch, timings

    trainer.rollout = rollout
    two_steps(trainer, seen)
    batch = seen.pop("batch")
    P = batch.prompt_len
    mine = {"rows": [(ids[:P][mask[:P].bool()].tolist(), completion) for ids, mask, completion
                     in zip(batch.input_ids, batch.attention_mask, batch.completion_lists())],
            "per_fn": batch.per_fn.tolist(), "rewards": batch.rewards.tolist(),
            "advantages": batch.advantages.tolist(), "truncated": batch.truncated.tolist(),
            "loss_weight": batch.loss_weight.tolist(),
            "sampler_logps": [x[: len(c)].tolist() for x, c in zip(batch.sampler_logps, batch.completion_lists())]}
    ranks = [mine]
    if torch.distributed.is_initialized():  # each rank holds whole groups: rank order is group order
        ranks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, mine)
    for key in mine:
        seen[key] = [x for r in ranks for x in r[key]]
    seen["reward_weights"] = [float(w) for w in trainer.weights]
    return seen


def hit_the_budget(path: str, rows, max_new_tokens: int, stop_strings: list[str]) -> list[bool]:
    """Which completions max_new_tokens cut, read from their tokens: the whole budget used, with
    no EOS at its end and no stop string in its text (either would have ended the row)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = {tokenizer.eos_token_id, GenerationConfig.from_pretrained(path).eos_token_id}
    return [len(c) == max_new_tokens and c[-1] not in eos and not any(s in tokenizer.decode(c) for s in stop_strings)
            for _, c in rows]


def check_grpo(seen: dict, cfg) -> list[str]:
    """The captured step against the oracle: the disagreements (empty: the step is right)."""
    assert all(completion for _, completion in seen["rows"]), "an empty completion: nothing to compare"
    g, r = cfg.grpo, cfg.rollout
    truncated = hit_the_budget(cfg.model.path, seen["rows"], r.max_new_tokens, r.stop_strings)
    want = grpo_step(cfg.model.path, seen["weights"], seen["grads"], seen["ref_weights"], seen["rows"], truncated,
                     seen["per_fn"], seen["reward_weights"], seen["moments"], G=r.group_size, k=1, cfg=cfg,
                     sampler_logps=seen["sampler_logps"])
    problems = Disagreements()
    close = problems.close
    for name, gap in (("an entropy next to the threshold", want["entropy_gap"]),
                      ("a log ratio next to a correction bound", want["bound_gap"])):
        if gap is not None and gap < 1e-6:
            problems.append(f"{name} ({gap:.2g} away): the selection is decided by rounding, pick other options")
    for name in ("is_truncated_frac", "is_masked_frac", "entropy_kept_frac"):
        if name in want["metrics"] and not 0 < want["metrics"][name] < 1:
            problems.append(f"{name} {want['metrics'][name]}: the selection took all tokens or none, untested")
    close("rewards", seen["rewards"], want["rewards"], rtol=1e-12)
    close("advantages", seen["advantages"], want["advantages"], rtol=1e-9, atol=1e-12)
    if not any(a != 0 for a in want["advantages"]):
        problems.append("every advantage is 0: a vacuous comparison")
    close("truncated rows", seen["truncated"], truncated, rtol=0)
    close("the rows in the loss (loss_weight)", seen["loss_weight"], want["keep"], rtol=0)
    G = r.group_size
    flat = [max(want["rewards"][k:k + G]) == min(want["rewards"][k:k + G]) for k in range(0, len(truncated), G)]
    for on, which, name in ((g.mask_truncated, truncated, "truncated rows"),
                            (g.drop_zero_std_groups, flat, "groups with equal rewards")):
        if on and (all(which) or not any(which)):
            problems.append(f"{'all' if all(which) else 'no'} {name}: leaving them out untested")
    for k, x in want["metrics"].items():  # per-token means over the step (tests/reference_step.py)
        close(f"logged {k}", seen["metrics"][k], x, rtol=GRAD_RTOL, atol=METRIC_ATOL)
    if len(seen["grads"]) != cfg.grpo.num_iterations:
        problems.append(f"{len(seen['grads'])} optimizer steps for num_iterations {cfg.grpo.num_iterations}")
    for i, (got, expected) in enumerate(zip(seen["grads"], want["grads"])):
        problems.gradients(f"pass {i + 1}", got, expected)
    close("gradient norm", seen["norms"], want["norms"], rtol=GRAD_RTOL)
    close("logged grad_norm (the norm before clipping)", seen["norms"], want["given_norms"], rtol=1e-12)
    close("logged grad_norm in the step's metrics", seen["metrics"]["grad_norm"], want["given_norms"][-1],
          rtol=1e-12)
    close("learning rate", seen["lrs"], [want["lr"]] * len(seen["lrs"]), rtol=1e-12)
    for i, (got, expected) in enumerate(zip(seen["after"], want["weights"])):
        problems.weights(f"pass {i + 1}", got, expected, seen["weights"][i])
    if want["norms"][0] <= cfg.optim.max_grad_norm:
        problems.append(f"norm {want['norms'][0]:.3g} under max_grad_norm: clipping untested")
    return problems


def run_and_check(trainer: GRPOTrainer) -> list[str]:
    return check_grpo(capture_grpo(trainer), trainer.cfg)


CASES = {
    "grpo": {},
    "bnpo": {"grpo.loss_type": "bnpo"},
    "dr_grpo": {"grpo.loss_type": "dr_grpo"},
    "dapo, 2 passes, clip-higher": {"grpo.loss_type": "dapo", "grpo.num_iterations": 2, "grpo.epsilon_high": 0.28},
    "grpo, padded rows, 4 micro-batches": {"grpo.packing": False},
    "rloo, beta 0": {"grpo.advantage_estimator": "rloo", "grpo.beta": 0.0},
    # A stop string ends about half of the rows early (the rest use all 24 tokens): the rows cut
    # leave the loss, and the micro-batches hold different numbers of tokens.
    "grpo, mask_truncated": {"rollout.stop_strings": ["y"], "grpo.mask_truncated": True},
    "dapo, mask_truncated, drop_zero_std_groups": {
        "rollout.stop_strings": ["y"], "grpo.loss_type": "dapo", "grpo.mask_truncated": True,
        "grpo.drop_zero_std_groups": True, "rewards": SOME_GROUPS_FLAT},
    # The token selections (grpo/loss.py), against a sampler whose log-probs are off by N(0, 0.3^2):
    # token-level TIS truncating ~1/4 of the ratios; sequence-level MIS with a two-sided bound,
    # over 2 passes (old_logps from phase 5) and rows left out; the top 20% entropy tokens, with
    # and without TIS, their threshold over every loss token of the step.
    "tis, token": {"grpo.rollout_correction": "tis", "grpo.correction_bound": 1.2, "sampler_noise": 0.3},
    "mis, sequence, two-sided, 2 passes, mask_truncated": {
        "grpo.rollout_correction": "mis", "grpo.correction_level": "sequence", "grpo.correction_bound": 3.0,
        "grpo.correction_bound_low": 0.3, "grpo.num_iterations": 2, "rollout.stop_strings": ["y"],
        "grpo.mask_truncated": True, "sampler_noise": 0.3},
    "top 20% entropy, dapo": {"grpo.top_entropy_quantile": 0.2, "grpo.loss_type": "dapo"},
    "top 20% entropy and tis, 2 passes": {
        "grpo.top_entropy_quantile": 0.2, "grpo.rollout_correction": "tis", "grpo.correction_bound": 1.2,
        "grpo.num_iterations": 2, "sampler_noise": 0.3},
}


def _case_trainer(model_path, out, options: dict) -> GRPOTrainer:
    options = dict(options)
    rewards = options.pop("rewards", REWARDS)
    noise = options.pop("sampler_noise", 0.0)
    trainer = _float64_trainer(_config(model_path, out, **options), rewards)
    if noise:
        trainer.rollout = _mismatched_sampler(trainer.rollout, trainer, noise)
    return trainer


def _mismatched_sampler(real_rollout, trainer, noise: float):
    """A sampler whose numbers differ from the trainer's: in one float64 process the engine's
    log-probs equal the trainer's to ~1e-7, which leaves a rollout correction nothing to do. Its
    recorded log-probs get seeded N(0, noise^2) offsets (the tokens stay those sampled)."""
    def rollout():
        batch, timings = real_rollout()
        g = torch.Generator().manual_seed(1000 + trainer.step)
        offsets = noise * torch.randn(batch.sampler_logps.shape, generator=g, dtype=torch.float64)
        batch.sampler_logps = batch.sampler_logps + offsets * batch.completion_mask
        return batch, timings
    return rollout


@pytest.mark.parametrize("case", list(CASES))
def test_a_trainer_step_equals_the_float64_oracle(tiny, tmp_path, case):
    assert run_and_check(_case_trainer(tiny, tmp_path, CASES[case])) == []


MUTATIONS = {
    # name: (what to patch, the quantity the oracle must flag)
    "advantages x2": ("r1train.grpo.trainer.group_advantages",
                      lambda real: lambda *a, **k: 2 * real(*a, **k), "advantages"),
    "the loss denominator short of one micro-batch's rows": (
        "r1train.grpo.trainer.loss_denominator", lambda real: lambda *a, **k: real(*a, **k) * 3 / 4, "gradient"),
    "the logged norm taken after clipping": (
        "r1train.run.loop.grad_norm_and_clip",
        lambda real: lambda params, max_norm: _clipped_norm(real, params, max_norm), "grad_norm"),
    "warm-up one step late": ("r1train.run.optim.lr_multiplier",
                              lambda real: lambda step, **k: real(max(step - 1, 0), **k), "learning rate"),
    "rows left out of the loss still in it": ("r1train.grpo.batch.GRPOBatch.loss_mask",
                                              lambda real: property(lambda b: b.completion_mask.float()), "gradient"),
    "TIS weights never truncated": ("r1train.grpo.trainer.rollout_correction",
                                    lambda real: lambda *a, **k: real(*a, **{**k, "bound": 1e9}), "gradient"),
    "the low-entropy tokens kept instead": ("r1train.grpo.trainer.entropy_mask",
                                            lambda real: lambda e, m, tau: (e < tau) & (m != 0), "gradient"),
}
# the case a mutation runs on, where it is not the first
MUTATION_CASES = {"rows left out of the loss still in it": "grpo, mask_truncated",
                  "TIS weights never truncated": "tis, token",
                  "the low-entropy tokens kept instead": "top 20% entropy, dapo"}


def _lookup(target: str):
    """What a dotted name names: its longest importable module, then attributes."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        return functools.reduce(getattr, parts[i:], module)
    raise LookupError(target)


def _clipped_norm(real, params, max_norm):
    params = list(params)
    real(params, max_norm)
    return real(params, 0.0)  # the norm of what clipping left


@pytest.mark.parametrize("mutation", [*MUTATIONS, "the reference log-probs taken from the policy"])
def test_the_oracle_catches_a_wrong_but_consistent_trainer(tiny, tmp_path, monkeypatch, mutation):
    trainer = _case_trainer(tiny, tmp_path, CASES[MUTATION_CASES.get(mutation, "grpo")])
    if mutation in MUTATIONS:
        target, wrap, flagged = MUTATIONS[mutation]
        monkeypatch.setattr(target, wrap(_lookup(target)))
    else:  # the KL then pulls toward the policy's own start of step, not the initial model
        flagged = "gradient"
        trainer.ref = trainer.policy
    problems = run_and_check(trainer)
    assert any(flagged in p for p in problems), problems


# ------------------------------------------------------------------------------------------ SFT

def _sft_trainer(model_path, out, teacher_path=None, kl_weight=0.0, **options) -> SFTTrainer:
    cfg = SFTJobConfig()
    cfg.model.path, cfg.model.dtype = model_path, "float64"
    cfg.data.num_train, cfg.data.num_eval = 40, 2
    # 4 packed rows a step in 2 micro-batches; cosine after a warm-up longer than the run, decay
    # on, clipping active: each changes the update.
    cfg.sft.max_seq_len, cfg.sft.rows_per_step, cfg.sft.rows_per_micro_batch = 640, 4, 2
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.optim.max_grad_norm = 2e-2, 3, 0.1, 1e-3
    cfg.train.output_dir, cfg.train.progress, cfg.train.max_steps = str(out), False, 2
    for key, value in options.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    torch.manual_seed(0)
    teacher = None
    if kl_weight:
        teacher = PolicyModel(AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float64)).eval()
        if cfg.sft.packing:
            teacher.lm.set_attn_implementation(VARLEN_ATTENTION)
    return SFTTrainer(cfg, teacher=teacher, kl_weight=kl_weight)


def run_and_check_sft(trainer: SFTTrainer, teacher_path=None) -> list[str]:
    """Two SFT steps as the loop runs them; the second against the oracle."""
    cfg, seen = trainer.cfg, {}
    real_rows = trainer.step_rows

    def step_rows(step):
        seen["rows"] = real_rows(step)
        return seen["rows"]

    trainer.step_rows = step_rows
    two_steps(trainer, seen)
    [weights], [grads], [lr], [after], metrics = (seen["weights"], seen["grads"], seen["lrs"], seen["after"],
                                                 seen["metrics"])
    docs = []  # the step's documents, each alone: packed rows cut at their documents' lengths
    for row in (trainer.rows[i] for i in seen["rows"]):
        if not cfg.sft.packing:
            docs.append((list(row[0]), list(row[1])))
            continue
        start = 0
        for n in row.doc_lens:
            docs.append((row.input_ids[start:start + n], row.labels[start:start + n]))
            start += n
    assert len(docs) > len(seen["rows"]) or not cfg.sft.packing, "one document a row: packing untested"
    want = sft_step(cfg.model.path, weights, grads, docs, seen["moments"], k=1, cfg=cfg,
                    teacher_path=teacher_path, kl_weight=trainer.kl_weight)
    problems = Disagreements()
    problems.close("logged loss", metrics["loss"], want["loss"], rtol=GRAD_RTOL)
    problems.gradients("the step's", grads, want["grads"])
    problems.close("gradient norm", metrics["grad_norm"], want["norm"], rtol=GRAD_RTOL)
    problems.close("logged grad_norm (the norm before clipping)", metrics["grad_norm"], want["given_norm"],
                   rtol=1e-12)
    problems.close("learning rate", lr, want["lr"], rtol=1e-12)
    problems.weights("the step's", after, want["weights"], weights)
    if want["norm"] <= cfg.optim.max_grad_norm:
        problems.append(f"norm {want['norm']:.3g} under max_grad_norm: clipping untested")
    return problems


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("teacher") / "model", seed=1))


SFT_CASES = {
    "packed": {},
    "one conversation a row": {"sft.packing": False},
    # no warm-up, 3 steps: step 2's learning rate is on the cosine, 0.775 of the peak
    "cosine schedule": {"optim.warmup_steps": 0, "train.max_steps": 3},
    "distillation, kl_weight 0.5": {"kl_weight": 0.5},
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_an_sft_step_equals_the_float64_oracle(tiny, teacher, tmp_path, case):
    options = dict(SFT_CASES[case])
    kl_weight = options.pop("kl_weight", 0.0)
    trainer = _sft_trainer(tiny, tmp_path, teacher_path=teacher, kl_weight=kl_weight, **options)
    assert trainer.cfg.optim.schedule == "cosine"
    assert run_and_check_sft(trainer, teacher) == []


def test_the_oracle_catches_an_sft_loss_backpropagated_twice(tiny, tmp_path, monkeypatch):
    # The logged loss is computed apart from the one backpropagated: only the gradient shows it.
    real = SFTTrainer.micro_loss

    def doubled(self, *args):
        loss, logged, logps = real(self, *args)
        return 2 * loss, logged, logps

    monkeypatch.setattr(SFTTrainer, "micro_loss", doubled)
    problems = run_and_check_sft(_sft_trainer(tiny, tmp_path))
    assert any("gradient" in p for p in problems) and not any("logged loss" in p for p in problems), problems


# ------------------------------------------------------------------- two processes (FSDP2, gloo)

def _two_process_step(model, tmp_path, mutation=""):
    out = tmp_path / "seen.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(ROOT / "tests" / "oracle_worker.py"), str(out), model, str(tmp_path / "run"),
                          *([mutation] if mutation else [])],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return torch.load(out, weights_only=True)


# Rows cut by max_new_tokens left out, and the DAPO denominator: the tokens kept on every rank.
TWO_PROCESSES = {"rollout.stop_strings": ["y"], "grpo.mask_truncated": True, "grpo.loss_type": "dapo"}


def test_a_two_process_step_equals_the_float64_oracle(tiny, tmp_path):
    # Each rank samples, scores and normalizes its own groups, and FSDP sums the ranks' gradients
    # of losses divided by the global count: together, the one-process step of all rows. The
    # logged per-token means are the means over both ranks' tokens, which a mean of the ranks'
    # means is not: the ranks keep different numbers of tokens.
    seen = _two_process_step(tiny, tmp_path)
    assert len(seen["rows"]) == 32
    kept = [len(c) * w for (_, c), w in zip(seen["rows"], seen["loss_weight"])]
    assert sum(kept[:16]) != sum(kept[16:]), "both ranks keep as many tokens: their weighting untested"
    assert check_grpo(seen, _config(tiny, tmp_path / "run", **TWO_PROCESSES)) == []


def test_the_oracle_catches_a_rank_whose_gradient_is_dropped(tiny, tmp_path):
    problems = check_grpo(_two_process_step(tiny, tmp_path, "drop-rank-1"),
                          _config(tiny, tmp_path / "run", **TWO_PROCESSES))
    assert any("gradient" in p for p in problems), problems
