"""Distillation (R1, Sec. 2.4): `train.py distill`.

A teacher generates reasoning traces for a set of problems (K samples each, kept only when the
rewards pass them: correct and well formatted, as R1 kept only correct samples); the student is
then fine-tuned on those traces with the SFT trainer. That is how DeepSeek distilled R1 into
Qwen and Llama students: plain SFT, no RL.

Optionally (`--distill.kl_weight > 0`, only when teacher and student share a tokenizer), each
label token also gets a KL(teacher || student) term on the full next-token distribution: the
student then learns from the teacher's whole distribution, not only from its sampled token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from r1train.data.problems import load_problems, training_prompts
from r1train.run.config import ConfigError
from r1train.run.dist import DistInfo
from r1train.run.loop import start_run
from r1train.run.sections import DataConfig, ModelConfig, at_least, check_data, one_of
from r1train.sft.cold_start import write_sft_jsonl
from r1train.sft.packing import VARLEN_ATTENTION
from r1train.sft.rejection import SamplingConfig, load_sampler, sample_and_filter
from r1train.sft.trainer import SFTJobConfig, SFTTrainer


@dataclass
class DistillConfig:
    teacher: str = ""
    """Teacher model folder or hub name (required)."""
    teacher_chat_template: str = ""
    """A Jinja chat template file for the teacher's tokenizer instead of its own (--model.chat_template
    is the student's). Empty: the teacher's."""
    teacher_system_role: str = "auto"
    """The teacher's template without a system role: auto | merge | error (as --model.system_role)."""
    kl_weight: float = 0.0
    """Weight of the token-level KL(teacher || student) added to the NLL (0 = plain SFT on traces).
    Needs teacher and student to share a tokenizer."""
    traces: str = ""
    """An existing traces JSONL to train on (skips generation); empty = generate them."""


@dataclass
class DistillJobConfig(SFTJobConfig):
    distill: DistillConfig = field(default_factory=DistillConfig)
    problems: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def validate(self, world_size: int = 1) -> None:
        super().validate(world_size)
        if not self.distill.teacher and not self.distill.traces:
            raise ConfigError("--distill.teacher is required (or --distill.traces with ready traces)")
        at_least("distill.kl_weight", self.distill.kl_weight, 0, finite_only=True)
        one_of("distill.teacher_system_role", self.distill.teacher_system_role, ("auto", "merge", "error"))
        if self.distill.kl_weight > 0 and not self.distill.teacher:
            raise ConfigError("--distill.kl_weight > 0 needs --distill.teacher")
        check_data(self.problems, "problems")
        self.sampling.validate()
        if self.sampling.output:
            raise ConfigError(f"--sampling.output={self.sampling.output!r}: not used by distill; the traces go "
                              f"to --distill.traces or <train.output_dir>/traces.jsonl")


def main(argv: list[str]) -> dict:
    from r1train.run.config import parse_args
    cfg = parse_args(DistillJobConfig, argv, prog="distill")
    info, out, lock = start_run(cfg, "distill")
    with lock:
        return _distill(cfg, info, out)


def _distill(cfg: DistillJobConfig, info: DistInfo, out: Path) -> dict:
    teacher = None
    traces = Path(cfg.distill.traces) if cfg.distill.traces else out / "traces.jsonl"
    stats = {}
    if not cfg.distill.traces:  # the problems load before the teacher: a bad source fails fast
        problems = load_problems(cfg.problems, cfg.train.seed, held_out=False, option="problems").train
        if cfg.sampling.num_prompts:
            problems = problems[: cfg.sampling.num_prompts]
    if cfg.distill.teacher:
        d = cfg.distill
        tcfg = ModelConfig(path=d.teacher, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                           chat_template=d.teacher_chat_template, system_role=d.teacher_system_role)
        _, teacher = load_sampler(tcfg, out, info, option="--distill.teacher_",
                                  compile_decode=cfg.sampling.compile_decode)
        t_tok = teacher.tokenizer
    if not cfg.distill.traces:
        # 1. the teacher writes traces for the problems
        records, prompt_ids, dropped = training_prompts(t_tok, problems, cfg.problems, "problems",
                                                               "distill", info.is_main, eos_ids=teacher.eos_token_ids)
        kept, stats = sample_and_filter(teacher, records, prompt_ids, info, cfg.sampling, cfg.train.seed,
                                         tag="distill", response_prefix=cfg.problems.response_prefix)
        stats["dropped_long_prompts"] = dropped
        if not kept:
            raise ConfigError(f"distill: the teacher passed none of {stats['samples']} samples "
                              f"({cfg.sampling.require}); nothing to train the student on")
        if info.is_main:
            write_sft_jsonl(traces, kept)
            (out / "trace_stats.json").write_text(json.dumps(stats, indent=1))
            print(f"[distill] teacher kept {stats['kept']} of {stats['prompts']} problems "
                  f"({stats['acceptance_rate']:.1%}) -> {traces}", flush=True)
        from r1train.run.dist import barrier
        barrier()
    # 2. the student is fine-tuned on the traces
    cfg.data.source, cfg.data.schema, cfg.data.split = str(traces), "bespoke", "all"
    kl_teacher = None
    if cfg.distill.kl_weight > 0:
        from r1train.model.load import load_tokenizer, resolve_model_path
        cfg.model.path = resolve_model_path(cfg.model.path, out, info, seed=cfg.model.seed,
                                            size=cfg.model.embedded_size)
        m = cfg.model
        s_tok = load_tokenizer(m.tokenizer or m.path, m.trust_remote_code, m.chat_template, m.system_role)
        if s_tok.get_vocab() != t_tok.get_vocab():
            raise ConfigError("--distill.kl_weight > 0: teacher and student tokenizers differ; "
                              "a token-level KL needs the same vocabulary (use kl_weight 0)")
        kl_teacher = teacher.model.eval()
        if cfg.sft.packing:
            kl_teacher.lm.set_attn_implementation(VARLEN_ATTENTION)
    else:
        teacher = None  # free it before the student trains
    result = SFTTrainer(cfg, teacher=kl_teacher, kl_weight=cfg.distill.kl_weight).train()
    return {**result, **{f"traces/{k}": v for k, v in stats.items()}, "traces": str(traces)}
