"""Rejection sampling (R1, Sec. 2.3.3): `train.py rejection-sample`.

K samples per prompt from a model, scored with the rule-based rewards; a sample is accepted when
every required reward gives it full marks (by default: correct and well formatted). For each
prompt the best accepted sample is kept (highest weighted reward, then shortest, then first), and
the kept conversations are written as a JSONL SFT set (Bespoke-Stratos layout, which
`data.load_records` and `train.py sft` read). The acceptance rate (prompts with a kept sample /
prompts) is printed and returned. SFT stage 2 mixes this set with general data
(`--data.mix_source`, `--data.mix_fraction` of `train.py sft`).

`sample_and_filter` is shared with distillation, where the teacher writes the traces. With
`--data.response_prefix` (distill: `--problems.response_prefix`) each prompt ends with the prefix,
and a kept reply is the prefix followed by the sample, so the SFT set teaches the whole reply.

To sample with a trained LoRA adapter, `--model.path` names its folder (a stage's final-adapter/):
the adapter is merged into its base at load (model/load.py), so the engine generates exactly as
from the stage's merged export final/, with no adapter matmuls per token.
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from r1train.data.problems import load_problems, training_prompts
from r1train.data.prompts import with_prefix
from r1train.model.engine import Engine, row_seed
from r1train.model.load import load_model
from r1train.model.memory import (
    ModelShape,
    available_memory,
    check_memory,
    compute_bytes,
    estimate_memory,
    local_processes,
)
from r1train.model.policy import PolicyModel
from r1train.rewards import REWARD_NAMES, entry_name, get_reward_functions, score_completions
from r1train.run.config import ConfigError
from r1train.run.dist import DistInfo, decoder_layers, shard_model
from r1train.run.folder import on_main
from r1train.run.loop import start_run
from r1train.run.sections import DataConfig, ModelConfig, TrainConfig, at_least, bad, check_rewards
from r1train.sft.cold_start import write_sft_jsonl


@dataclass
class SamplingConfig:
    samples_per_prompt: int = 4
    """K: completions sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 512
    """Completion budget in tokens (truncated completions are never accepted)."""
    prompts_per_batch: int = 8
    """Prompts generated together on one rank."""
    num_prompts: int = 0
    """Prompts to sample from (0 = all of the split)."""
    rewards: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    """Rewards computed for each sample, by name or as module:function / path/to/file.py:function
    (as --grpo.rewards); their weighted sum ranks the accepted ones."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward (empty = all 1.0)."""
    require: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    """Rewards that must be exactly 1.0 for a sample to be accepted (metric names of `rewards`)."""
    output: str = ""
    """Where the JSONL SFT set goes (a .jsonl path); empty = <train.output_dir>/sft.jsonl."""
    compile_decode: bool = False
    """Decode steps compiled (CUDA graphs on a GPU) over a static KV cache, as
    --rollout.compile_decode (model/static_decode.py). One process only."""

    def validate(self) -> None:
        """Fail at start, naming the option, before a model is loaded or a sample drawn.

        Shared by `rejection-sample` and `distill`; reward names are checked as GRPO checks
        `--grpo.rewards` (grpo/config.py)."""
        for option in ("samples_per_prompt", "prompts_per_batch", "max_new_tokens"):
            at_least(f"sampling.{option}", getattr(self, option), 1)
        at_least("sampling.num_prompts", self.num_prompts, 0, "(0 = all of the split)")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            bad("sampling.temperature", self.temperature, "must be > 0 and finite")
        if not 0 < self.top_p <= 1:
            bad("sampling.top_p", self.top_p, "must be in (0, 1]")
        check_rewards("sampling.rewards", self.rewards, self.reward_weights)
        names = [entry_name(r) for r in self.rewards]
        unknown = [n for n in self.require if n not in REWARD_NAMES and n not in names]
        if unknown:
            bad("sampling.require", unknown, f"unknown reward; valid names: {', '.join(REWARD_NAMES)}, or "
                                             f"the name of a function in --sampling.rewards")
        missing = [r for r in self.require if r not in names]
        if missing:
            bad("sampling.require", self.require, f"{missing} not in --sampling.rewards={self.rewards}")
        # write_sft_jsonl takes only .jsonl; finding out after hours of sampling loses them.
        if self.output and Path(self.output).suffix != ".jsonl":
            bad("sampling.output", self.output, "must be a .jsonl path (the SFT set is written as JSONL)")


@dataclass
class RejectionJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/rejection"))

    def validate(self, world_size: int = 1) -> None:
        """Fail at start, naming the option, before the model or the prompts load."""
        from r1train.run.sections import check_data, check_export_adapter, check_model, check_train
        check_model(self.model)
        if self.model.lora_rank:  # it samples from a frozen model: a new adapter would be B = 0
            raise ConfigError(f"--model.lora_rank={self.model.lora_rank}: rejection sampling trains no model; "
                              f"to sample with a trained LoRA adapter, give its folder (a stage's final-adapter/) "
                              f"as --model.path, with --model.lora_rank 0")
        check_data(self.data)
        check_train(self.train)
        check_export_adapter(self.model, self.train)
        self.sampling.validate()


def check_sampling_memory(engine: Engine, prompt_ids: list[list[int]], info: DistInfo, s: SamplingConfig,
                          tag: str) -> None:
    """Refuse sampling settings whose generation cannot fit in memory, naming the options; print
    the estimate otherwise (model/memory.py: K samples of each of a batch's prompts at once)."""
    shape = ModelShape.of(engine.model.lm)
    prompts = min(s.prompts_per_batch, -(-len(prompt_ids) // info.world_size))
    bf16 = info.distributed or engine.autocast is not nullcontext  # FSDP's mixed precision, or autocast
    est = estimate_memory(shape, gen_rows=prompts * s.samples_per_prompt,
                          prompt_tokens=max(map(len, prompt_ids), default=1), new_tokens=s.max_new_tokens,
                          compute_bytes=compute_bytes(info.device, shape.param_bytes, bf16), train=False,
                          world_size=info.world_size, sharded=info.distributed)
    est.held = est.weights
    check_memory(est, available_memory(info.device), tag, {
        "generation": "lower --sampling.samples_per_prompt, --sampling.prompts_per_batch or "
                      "--sampling.max_new_tokens",
        "weights": "use a smaller model, or shard it over more GPUs"},
        processes=local_processes(info.device, info.world_size), say=print)


def sample_and_filter(engine: Engine, records: list[dict], prompt_ids: list[list[int]], info: DistInfo,
                      s: SamplingConfig, seed: int, system_prompt: str | None = None,
                      tag: str = "rejection", response_prefix: str = "") -> tuple[list[dict], dict]:
    """K samples per prompt; keep the best accepted one per prompt. Returns (kept, stats) on every rank.

    A kept item is {"messages": [system, user, assistant], "problem", "answer", "rewards", "length"}.
    The memory the generation needs is checked first (`check_sampling_memory`; `tag` names the stage).
    `response_prefix`: the text that ends each prompt of `prompt_ids` (--data.response_prefix). The
    rewards score each sample after it, and a kept reply holds it: the assistant turn of the SFT
    row is the whole reply, prefix and sample, and SFT trains on all of it. "length" counts the
    sampled tokens.
    """
    on_main(info, lambda: check_sampling_memory(engine, prompt_ids, info, s, tag))
    rewards = get_reward_functions(s.rewards, None, s.reward_weights or None, device=info.device)
    names = [n for n, _, _ in rewards]
    mine = list(range(info.rank, len(records), info.world_size))
    n_batches = -(-len(records) // (info.world_size * s.prompts_per_batch))
    kept, sampled, accepted_samples = [], 0, 0
    for b in range(n_batches):
        idx = mine[b * s.prompts_per_batch:(b + 1) * s.prompts_per_batch]
        prompts = [prompt_ids[i] for i in idx for _ in range(s.samples_per_prompt)]
        seeds = [row_seed(seed, 0, i * s.samples_per_prompt + k) for i in idx for k in range(s.samples_per_prompt)]
        out = engine.generate(prompts, seeds, max_new_tokens=s.max_new_tokens,
                              temperature=s.temperature, top_p=s.top_p)
        if out is None:  # an idle rank joined the generation all the same (FSDP)
            continue
        recs = [records[i] for i in idx for _ in range(s.samples_per_prompt)]
        ids = [c[m.bool()].tolist() for c, m in zip(out.completion_ids, out.completion_mask)]
        texts = with_prefix(response_prefix, out.texts)
        scores = score_completions(rewards, texts, recs, ids)  # [N, F], NaN = no opinion
        totals = scores.nan_to_num(0.0) @ torch.tensor([w for _, _, w in rewards], dtype=torch.float64)  # [N]
        sampled += len(recs)
        for p, i in enumerate(idx):
            best = None
            for k in range(s.samples_per_prompt):
                j = p * s.samples_per_prompt + k
                vals = {n: None if math.isnan(v) else v for n, v in zip(names, scores[j].tolist())}
                if out.truncated[j] or any(vals[n] != 1.0 for n in s.require):
                    continue
                accepted_samples += 1
                total = float(totals[j])
                key = (-total, int(out.lengths[j]), k)
                if best is None or key < best[0]:
                    best = (key, texts[j], vals, int(out.lengths[j]))
            if best is not None:
                r = records[i]
                prompt = r["prompt"] if system_prompt is None else [{"role": "system", "content": system_prompt},
                                                                    r["prompt"][-1]]
                kept.append({"index": i, "messages": [*prompt, {"role": "assistant", "content": best[1]}],
                             "problem": r["problem"], "answer": r.get("answer", ""), "rewards": best[2],
                             "length": best[3]})
    if dist.is_initialized():
        parts = [None] * info.world_size
        dist.all_gather_object(parts, (kept, sampled, accepted_samples))
        kept = sorted((k for p in parts for k in p[0]), key=lambda k: k["index"])
        sampled = sum(p[1] for p in parts)
        accepted_samples = sum(p[2] for p in parts)
    stats = {"prompts": len(records), "kept": len(kept), "samples": sampled,
             "acceptance_rate": len(kept) / max(len(records), 1),
             "sample_acceptance_rate": accepted_samples / max(sampled, 1)}
    return kept, stats


def load_sampler(model_cfg: ModelConfig, out_dir: Path, info: DistInfo,
                 option: str = "--model.", compile_decode: bool = False) -> tuple[str, Engine]:
    """A frozen model for sampling: (its resolved path, its engine)."""
    path, tokenizer, lm = load_model(model_cfg, out_dir, info, trainable=False, option=option)
    policy = shard_model(PolicyModel(lm), decoder_layers(lm), info, reshard_after_forward=False)
    return path, Engine(policy, tokenizer, info, compile_decode=compile_decode,
                        compile_option="sampling.compile_decode")


def main(argv: list[str]) -> dict:
    from r1train.run.config import parse_args
    cfg = parse_args(RejectionJobConfig, argv, prog="rejection-sample")
    info, out, lock = start_run(cfg, "rejection")
    with lock:
        return _sample(cfg, info, out)


def _sample(cfg: RejectionJobConfig, info: DistInfo, out: Path) -> dict:
    train = load_problems(cfg.data, cfg.train.seed, held_out=False).train  # before the model: fails fast
    if cfg.sampling.num_prompts:
        train = train[: cfg.sampling.num_prompts]
    path, engine = load_sampler(cfg.model, out, info, compile_decode=cfg.sampling.compile_decode)
    records, prompt_ids, dropped = training_prompts(engine.tokenizer, train, cfg.data, "data",
                                                           "rejection", info.is_main, eos_ids=engine.eos_token_ids)
    kept, stats = sample_and_filter(engine, records, prompt_ids, info, cfg.sampling, cfg.train.seed,
                                    response_prefix=cfg.data.response_prefix)
    stats["dropped_long_prompts"] = dropped
    target = Path(cfg.sampling.output or out / "sft.jsonl")
    if info.is_main:
        (out / "rejection_stats.json").write_text(json.dumps(stats, indent=1))
        write_sft_jsonl(target, kept) if kept else None
        print(f"[rejection] kept {stats['kept']} of {stats['prompts']} prompts "
              f"(acceptance rate {stats['acceptance_rate']:.1%}; {stats['sample_acceptance_rate']:.1%} of "
              f"{stats['samples']} samples passed) -> {target if kept else 'nothing written'}", flush=True)
    if not kept:
        raise ConfigError(f"rejection sampling kept no sample from {stats['samples']}: the model never passed "
                          f"{cfg.sampling.require}; train it further or relax --sampling.require")
    return {**stats, "sft_data": str(target), "model": path}
