"""Supervised fine-tuning with packing (R1's cold start and SFT stage 2): `train.py sft`.

One optimizer step, in named phases:
  1. rows     - this step's packed rows, from a seeded epoch-wise permutation (resumable)
  2. forward  - decoder hidden states; log-probs of the label tokens only, through the fused
                log-prob kernel (no [tokens, vocab] logits)
  3. loss     - token-level mean negative log-likelihood over the whole optimizer step (all
                micro-batches and ranks), so accumulation and data parallelism reproduce the
                large-batch gradient exactly
  4. update   - gradient clipping, AdamW, warm-up + cosine/constant schedule
  5. log, evaluate (held-out accuracy / format when the data has answers), checkpoint
"""
from __future__ import annotations

import json
import math
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, field

import torch

from data.task import TaskConfig, task_records
from grpo.config import EMBEDDED, ModelConfig, OptimConfig, TrainConfig
from grpo.evaluate import encode_prompts, evaluate
from infra.checkpoint import CheckpointManager, export_hf
from infra.config import ConfigError, format_config, to_dict
from infra.dist import all_reduce_sum, decoder_layers, shard_model
from infra.logging import MetricsLogger, ProgressBar, say, step_line
from infra.loop import (StepInterrupted, check_finite_params, epoch_order, eval_due, open_run, record_eval,
                        save_and_stop, start_run, stop_agreed, stop_before_update, stop_signals)
from infra.model import build_optimizer, build_scheduler, grad_norm_and_clip, load_model
from infra.resume import apply_optimizer_options, check_resume
from sft.packing import (VARLEN_ATTENTION, collate_packed, collate_padded, pack, packed_model_inputs,
                         tokenize_conversation)


@dataclass
class SFTDataConfig:
    source: str = EMBEDDED
    """'embedded' (worked solutions of the arithmetic task), or a file/folder/HF name with chat
    data (Bespoke-Stratos layout, or the JSONL that rejection-sample and distill write)."""
    schema: str = "auto"
    """Column layout of `source` (auto, bespoke, numina, gsm8k, math)."""
    split: str = "train"
    """Split of `source` to train on."""
    test_size: float = 0.05
    """Held-out fraction of a `source` with no test split, cut by seed (train.seed); with
    `eval_source` equal to `source` the held-out problems are exactly that cut."""
    mix_source: str = ""
    """General (non-reasoning) chat data mixed in, as in R1's SFT stage 2: a chat file, or
    'embedded' for the tiny task's general chat turns; empty = none."""
    mix_fraction: float = 0.0
    """Share of the mixed set's conversations drawn from `mix_source` (0..1)."""
    num_train: int = 2000
    """Conversations generated for the embedded task (ignored for files)."""
    eval_source: str = ""
    """Held-out problems with answers for accuracy/format evaluation, chosen as GRPO chooses them
    (data.loaders.load_held_out): equal to `source`: the part training does not read (its test
    split, or the test side of the seeded `test_size` cut); another source: its test split if it
    names one, else all of its rows. Empty: the embedded task's test split when source is
    embedded, else no accuracy evaluation."""
    num_eval: int = 200
    """Held-out problems evaluated."""
    on_bad_row: str = "error"
    """error or skip (counted)."""
    task: TaskConfig = field(default_factory=TaskConfig)


@dataclass
class SFTConfig:
    max_seq_len: int = 4096
    """Length of a packed row in tokens."""
    rows_per_step: int = 16
    """Packed rows per optimizer step, over all ranks (the global batch; the same on any world size)."""
    rows_per_micro_batch: int = 1
    """Packed rows per forward/backward on one rank; gradient accumulation covers the rest."""
    packing: bool = True
    """Pack conversations into rows (best-fit decreasing); off: one conversation per row."""
    assistant_only: bool = True
    """Loss on assistant tokens only (system and user tokens are context)."""
    overflow: str = "truncate"
    """Conversations longer than max_seq_len: truncate, split or drop."""
    epochs: float = 0.0
    """When > 0, sets train.max_steps to cover this many passes over the packed rows."""
    eval_max_new_tokens: int = 512
    """Completion budget of the held-out evaluation."""


@dataclass
class SFTOptimConfig(OptimConfig):
    lr: float = 2e-5
    """Peak learning rate (tutorial's SFT value; R1 distillation used 1e-5..2e-5)."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    schedule: str = "cosine"
    """constant or cosine."""
    weight_decay: float = 0.01
    """AdamW weight decay."""


@dataclass
class SFTJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    optim: SFTOptimConfig = field(default_factory=SFTOptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/sft", max_steps=1000))

    def validate(self, world_size: int = 1) -> None:
        """Fail at start, naming the option, before any model or data loads (NaN fails too)."""
        from grpo.config import bad, check_data, check_model, check_optim, check_train, finite, one_of

        s, d = self.sft, self.data
        check_model(self.model)
        check_data(d)
        check_optim(self.optim)
        check_train(self.train)
        if s.max_seq_len < 8:
            bad("sft.max_seq_len", s.max_seq_len, "must be >= 8")
        if s.rows_per_micro_batch < 1:
            bad("sft.rows_per_micro_batch", s.rows_per_micro_batch, "must be >= 1")
        if s.rows_per_step < 1 or s.rows_per_step % (s.rows_per_micro_batch * world_size):
            raise ConfigError(f"--sft.rows_per_step={s.rows_per_step}: must be a multiple of "
                              f"--sft.rows_per_micro_batch ({s.rows_per_micro_batch}) x world size ({world_size})")
        one_of("sft.overflow", s.overflow, ("truncate", "split", "drop"))
        if not (finite(s.epochs) and s.epochs >= 0):
            bad("sft.epochs", s.epochs, "must be a finite number >= 0 (0 = use train.max_steps)")
        if s.eval_max_new_tokens < 1:
            bad("sft.eval_max_new_tokens", s.eval_max_new_tokens, "must be >= 1")
        if not 0 <= d.mix_fraction < 1:
            raise ConfigError(f"--data.mix_fraction={d.mix_fraction}: must be in [0, 1)")
        if d.mix_fraction > 0 and not d.mix_source:
            raise ConfigError("--data.mix_fraction > 0 needs --data.mix_source")
        if self.train.max_steps < 1 and s.epochs <= 0:
            raise ConfigError("--train.max_steps must be >= 1 (or set --sft.epochs)")


def load_conversations(cfg: SFTJobConfig) -> tuple[list[list[dict]], list[dict]]:
    """Training conversations (message lists) and held-out problems (records with answers)."""
    d = cfg.data
    from data import load_held_out, load_records
    if d.source == EMBEDDED:
        train = [r["messages"] for r in task_records(d.task, d.num_train, seed=cfg.train.seed, split="train")]
    else:
        recs = load_records(d.source, schema=d.schema, split=d.split, on_bad_row=d.on_bad_row,
                            test_size=d.test_size, seed=cfg.train.seed).records
        missing = [i for i, r in enumerate(recs) if "messages" not in r]
        if missing:
            raise ConfigError(f"--data.source={d.source!r}: record {missing[0] + 1} has no assistant reply "
                              f"(SFT needs chat data, e.g. the Bespoke-Stratos layout)")
        train = [r["messages"] for r in recs]
    if d.mix_source and d.mix_fraction > 0:
        if d.mix_source == EMBEDDED:
            from data.task import general_chat_records
            mix = [r["messages"] for r in general_chat_records(1000, seed=cfg.train.seed)]
        else:
            mix = [r["messages"] for r in load_records(d.mix_source, split="all", on_bad_row=d.on_bad_row).records
                   if "messages" in r]
        want = int(round(len(train) * d.mix_fraction / (1 - d.mix_fraction)))
        g = torch.Generator().manual_seed(cfg.train.seed)
        train += [mix[i] for i in torch.randint(len(mix), (want,), generator=g).tolist()] if mix else []
    if d.eval_source:
        evals = load_held_out(d.source, d.eval_source, train_split=d.split, schema=d.schema,
                              on_bad_row=d.on_bad_row, test_size=d.test_size,
                              seed=cfg.train.seed).records[: d.num_eval]
    elif d.source == EMBEDDED:
        evals = task_records(d.task, d.num_eval, seed=cfg.train.seed, split="test")
    else:
        evals = []
    return train, list(evals)


class SFTTrainer:
    def __init__(self, cfg: SFTJobConfig, teacher=None, kl_weight: float = 0.0):
        """`teacher`: a PolicyModel (sharded like the student) for distillation's token-level KL."""
        self.cfg = cfg
        self.teacher, self.kl_weight = teacher, kl_weight
        self.info, self.out = start_run(cfg, "sft")
        self.main = self.info.is_main
        train, evals = load_conversations(cfg)  # before the model: a bad file fails in seconds
        path, self.tokenizer, lm = load_model(cfg.model, self.out, self.info)
        self.hf_config = lm.config
        from grpo.rollout import PolicyModel
        self.lm = lm
        self.model = shard_model(PolicyModel(lm), decoder_layers(lm), self.info)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.info.device.type == "cuda" and not self.info.distributed else nullcontext())

        s = cfg.sft
        docs = [tokenize_conversation(self.tokenizer, conv, assistant_only=s.assistant_only) for conv in train]
        self.rows, self.pack_stats = pack(docs, s.max_seq_len, overflow=s.overflow)
        if not s.packing:  # one conversation per row, padded per micro-batch
            self.rows = [(ids[: s.max_seq_len], labels[: s.max_seq_len]) for ids, labels in docs]
        self.rows_per_step = s.rows_per_step
        if not self.rows:
            raise ConfigError(f"--data.source={cfg.data.source!r}: no conversation left to train on "
                              f"after packing ({self.pack_stats})")
        if len(self.rows) < self.rows_per_step and self.main:
            # A small stage (a few rejection-sampled problems) still trains: a step then reads
            # the rows more than once, each pass in its own seeded order.
            print(f"[sft] warning: {len(self.rows)} packed rows for --sft.rows_per_step="
                  f"{s.rows_per_step}: each step passes over the data "
                  f"{s.rows_per_step / len(self.rows):.1f} times", flush=True)
        if s.epochs > 0:
            cfg.train.max_steps = max(1, math.ceil(s.epochs * len(self.rows) / self.rows_per_step))
        if self.main:
            print(f"[sft] {len(train)} conversations -> {len(self.rows)} rows of {s.max_seq_len} tokens; "
                  f"{self.pack_stats}", flush=True)
        self.eval_records, self.eval_ids, _ = encode_prompts(self.tokenizer, evals)

        o = cfg.optim
        self.optimizer = build_optimizer(self.model.parameters(), o.lr, o.weight_decay, (o.beta1, o.beta2))
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=o.warmup_steps, max_steps=cfg.train.max_steps,
                                         schedule=o.schedule, min_lr_ratio=o.min_lr_ratio)
        self.ckpt = CheckpointManager(self.out / "checkpoints", self.info, cfg.train.keep_last)
        self.logger = MetricsLogger(self.out, self.main, cfg.train.wandb_project if cfg.train.wandb else None,
                                    config=to_dict(cfg))
        self.step = 0
        self.last_loss = float("nan")  # loss of step `self.step`; saved so a resume at max_steps has it
        self.stop_requested = False
        self.eval_history: list[dict] = []

    def step_rows(self, step: int) -> list[int]:
        """Row indices of this rank for `step` (1-based), from seeded epoch permutations."""
        k = self.rows_per_step
        out = epoch_order(len(self.rows), self.cfg.train.seed, (step - 1) * k, k)
        # Contiguous per-rank slices: rank r's micro-batches are the ones a single process would
        # run in positions r*per_rank.., so N ranks and one process compute the same micro-batches.
        per_rank = k // self.info.world_size
        return out[self.info.rank * per_rank:(self.info.rank + 1) * per_rank]

    def micro_loss(self, rows: list, num_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL of the label tokens / the step's global label-token count."""
        dev = self.info.device
        if self.cfg.sft.packing:
            # Documents of a packed row never see each other: one causal SDPA call per document.
            batch = collate_packed(rows, self.tokenizer.pad_token_id)
            inputs = packed_model_inputs(batch, VARLEN_ATTENTION)
            extra = {"cu_seqlens": inputs["cu_seqlens"], "use_cache": False}
            mask = None
        else:
            batch = collate_padded(rows, self.tokenizer.pad_token_id)
            extra, mask = {"use_cache": False}, None  # right padding: causal attention suffices
        args = (batch["input_ids"].to(dev), mask, batch["position_ids"].to(dev))
        labels = batch["labels"].to(dev)
        if self.teacher is None:
            logps = self.model(*args, labels=labels, **extra)  # [M]
            return -logps.sum() / num_tokens.clamp(min=1), -logps.detach().sum()
        # Distillation with a token-level KL(teacher || student) on the same label positions.
        logps, logits = self.model(*args, labels=labels, return_logits=True, **extra)  # [M], [M, V]
        with torch.no_grad():
            _, t_logits = self.teacher(*args, labels=labels, return_logits=True, **extra)
        v = min(logits.shape[-1], t_logits.shape[-1])  # embedding tables may be padded differently
        t_logp = t_logits[:, :v].log_softmax(-1)
        kl = (t_logp.exp() * (t_logp - logits[:, :v].log_softmax(-1))).sum(-1)  # [M]
        loss = (-logps.sum() + self.kl_weight * kl.sum()) / num_tokens.clamp(min=1)
        return loss, -logps.detach().sum()

    def _label_tokens(self, rows: list) -> int:
        if self.cfg.sft.packing:
            return sum(sum(1 for l in r.labels[1:] if l != -100) for r in rows)
        return sum(sum(1 for l in labels[1:] if l != -100) for _, labels in rows)

    def train_step(self) -> dict:
        s, info = self.cfg.sft, self.info
        idx = self.step_rows(self.step)
        micro = [idx[i:i + s.rows_per_micro_batch] for i in range(0, len(idx), s.rows_per_micro_batch)]
        batches = [[self.rows[i] for i in m] for m in micro]
        local_tokens = sum(self._label_tokens(b) for b in batches)
        num_tokens = all_reduce_sum(torch.tensor(float(local_tokens), device=info.device))
        nll = torch.zeros((), device=info.device)
        for b in batches:
            # A safe point: no update yet this step, so a stop saves the previous step (infra/loop.py).
            if stop_agreed(self.stop_requested, info.device):
                raise StepInterrupted
            with self.autocast:
                loss, part = self.micro_loss(b, num_tokens)
            # FSDP averages gradients over ranks; the normalization is already global.
            (loss * info.world_size).backward()
            nll += part
        norm = grad_norm_and_clip(self.model.parameters(), self.cfg.optim.max_grad_norm)
        nll = all_reduce_sum(nll)
        ok = bool(torch.isfinite(norm)) and bool(torch.isfinite(nll))
        if ok:
            self.optimizer.step()
            check_finite_params(self.model.parameters(), self.step, self.ckpt, info.device, "sft")
        self.optimizer.zero_grad(set_to_none=True)
        if not ok and self.main:
            say(f"[sft] step {self.step}: non-finite loss or gradient, update skipped")
        return {"loss": float(nll / num_tokens.clamp(min=1)), "grad_norm": float(norm),
                "tokens": float(num_tokens), "skipped_update": float(not ok)}

    def run_eval(self) -> dict | None:
        if not self.eval_records:
            return None
        # Generation has no document boundaries: plain SDPA with the KV cache, then back.
        self.lm.set_attn_implementation(self.cfg.model.attn_implementation)
        res = evaluate(self.model, self.tokenizer, self.eval_records, self.eval_ids, self.info,
                       max_new_tokens=self.cfg.sft.eval_max_new_tokens, seed=self.cfg.train.seed,
                       return_samples=len(self.eval_records))
        self._training_attention()
        return record_eval(self, "sft", res)

    def _training_attention(self):
        if self.cfg.sft.packing:
            self.lm.set_attn_implementation(VARLEN_ATTENTION)

    def _on_signal(self, signum, frame):
        self.stop_requested = True

    def save(self):
        state = {"scheduler": self.scheduler.state_dict(), "eval_history": json.dumps(self.eval_history),
                 "last_loss": self.last_loss}
        self.ckpt.save(self.step, self.model, self.optimizer, state, format_config(self.cfg))

    def train(self) -> dict:
        t = self.cfg.train
        latest = open_run(self.ckpt, self.out, t.resume, "sft", format_config(self.cfg))
        if latest is not None:
            changed = check_resume(latest, self.cfg, "sft")  # refuses a different run's options
            state = self.ckpt.load(latest, self.model, self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            apply_optimizer_options(self.optimizer, self.scheduler, self.cfg.optim)
            self.step = int(state["step"])
            self.eval_history = json.loads(state["eval_history"])
            self.last_loss = float(state.get("last_loss", float("nan")))  # absent in older checkpoints
            self.logger.truncate_after(self.step)
            if self.main:
                print(f"[sft] resumed from {latest} at step {self.step}", flush=True)
                for line in changed:
                    print(line, flush=True)
        # Exits in reverse order: the old signal handlers come back, then the logger closes.
        with closing(self.logger), stop_signals(self._on_signal):
            self._training_attention()
            if self.step == 0:
                self.run_eval()
            bar = ProgressBar(t.max_steps, "sft", enabled=self.main and t.progress, start=self.step)
            while self.step < t.max_steps:
                self.step += 1
                t0 = time.perf_counter()
                try:
                    m = self.train_step()
                except StepInterrupted:
                    return stop_before_update(self, "sft")
                self.last_loss = m["loss"]
                self.scheduler.step()
                dt = time.perf_counter() - t0
                m.update(lr=self.scheduler.get_last_lr()[0], tokens_per_s=m["tokens"] / dt, **{"time/step": dt},
                         packing_efficiency=self.pack_stats.efficiency)
                self.logger.log(m, self.step)
                if self.main and self.step % t.log_every == 0:
                    say(step_line(self.step, t.max_steps, m, ["loss", "grad_norm", "lr", "tokens_per_s"]))
                bar.update(1, f"loss={m['loss']:.3f}")
                if eval_due(self.step, t):
                    self.run_eval()
                save, stop = save_and_stop(self.step, t, self.info.device, self.stop_requested)
                if save:
                    self.save()
                if stop:
                    bar.close()
                    return {"stopped": True, "step": self.step}
            bar.close()
            # A run resumed from its last step may have evaluated it already (killed during the
            # export, or run again once finished): reuse that result rather than log it twice.
            done = bool(self.eval_history) and self.eval_history[-1]["step"] == self.step
            final = (self.eval_history[-1] if done else self.run_eval()) or {}
            self.save()
            if t.export:
                export_hf(self.model, self.hf_config, self.tokenizer, self.out / "final", self.info, prefix="lm.",
                          config_text=format_config(self.cfg))
            result = {**final, "final_loss": self.last_loss,
                      "eval_history": self.eval_history}
            if self.eval_history:
                result["initial"] = self.eval_history[0]
            return result


def main(argv: list[str]) -> dict:
    from infra.config import parse_args
    return SFTTrainer(parse_args(SFTJobConfig, argv, prog="sft")).train()
