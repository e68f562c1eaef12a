"""Per-token records: what the objective saw, token by token, kept every `train.sample_every` steps.

A GRPO record is one whole group (all G completions of one prompt: the comparison GRPO makes),
an SFT record one packed row. They are appended to `<output_dir>/tokens.jsonl`, one JSON object
per line stamped with its step (cut back on resume like the other per-step logs), and read by
`train.py inspect` (inspector/page.py).

GRPO record:
    {"step", "kind": "grpo", "group", "problem", "answer", "reward_names": [F names],
     "settings": {"epsilon_low", "epsilon_high", "beta", "kl_estimator", "importance_sampling"},
     "completions": [{"tokens": [T strings], "reward": r_i, "advantage": A_i, "rewards": [F values],
                      "truncated": bool, "values": {name: [T numbers]}, "why": [T strings]}],
     "prefix": text}
`prefix` only when --data.response_prefix is set: the text that ended the prompt and opens each
reply as the rewards read it; its tokens are the prompt's, so they have no values.

`values` holds, per completion token, the numbers the loss used in the last pass of the step:
"logp" (policy), "old_logp" (num_iterations > 1), "ref_logp" (beta > 0 or LoRA reference),
"ratio", "clip" (-1 lower clip active, +1 upper, 0 neither), "kl" (the estimator's per-token
term), "entropy", "loss_mask" (1 where the token is in the loss), and whatever per-token weights
the loss applied (`extra`). `why` says why a token is out of the loss ("" when it is in):
"truncated" (grpo.mask_truncated), "zero-std group" (grpo.drop_zero_std_groups), or the name of
a per-token mask. SFT record:
    {"step", "kind": "sft", "row", "tokens": [L strings], "nll": [L numbers or null], "doc": [L ints]}
with the per-token negative log-likelihood where a token is a label, null where it is not (the
prompt side, or padding), and the document each token belongs to.
"""
from __future__ import annotations

import math

import torch

RECORDS_FILE = "tokens.jsonl"


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token as text on its own. A character split over several byte-level tokens shows as
    U+FFFD in each of them: the page shows tokens, not the decoded string."""
    return tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)


def _numbers(x: torch.Tensor) -> list:
    """A 1-D tensor as a JSON-safe list: floats (exact float32 values) or None where not finite."""
    return [v if math.isfinite(v) else None for v in x.detach().double().cpu().tolist()]


def grpo_group_record(step: int, group: int, record: dict, texts: list[list[str]], values: list[dict],
                      why: list[list[str]], rewards: torch.Tensor, advantages: torch.Tensor,
                      per_fn: torch.Tensor, truncated: torch.Tensor, reward_names: list[str],
                      settings: dict, prefix: str = "") -> dict:
    """One group's record. `texts[i]`: completion i's token texts; `values[i]`: name -> [T_i]
    tensor; `why[i]`: T_i strings; rewards, advantages, truncated `[G]`, per_fn `[G, F]`;
    `prefix`: the response prefix (kept only when not empty)."""
    completions = []
    for i in range(len(texts)):
        completions.append({
            "tokens": texts[i], "reward": float(rewards[i]), "advantage": float(advantages[i]),
            "rewards": _numbers(per_fn[i]), "truncated": bool(truncated[i]),
            "values": {k: _numbers(v) for k, v in values[i].items()}, "why": why[i]})
    out = {"step": step, "kind": "grpo", "group": group, "problem": record.get("problem", ""),
           "answer": record.get("answer", ""), "reward_names": list(reward_names), "settings": settings,
           "completions": completions}
    return {**out, "prefix": prefix} if prefix else out


def sft_row_record(step: int, row: int, texts: list[str], nll: torch.Tensor, is_label: torch.Tensor,
                   doc: torch.Tensor) -> dict:
    """One packed row's record: `texts` [L] token texts, `nll` [M] the NLL of its M label tokens in
    order, `is_label` [L] bool (token t is a label, predicted at t-1), `doc` [L] document index."""
    out: list = [None] * len(texts)
    for t, v in zip(torch.nonzero(is_label).flatten().tolist(), _numbers(nll)):
        out[t] = v
    return {"step": step, "kind": "sft", "row": row, "tokens": texts, "nll": out, "doc": doc.tolist()}


class GroupRecorder:
    """Collects, during GRPO's update, the per-token values of the rows of a few whole groups, one
    micro-batch at a time (rows of one group may sit in different micro-batches), then turns
    them into `grpo_group_record`s. `rows`: the batch rows to keep (whole groups)."""

    def __init__(self, rows: list[int]):
        self.rows = set(rows)
        self.values: dict[int, dict[str, torch.Tensor]] = {}

    def add(self, rows: list[int], lengths: torch.Tensor, values: dict[str, torch.Tensor | None]) -> None:
        """`rows`: the micro-batch's batch rows; `lengths` `[n]` their completion tokens; `values`:
        name -> `[n, t]` tensor (None: not computed in this run)."""
        for j, row in enumerate(rows):
            if row in self.rows:
                n = int(lengths[j])
                self.values[row] = {k: v[j, :n].detach().float().cpu() for k, v in values.items() if v is not None}

    def records(self, step: int, group_size: int, batch, tokenizer, reward_names: list[str], settings: dict,
                why_row: list[str], why_token, prefix: str = "") -> list[dict]:
        """The groups' records. `batch`: the step's GRPOBatch; `why_row[i]`: why row i is out of
        the loss ("" if it is in); `why_token(values) -> [T] strings` names the tokens a per-token
        selection left out of the policy term; `prefix`: the response prefix."""
        out, ids = [], batch.completion_lists()
        for first in sorted(r for r in self.rows if r % group_size == 0):
            rows = list(range(first, first + group_size))
            if not all(r in self.values for r in rows):
                continue
            texts = [token_texts(tokenizer, ids[r]) for r in rows]
            values = [self.values[r] for r in rows]
            why = [[why_row[r]] * len(texts[k]) if why_row[r] else why_token(values[k])
                   for k, r in enumerate(rows)]
            sl = slice(first, first + group_size)
            out.append(grpo_group_record(step, first // group_size, batch.records[first], texts, values, why,
                                         batch.rewards[sl], batch.advantages[sl], batch.per_fn[sl],
                                         batch.truncated[sl], reward_names, settings, prefix))
        return out
