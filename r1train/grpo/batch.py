"""The data of one GRPO step on one rank, typed: every phase reads and fills the same tensors.

The rollout's tensors are collated once into `[N, P + T]` sequences (prompts left-padded to P,
completions right-padded to T); scoring adds rewards and advantages, the log-prob phase old and
reference log-probs (and the entropies that grpo.top_entropy_quantile selects tokens by), and the
update slices micro-batches out of it. The sampler's own log-probs come with the rollout. A micro-batch is trimmed to
its own rows' longest prompt and completion, so that it computes no more padding than a batch
collated from those rows alone would (and the same numbers).

`PackedRows` is the padding-free form of a micro-batch for the training passes (`grpo.packing`):
one row holding each distinct prompt once, each followed by its completions,

    [ prompt a | completion a1 | completion a2 | ... | prompt b | completion b1 | ... ]

where completion i attends to its prompt and itself only (model/attention.py) and its position
ids continue from the prompt's. Its log-probs equal the padded pass's; the prompt's gradient is
the sum over the completions that read it. A group's prompt is computed once instead of G times,
and no token is padding.

Multi-turn rows (rollout.tools): a completion is [segment 1 | tool turn 1 | segment 2 | ...], the
tool turns inserted by the engine. `completion_mask` covers all of it (attended to, computed in
every pass, packed or padded, as one completion), `model_mask` the segments only, and `loss_mask`
is their product: the loss, its |o_i| and token counts, KL, entropy, the entropy quantile and the
rollout correction see the model's own tokens only (the mask of verl's `response_mask`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from r1train.model.engine import Rollout, position_ids_from_mask


@dataclass
class GRPOBatch:
    input_ids: torch.Tensor        # [N, P + T] prompt (left-padded) then completion (right-padded)
    attention_mask: torch.Tensor   # [N, P + T] 1 on real prompt and completion tokens
    prompt_len: int                # P: completion token t sits at column P + t
    completion_ids: torch.Tensor   # [N, T] pad after each completion's end
    completion_mask: torch.Tensor  # [N, T] 1 on completion tokens (up to and including EOS)
    truncated: torch.Tensor        # [N] bool: hit max_new_tokens
    texts: list[str]               # N decoded completions
    records: list[dict]            # N problems (each repeated group_size times)
    per_fn: torch.Tensor | None = None       # [N, F] each reward function's value, NaN = no opinion
    rewards: torch.Tensor | None = None      # [N] weighted total (0.0 where every function abstained)
    advantages: torch.Tensor | None = None   # [N]
    loss_weight: torch.Tensor | None = None  # [N] 1.0, or 0.0 for rows left out of the loss
    old_logps: torch.Tensor | None = None    # [N, T] log pi_old, when num_iterations > 1
    ref_logps: torch.Tensor | None = None    # [N, T] log pi_ref, when beta > 0
    sampler_logps: torch.Tensor | None = None  # [N, T] float64 log-probs of the sampler (Rollout.logps)
    entropy: torch.Tensor | None = None      # [N, T] policy entropy at the step's start, when
    #                                          grpo.top_entropy_quantile < 1 (phase 5)
    model_mask: torch.Tensor | None = None   # [N, T] 1 on the tokens the model wrote, 0 on tool turns the
    #                                          engine inserted (Rollout.model_mask); None = completion_mask
    episodes: list[dict] | None = None       # N multi-turn rows' messages, turns and tool calls (Rollout.episodes)

    @classmethod
    def from_rollouts(cls, rollouts: list[Rollout], records: list[dict], pad_id: int) -> "GRPOBatch":
        """One batch from the rollouts of a step's generation chunks (`records`: one per row)."""
        P = max(r.prompt_ids.shape[1] for r in rollouts)
        T = max(r.completion_ids.shape[1] for r in rollouts)

        def widen(x, width, left, value):  # [b, w] -> [b, width], padded on one side
            pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)
            return torch.cat([pad, x] if left else [x, pad], dim=1)
        prompt = torch.cat([widen(r.prompt_ids, P, True, pad_id) for r in rollouts])  # [N, P]
        prompt_mask = torch.cat([widen(r.prompt_mask, P, True, 0) for r in rollouts])  # [N, P]
        completion = torch.cat([widen(r.completion_ids, T, False, pad_id) for r in rollouts])  # [N, T]
        completion_mask = torch.cat([widen(r.completion_mask, T, False, 0) for r in rollouts])  # [N, T]
        sampler_logps = None
        if all(r.logps is not None for r in rollouts):
            sampler_logps = torch.cat([widen(r.logps, T, False, 0.0) for r in rollouts])  # [N, T]
        model_mask = None  # multi-turn rows: a chunk without tool turns is all model tokens
        if any(r.model_mask is not None for r in rollouts):
            model_mask = torch.cat([widen(r.completion_mask if r.model_mask is None else r.model_mask, T, False, 0)
                                    for r in rollouts])  # [N, T]
        return cls(input_ids=torch.cat([prompt, completion], dim=1),
                   attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
                   prompt_len=P, completion_ids=completion, completion_mask=completion_mask,
                   truncated=torch.cat([r.truncated for r in rollouts]),
                   texts=[t for r in rollouts for t in r.texts], records=records, sampler_logps=sampler_logps,
                   model_mask=model_mask,
                   episodes=[e for r in rollouts for e in r.episodes] if all(r.episodes for r in rollouts) else None)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids_from_mask(self.attention_mask)  # [N, P + T]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)  # [N]

    @property
    def loss_mask(self) -> torch.Tensor:
        """[N, T] float: the model's own completion tokens, of the rows that count in the loss.
        Inserted tool turns (model_mask 0) are context only: every count the loss, its KL,
        entropy and token selections divide by is a count of these tokens (module docstring)."""
        weight = self.loss_weight.to(self.completion_mask.device, torch.float32)
        written = self.completion_mask if self.model_mask is None else self.completion_mask * self.model_mask
        return written.float() * weight[:, None]

    def completion_lists(self) -> list[list[int]]:
        """Each completion's tokens, without padding."""
        return [ids[m.bool()].tolist() for ids, m in zip(self.completion_ids, self.completion_mask)]

    def micro(self, rows: list[int]) -> "GRPOBatch":
        """Rows `rows`, trimmed to their longest prompt and completion (module docstring)."""
        idx = torch.tensor(rows, device=self.input_ids.device)
        prompt_lens = self.attention_mask[idx, : self.prompt_len].sum(-1)  # [n]
        p = int(prompt_lens.max())
        t = max(int(self.completion_mask[idx].sum(-1).max()), 1)
        cols = torch.arange(self.prompt_len - p, self.prompt_len + t, device=idx.device)

        def pick(x):  # rows of a tensor, on whichever device it lives
            return None if x is None else x[idx.to(x.device)]

        def take(x):  # rows, and the first t completion columns
            return None if x is None else pick(x)[:, :t]
        return replace(self, input_ids=self.input_ids[idx][:, cols],
                       attention_mask=self.attention_mask[idx][:, cols], prompt_len=p,
                       completion_ids=take(self.completion_ids), completion_mask=take(self.completion_mask),
                       truncated=pick(self.truncated), texts=[self.texts[i] for i in rows],
                       records=[self.records[i] for i in rows], per_fn=pick(self.per_fn),
                       rewards=pick(self.rewards), advantages=pick(self.advantages),
                       loss_weight=pick(self.loss_weight), old_logps=take(self.old_logps),
                       ref_logps=take(self.ref_logps), sampler_logps=take(self.sampler_logps),
                       entropy=take(self.entropy), model_mask=take(self.model_mask),
                       episodes=None if self.episodes is None else [self.episodes[i] for i in rows])

    def set_logps(self, name: str, rows: list[int], values: torch.Tensor) -> None:
        """Store a micro-batch's [n, t] log-probs into the [N, T] tensor `name` (zero elsewhere)."""
        full = getattr(self, name)
        if full is None:
            full = torch.zeros(self.completion_ids.shape, dtype=values.dtype, device=values.device)
            setattr(self, name, full)
        full[torch.tensor(rows, device=full.device), : values.shape[1]] = values

    def prompt_lists(self) -> list[tuple[int, ...]]:
        """Each row's prompt tokens, without padding."""
        m = self.attention_mask[:, : self.prompt_len].bool()
        return [tuple(ids[k].tolist()) for ids, k in zip(self.input_ids[:, : self.prompt_len], m)]

    def packed(self) -> "PackedRows":
        """This (micro-)batch as one packed row (module docstring)."""
        prompts, completions = self.prompt_lists(), self.completion_lists()
        return PackedRows.build(prompts, completions, self.completion_ids.shape[1], self.input_ids.device)


def token_budget_micro_batches(order: Sequence[int], prompts: Sequence[tuple], lengths: Sequence[int],
                               budget: int) -> list[list[int]]:
    """Rows in `order`, cut into micro-batches whose packed tokens fit `budget`: a row costs its
    completion, plus its prompt unless the micro-batch already holds that prompt. A row that
    alone exceeds the budget gets a micro-batch of its own."""
    out, seen, used = [[]], set(), 0
    for i in order:
        cost = lengths[i] + (0 if prompts[i] in seen else len(prompts[i]))
        if out[-1] and used + cost > budget:
            out.append([])
            seen, used = set(), 0
            cost = lengths[i] + len(prompts[i])
        out[-1].append(i)
        seen.add(prompts[i])
        used += cost
    return out


def split_to(micro_batches: list[list[int]], count: int) -> list[list[int]]:
    """`micro_batches` cut further into exactly `count` (FSDP ranks must run the same number of
    forwards): the one with the most rows is halved until there are enough. Every piece keeps
    within the budget its whole did. `count` may not exceed the number of rows."""
    out = [list(m) for m in micro_batches]
    if count > sum(len(m) for m in out):
        raise ValueError(f"split_to: {count} micro-batches from {sum(len(m) for m in out)} rows")
    while len(out) < count:
        k = max(range(len(out)), key=lambda j: len(out[j]))
        half = (len(out[k]) + 1) // 2
        out[k: k + 1] = [out[k][:half], out[k][half:]]
    return out


@dataclass
class PackedRows:
    input_ids: torch.Tensor     # [1, L] each distinct prompt, then its rows' completions
    position_ids: torch.Tensor  # [1, L] 0.. within a prompt; a completion continues its prompt's
    cu_seqlens: list[int]       # segment starts, then L
    prefix_of: list[int]        # per segment: its prompt's segment index, -1 for a prompt
    sources: torch.Tensor       # [M] the position whose output predicts each completion token
    targets: torch.Tensor       # [M] completion tokens
    rows: torch.Tensor          # [M] micro-batch row of each target
    cols: torch.Tensor          # [M] completion column of each target
    shape: tuple[int, int]      # (n, t): the micro-batch's [n, t] layout

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], width: int,
              device=None) -> "PackedRows":
        """`prompts[i]`, `completions[i]`: row i's tokens without padding; `width`: t."""
        by_prompt: dict[tuple, list[int]] = {}  # each distinct prompt -> its rows, in first-seen order
        for i, p in enumerate(prompts):
            by_prompt.setdefault(tuple(p), []).append(i)
        ids, pos, cu, prefix_of, sources, rows, cols = [], [], [0], [], [], [], []
        for prompt, members in by_prompt.items():
            prompt = list(prompt)
            p_seg, p_end = len(cu) - 1, cu[-1] + len(prompt)
            ids += prompt
            pos += range(len(prompt))
            cu.append(p_end)
            prefix_of.append(-1)
            for i in members:
                c, start = list(completions[i]), cu[-1]
                if not c:
                    continue
                ids += c
                pos += range(len(prompt), len(prompt) + len(c))
                cu.append(start + len(c))
                prefix_of.append(p_seg)
                # token 0 is predicted by the prompt's last position, token j by the completion's j-1
                sources += [p_end - 1] + list(range(start, start + len(c) - 1))
                rows += [i] * len(c)
                cols += range(len(c))
        tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        return cls(input_ids=tensor(ids)[None], position_ids=tensor(pos)[None], cu_seqlens=cu,
                   prefix_of=prefix_of, sources=tensor(sources),
                   targets=tensor([completions[i][j] for i, j in zip(rows, cols)]), rows=tensor(rows),
                   cols=tensor(cols), shape=(len(prompts), width))

    def __len__(self) -> int:
        return self.input_ids.shape[1]

    def attention(self) -> dict:
        """The keyword arguments of the "sdpa_varlen" attention (model/attention.py)."""
        return {"cu_seqlens": self.cu_seqlens, "prefix_of": self.prefix_of}

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """[M] per-target values -> the micro-batch's [n, t] layout, zero where no token is."""
        return values.new_zeros(self.shape).index_put((self.rows, self.cols), values)
