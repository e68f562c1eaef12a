"""Supervised fine-tuning with packing (R1's cold start and SFT stage 2): `train.py sft`.

One optimizer step, in named phases (`train_step`; the loop around it is `run.loop.Trainer`):
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

import math
from dataclasses import dataclass, field

import torch

from r1train.data.problems import check_response_prefix, encode_prompts, load_conversations
from r1train.data.prompts import SYSTEM_PROMPT
from r1train.data.task import TaskConfig
from r1train.evaluate import evaluate
from r1train.inspector.records import RECORDS_FILE, sft_row_record, token_texts
from r1train.model.engine import Engine
from r1train.model.load import load_model, lora_base
from r1train.model.policy import PolicyModel
from r1train.run.config import ConfigError
from r1train.run.dist import all_reduce_sum, decoder_layers, shard_model
from r1train.run.logging import write_jsonl
from r1train.run.loop import Trainer, epoch_order
from r1train.run.sections import EMBEDDED, EvalConfig, ModelConfig, OptimConfig, TrainConfig
from r1train.sft.packing import (
    IGNORE_INDEX,
    VARLEN_ATTENTION,
    collate_packed,
    collate_padded,
    pack,
    packed_model_inputs,
    tokenize_conversation,
)
from r1train.tools.stage import StageTools

# sft.eval_tools: a call's wall limit and the worker processes per rank (GRPO's rollout defaults)
EVAL_TOOL_TIMEOUT_S = 30.0
EVAL_TOOL_WORKERS = 2


@dataclass
class SFTDataConfig:
    source: str = EMBEDDED
    """'embedded' (worked solutions of the arithmetic task), or a file/folder/HF name with chat
    data (Bespoke-Stratos layout, or the JSONL that rejection-sample and distill write)."""
    schema: str = "auto"
    """Column layout of `source` (auto, bespoke, messages, ...: data/schemas.py); chat layouts
    (bespoke, messages) hold the conversations SFT trains on."""
    columns: list[str] = field(default_factory=list)
    """Rename the file's columns to a layout's: messages=conversation (see data.columns)."""
    system_prompt: str = SYSTEM_PROMPT
    """System prompt of the held-out problems' prompts and the embedded task (@path: a file;
    empty: none); chat data keeps its own."""
    split: str = "train"
    """Split of `source` to train on."""
    test_size: float = 0.05
    """Held-out fraction of a `source` with no test split, cut by seed (train.seed); with
    `eval_source` equal to `source` the held-out problems are exactly that cut."""
    mix_source: str = ""
    """General (non-reasoning) chat data mixed in, as in R1's SFT stage 2: a chat file (bespoke
    or messages layout), or 'embedded' for the tiny task's general chat turns; empty = none. A
    source that gives no conversation is refused; the rows each source gave are reported."""
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
    response_prefix: str = ""
    """Text that opens the assistant's turn of the held-out prompts (e.g. <think>, as a GRPO stage's
    --data.response_prefix), read in front of each completion by the evaluation; the training
    conversations are taught as they are."""
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
    eval_tools: list[str] = field(default_factory=list)
    """Tools the held-out evaluation's rows may call, as GRPO's --rollout.tools (multi-turn rows:
    the engine runs each call and continues the row), so that a model SFT-taught its calls is
    evaluated as its GRPO stage will run it. Empty = one assistant turn."""
    eval_max_turns: int = 4
    """With eval_tools: assistant segments per completion at most (GRPO's --rollout.max_turns)."""
    eval_tools_prompt: bool = True
    """With eval_tools: the tools' schemas go into each held-out prompt (GRPO's --rollout.tools_prompt)."""


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
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, world_size: int = 1) -> None:
        """Fail at start, naming the option, before any model or data loads (NaN fails too)."""
        from r1train.run.sections import (
            at_least,
            check_data,
            check_eval,
            check_export_adapter,
            check_model,
            check_optim,
            check_train,
            one_of,
        )

        s, d = self.sft, self.data
        check_model(self.model)
        check_data(d)
        check_optim(self.optim)
        check_train(self.train)
        check_export_adapter(self.model, self.train)
        check_eval(self.eval)
        at_least("sft.max_seq_len", s.max_seq_len, 8)
        at_least("sft.rows_per_micro_batch", s.rows_per_micro_batch, 1)
        if s.rows_per_step < 1 or s.rows_per_step % (s.rows_per_micro_batch * world_size):
            raise ConfigError(f"--sft.rows_per_step={s.rows_per_step}: must be a multiple of "
                              f"--sft.rows_per_micro_batch ({s.rows_per_micro_batch}) x world size ({world_size})")
        one_of("sft.overflow", s.overflow, ("truncate", "split", "drop"))
        at_least("sft.epochs", s.epochs, 0, "(0 = use train.max_steps)", finite_only=True)
        at_least("sft.eval_max_new_tokens", s.eval_max_new_tokens, 1)
        if s.eval_tools:
            from r1train.tools import ToolSpecError, load_tools
            try:
                load_tools(s.eval_tools)
            except ToolSpecError as e:
                raise ConfigError(f"--sft.eval_tools: {e}") from None
            at_least("sft.eval_max_turns", s.eval_max_turns, 1, "(assistant segments of a completion)")
        else:
            for opt in ("eval_max_turns", "eval_tools_prompt"):
                if getattr(s, opt) != getattr(SFTConfig, opt):  # the default
                    raise ConfigError(f"--sft.{opt}={getattr(s, opt)}: needs --sft.eval_tools "
                                      f"(no tool, one assistant turn)")
        if not 0 <= d.mix_fraction < 1:
            raise ConfigError(f"--data.mix_fraction={d.mix_fraction}: must be in [0, 1)")
        from r1train.data.mixing import parse_sources
        if len(parse_sources(d.source)) > 1 or parse_sources(d.source)[0][1] is not None:
            raise ConfigError(f"--data.source={d.source!r}: SFT reads one source; mix another in with "
                              f"--data.mix_source and --data.mix_fraction")
        if d.mix_fraction > 0 and not d.mix_source:
            raise ConfigError("--data.mix_fraction > 0 needs --data.mix_source")
        if self.train.max_steps < 1 and s.epochs <= 0:
            raise ConfigError("--train.max_steps must be >= 1 (or set --sft.epochs)")


class SFTTrainer(Trainer):
    tag = "sft"
    step_keys = ("loss", "grad_norm", "tokens_per_s")

    def __init__(self, cfg: SFTJobConfig, teacher=None, kl_weight: float = 0.0):
        """`teacher`: a PolicyModel (sharded like the student) for distillation's token-level KL."""
        super().__init__(cfg)
        self.teacher, self.kl_weight = teacher, kl_weight
        say = (lambda line: print(f"[sft] {line}", flush=True)) if self.main else None
        # before the model: a bad file fails in seconds
        train, evals = load_conversations(cfg.data, cfg.train.seed, say)
        path, tokenizer, lm = load_model(cfg.model, self.out, self.info)
        self.lm = lm
        base = lora_base(path, lm, self.info)  # before sharding: it hashes the whole base
        self.policy = shard_model(PolicyModel(lm), decoder_layers(lm), self.info)
        self.engine = Engine(self.policy, tokenizer, self.info, autocast=self.autocast)

        s = cfg.sft
        docs = [tokenize_conversation(tokenizer, conv, assistant_only=s.assistant_only) for conv in train]
        self.rows, self.pack_stats = pack(docs, s.max_seq_len, overflow=s.overflow)
        if not s.packing:  # one conversation per row, padded per micro-batch
            self.rows = [(ids[: s.max_seq_len], labels[: s.max_seq_len]) for ids, labels in docs]
        if not self.rows:
            raise ConfigError(f"--data.source={cfg.data.source!r}: no conversation left to train on "
                              f"after packing ({self.pack_stats})")
        if not any(label != IGNORE_INDEX for _, labels in map(_ids_and_labels, self.rows) for label in labels):
            # Every step would be loss 0, gradient 0: minutes of training on nothing.
            raise ConfigError(f"--sft.max_seq_len={s.max_seq_len}: no token to learn from is left: every "
                              f"conversation's trained turns lie past its first {s.max_seq_len} tokens (a long "
                              f"--data.system_prompt?). Raise --sft.max_seq_len, shorten the prompts, or use "
                              f"--sft.overflow split")
        if len(self.rows) < s.rows_per_step and self.main:
            # A small stage (a few rejection-sampled problems) still trains: a step then reads
            # the rows more than once, each pass in its own seeded order.
            print(f"[sft] warning: {len(self.rows)} packed rows for --sft.rows_per_step="
                  f"{s.rows_per_step}: each step passes over the data "
                  f"{s.rows_per_step / len(self.rows):.1f} times", flush=True)
        if s.epochs > 0:
            cfg.train.max_steps = max(1, math.ceil(s.epochs * len(self.rows) / s.rows_per_step))
        if self.main:
            print(f"[sft] {len(train)} conversations -> {len(self.rows)} rows of {s.max_seq_len} tokens; "
                  f"{self.pack_stats}", flush=True)
        check_response_prefix(tokenizer, cfg.data.response_prefix, "data", self.engine.eos_token_ids)
        self.tools = None  # sft.eval_tools: the evaluation's tools and worker pool (tools/stage.py)
        if s.eval_tools:
            self.tools = StageTools(s.eval_tools, tokenizer, max_turns=s.eval_max_turns,
                                    timeout_s=EVAL_TOOL_TIMEOUT_S, workers=EVAL_TOOL_WORKERS,
                                    schemas_in_prompt=s.eval_tools_prompt,
                                    prefix=cfg.data.response_prefix, option="--sft.eval_tools",
                                    model_path=cfg.model.path, sample=evals[0]["prompt"] if evals else None)
            evals = self.tools.prompts(evals)
            if self.main:
                print(f"[sft] evaluation with tools: {self.tools.describe()}", flush=True)
        self.eval_records, self.eval_ids, _ = encode_prompts(
            tokenizer, evals, response_prefix=cfg.data.response_prefix,
            tools=self.tools.template_schemas if self.tools else None)
        self.setup_training(self.policy, lm.config, tokenizer, lora_base=base)
        self.last_loss = float("nan")  # loss of step `self.step`; saved so a resume at max_steps has it
        self._training_attention()

    def step_rows(self, step: int) -> list[int]:
        """Row indices of this rank for `step` (1-based), from seeded epoch permutations."""
        k = self.cfg.sft.rows_per_step
        out = epoch_order(len(self.rows), self.cfg.train.seed, (step - 1) * k, k)
        # Contiguous per-rank slices: rank r's micro-batches are the ones a single process would
        # run in positions r*per_rank.., so N ranks and one process compute the same micro-batches.
        per_rank = k // self.info.world_size
        return out[self.info.rank * per_rank:(self.info.rank + 1) * per_rank]

    def collate(self, rows: list) -> tuple[dict, dict]:
        """(a micro-batch's tensors, its attention arguments)."""
        if self.cfg.sft.packing:
            # Documents of a packed row never see each other: one causal SDPA call per document.
            batch = collate_packed(rows, self.tokenizer.pad_token_id)
            return batch, {"cu_seqlens": packed_model_inputs(batch, VARLEN_ATTENTION)["cu_seqlens"]}
        return collate_padded(rows, self.tokenizer.pad_token_id), {}  # right padding: causal suffices

    def micro_loss(self, batch: dict, attention: dict, num_tokens: torch.Tensor):
        """(summed NLL of the label tokens / the step's global label-token count, the NLL sum, the
        [M] label log-probs, detached)."""
        dev = self.info.device
        ids, pos, labels = batch["input_ids"].to(dev), batch["position_ids"].to(dev), batch["labels"].to(dev)
        if self.teacher is None:
            logps = self.policy.label_logprobs(ids, pos, labels, use_cache=False, **attention)  # [M]
            return -logps.sum() / num_tokens.clamp(min=1), -logps.detach().sum(), logps.detach()
        # Distillation with a token-level KL(teacher || student) on the same label positions.
        logps, logits = self.policy.label_logprobs(ids, pos, labels, return_logits=True, use_cache=False,
                                                   **attention)  # [M], [M, V]
        with torch.no_grad():
            _, t_logits = self.teacher.label_logprobs(ids, pos, labels, return_logits=True, use_cache=False,
                                                      **attention)
        v = min(logits.shape[-1], t_logits.shape[-1])  # embedding tables may be padded differently
        t_logp = t_logits[:, :v].log_softmax(-1)
        kl = (t_logp.exp() * (t_logp - logits[:, :v].log_softmax(-1))).sum(-1)  # [M]
        loss = (-logps.sum() + self.kl_weight * kl.sum()) / num_tokens.clamp(min=1)
        return loss, -logps.detach().sum(), logps.detach()

    def train_step(self) -> dict:
        """Rows, forward, the step's token-level NLL (global count), one optimizer update."""
        s, info = self.cfg.sft, self.info
        idx = self.step_rows(self.step)
        micro = [idx[i:i + s.rows_per_micro_batch] for i in range(0, len(idx), s.rows_per_micro_batch)]
        batches = [self.collate([self.rows[i] for i in m]) for m in micro]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b, _ in batches)
        num_tokens = all_reduce_sum(torch.tensor(float(local_tokens), device=info.device))
        nll = torch.zeros((), device=info.device)
        t = self.cfg.train
        keep = t.token_records if self.main and t.sample_every and self.step % t.sample_every == 0 else 0
        kept = []
        for m, (batch, attention) in zip(micro, batches):
            self.stop_point()  # no update yet this step: a stop saves the previous step
            with self.autocast():
                loss, part, logps = self.micro_loss(batch, attention, num_tokens)
            loss.backward()  # FSDP sums the ranks' gradients: the count above is global
            nll += part
            if len(kept) < keep:
                lengths = [len(_ids_and_labels(self.rows[i])[0]) for i in m]
                kept += self.token_records(batch, logps, lengths, keep - len(kept), first_row=len(kept))
        nll = all_reduce_sum(nll) / num_tokens.clamp(min=1)
        norm, stepped = self.optimizer_step(nll)
        if kept:
            write_jsonl(self.out / RECORDS_FILE, kept)
        self.last_loss = float(nll)
        return {"loss": self.last_loss, "grad_norm": float(norm), "tokens": float(num_tokens),
                "skipped_update": float(not stepped), "packing_efficiency": self.pack_stats.efficiency}

    def token_records(self, batch: dict, logps: torch.Tensor, lengths: list[int], count: int,
                      first_row: int) -> list[dict]:
        """Per-token records (inspector/records.py) of the first `count` rows of a micro-batch
        (`lengths`: their tokens without padding), from its [M] label log-probs (row-major over
        the label positions)."""
        target = batch["labels"][:, 1:] != IGNORE_INDEX  # [B, L-1]: the label at t+1 is predicted at t
        per_row = target.sum(-1).tolist()
        out, start = [], 0
        for b in range(min(count, target.shape[0])):
            n, ids = lengths[b], batch["input_ids"][b]
            is_label = torch.cat([torch.zeros(1, dtype=torch.bool), target[b]])  # [L]
            doc = batch["segment_ids"][b] if "segment_ids" in batch else torch.zeros_like(ids)  # [L]
            out.append(sft_row_record(self.step, first_row + b, token_texts(self.tokenizer, ids[:n].tolist()),
                                      -logps[start:start + per_row[b]].float(), is_label[:n], doc[:n]))
            start += per_row[b]
        return out

    def evaluate(self) -> dict | None:
        if not self.eval_records:
            return None
        # Generation has no document boundaries: plain SDPA with the KV cache, then back.
        self.lm.set_attn_implementation(self.cfg.model.attn_implementation)
        e = self.cfg.eval
        res = evaluate(self.engine, self.eval_records, self.eval_ids, self.info,
                       max_new_tokens=self.cfg.sft.eval_max_new_tokens, seed=self.cfg.train.seed,
                       temperature=e.temperature if e.samples > 1 else 0.0, samples=e.samples,
                       return_samples=len(self.eval_records), response_prefix=self.cfg.data.response_prefix,
                       turns=self.tools.episodes if self.tools else None)
        self._training_attention()
        return res

    def _training_attention(self):
        if self.cfg.sft.packing:
            self.lm.set_attn_implementation(VARLEN_ATTENTION)

    def trainer_state(self) -> dict:
        return {"last_loss": self.last_loss}

    def load_trainer_state(self, state: dict, checkpoint) -> None:
        self.last_loss = float(state["last_loss"])

    def final_result(self) -> dict:
        return {"final_loss": self.last_loss}


def main(argv: list[str]) -> dict:
    from r1train.run.config import parse_args
    return SFTTrainer(parse_args(SFTJobConfig, argv, prog="sft")).train()


def _ids_and_labels(row) -> tuple[list[int], list[int]]:
    """A packed row's or a plain (ids, labels) row's ids and labels."""
    return (row.input_ids, row.labels) if hasattr(row, "labels") else row
