"""The engine's multi-turn rows (rollout.tools, issue 33): `generate(..., turns=ToolEpisodes)`.

A row's completion is [segment 1 | tool turn 1 | segment 2 | ...]: a segment ends when its text
closes a tool call (`</tool_call>`); after the step, the paused rows' calls are answered in one
batch, and each answer comes back as the tokens the chat template writes between the two
assistant turns. A tool turn is a state of a row, not a second loop: the next forward feeds every
live row its sampled token and, where it has one, its tool turn after it, as one chunk of width
K + 1 (K the step's longest tool turn; a plain decode step when no row has one). Shorter rows are
padded on the left with holes: cache columns masked for every later token, as a left-padded
prompt's are, so each row keeps its own position counter and no conversation is prefilled again.

Each row draws its uniforms by its own count of model tokens, so its samples do not depend on the
other rows' tool turns (nor on the batch or rank it is in): a step samples one model token of
every row, so step t draws each row's token t, as without turns. `max_new_tokens` is each row's
whole budget, model and inserted tokens: a row ends, truncated, when it is spent or a tool turn
would leave no token of it; it ends (not truncated) when a call closes its `max_turns`-th
segment, that call unanswered. The Rollout then carries `model_mask` (0 on tool turns; the
sampler's log-probs are 0 there) and each row's episode (messages, turns, tool calls, errors).

`MultiTurnRows` is that state; `generate` (model/engine.py) calls it at the three points of its
step where a multi-turn row differs: where a sampled token is written, after the step's ends are
known (pauses, tool turns, budget), and for the next forward. The rows' side (environments,
calls, messages) is the `turns` object (tools/episodes.py): this module sees token ids only.
"""
from __future__ import annotations

import torch

from r1train.model.engine import Rollout, stop_candidates


class MultiTurnRows:
    """The state of a batch's multi-turn rows in `generate` (module docstring).

    Per row: `filled` tokens written (model + inserted, the row's budget is max_new_tokens of
    them), the start of its current segment, its segment count, the position of its next token
    and `model_mask`. Per batch: the cache's columns `clen` and their [B, clen] mask, 0 on the
    holes a chunk forward leaves. Only the rows whose new token can close a call are decoded."""

    def __init__(self, turns, tokenizer, prompt_mask: torch.Tensor, max_new_tokens: int, next_pos: torch.Tensor):
        self.turns, self.tokenizer, self.max_new, self.pad = turns, tokenizer, max_new_tokens, tokenizer.pad_token_id
        (b, p), device = prompt_mask.shape, prompt_mask.device
        zeros = lambda: torch.zeros(b, dtype=torch.long, device=device)  # noqa: E731
        self.filled, self.seg_start, self.segments = zeros(), zeros(), zeros() + 1
        self.truncated = torch.zeros(b, dtype=torch.bool, device=device)
        self.model_mask = torch.zeros((b, max_new_tokens), dtype=torch.long, device=device)  # [B, max_new]
        self.pos = next_pos[:, 0].clone()  # [B] position of each row's next token
        # [B, capacity] the cache's mask: the prompt's, then 1 on real tokens, 0 on holes
        self.mask = torch.cat([prompt_mask.long(), prompt_mask.new_ones((b, max_new_tokens), dtype=torch.long)], 1)
        self.clen = p  # columns of the cache
        self.close = stop_candidates(tokenizer, [turns.close])
        self.pending: dict[int, list[int]] = {}  # row -> tool turn to feed after its sampled token

    def write(self, out, out_logps, live, done, tok, logp) -> torch.Tensor:
        """Each going row's sampled token at its next column; [L] those columns."""
        col = self.filled[live].clamp(max=self.max_new - 1)  # [L]
        r, c = live[~done], col[~done]
        out[r, c], out_logps[r, c], self.model_mask[r, c] = tok[~done], logp[~done], 1
        self.filled[r] += 1
        return col

    def tail_holds(self, out, rows: torch.Tensor, strings: list[str], window: int = 16) -> torch.Tensor:
        """[R] whether the last `window` tokens of each row's current segment hold one of `strings`."""
        tails = [out[r, max(int(self.seg_start[r]), int(self.filled[r]) - window): int(self.filled[r])].tolist()
                 for r in rows.tolist()]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=False)
        return torch.tensor([any(x in text for x in strings) for text in texts], device=rows.device)

    def after_token(self, out, out_logps, live, ended, tok, finish_at) -> None:
        """Pause the rows whose segment just closed a tool call and answer them in one batch;
        end the rows out of budget or turns (module docstring)."""
        going = ~ended  # [L]
        full = live[going & (self.filled[live] == self.max_new)]  # no room for another token
        finish_at[full], self.truncated[full] = self.filled[full] - 1, True
        going &= self.filled[live] < self.max_new
        v = len(self.close) if self.close is not None else 0
        check = going if self.close is None else going & ((tok >= v) | self.close[tok.clamp(max=v - 1)])
        at = live[check.nonzero().squeeze(1)]  # the rows whose token can close a call: decode those
        if not len(at):
            return
        ask = []
        for r in at[self.tail_holds(out, at, [self.turns.close])].tolist():
            if int(self.filled[r]) + 1 >= self.max_new:  # no room for a tool turn and a token after it
                finish_at[r], self.truncated[r] = self.filled[r] - 1, True
            elif int(self.segments[r]) >= self.turns.max_turns:
                finish_at[r] = self.filled[r] - 1  # its last call goes unanswered
            else:
                ask.append(r)
        if not ask:
            return
        segments = [out[r, int(self.seg_start[r]): int(self.filled[r])].tolist() for r in ask]
        rooms = [self.max_new - int(self.filled[r]) for r in ask]
        for r, room, (ids, end) in zip(ask, rooms, self.turns.answer(ask, segments, rooms)):
            if ids is None or len(ids) >= room:  # the tool turn would pass the budget: the row ends
                finish_at[r], self.truncated[r] = self.filled[r] - 1, True
                continue
            k, at = len(ids), int(self.filled[r])
            out[r, at: at + k] = torch.tensor(ids, dtype=out.dtype, device=out.device)
            self.filled[r] += k
            self.seg_start[r] = self.filled[r]
            self.segments[r] += 1
            if end:  # the environment ended the episode: the row ends with its tool turn
                finish_at[r] = self.filled[r] - 1
            else:
                self.pending[r] = ids

    def forward(self, decode, live, tok, cache):
        """The next forward: each live row's sampled token, then its tool turn if it has one, as
        one chunk of width K + 1 (K the longest tool turn; 1 when none), holes on the left (masked,
        so that every row's last column is its last real token and `next_token_logits` reads it)."""
        inserts = [self.pending.pop(r, []) for r in live.tolist()] if self.pending else [[]] * len(live)
        W = 1 + max(len(x) for x in inserts)
        if self.clen + W > self.mask.shape[1]:  # tool turns add columns: grow the mask with the cache
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, : max(W, self.max_new)])], 1)
        if W == 1:  # no tool turn this step: a plain decode step
            ids, positions = tok[:, None], self.pos[live][:, None]  # [L, 1]
            self.mask[live, self.clen] = 1
        else:
            n = torch.tensor([1 + len(x) for x in inserts], device=live.device)  # [L] real tokens
            offsets = torch.arange(W, device=live.device)[None, :] - (W - n)[:, None]  # [L, W] < 0 on holes
            ids = torch.full((len(live), W), self.pad, dtype=torch.long, device=live.device)
            ids[:, -1] = tok  # rows without a tool turn
            for j, x in enumerate(inserts):
                if x:
                    ids[j, W - 1 - len(x)] = tok[j]
                    ids[j, W - len(x):] = torch.tensor(x, dtype=torch.long, device=live.device)
            positions = self.pos[live][:, None] + offsets.clamp(min=0)  # [L, W]
            self.mask[live, self.clen: self.clen + W] = (offsets >= 0).long()
        logits, cache = decode(ids, self.mask[live, : self.clen + W], positions, cache=cache)
        self.pos[live] += 1 if W == 1 else n
        self.clen += W
        return logits, cache

    def rollout(self, prompt_ids, prompt_mask, out, out_logps, finish_at) -> Rollout:
        """The Rollout of the finished rows (a stop signal may leave some unfinished: truncated)."""
        unfinished = finish_at < 0
        length = torch.where(unfinished, self.filled, finish_at + 1)  # [B]
        T = max(int(length.max()), 1)
        completion_mask = (torch.arange(T, device=out.device)[None, :] < length[:, None]).long()  # [B, T]
        ids = out[:, :T].masked_fill(completion_mask == 0, self.pad)
        model_mask = self.model_mask[:, :T] * completion_mask  # [B, T]
        logps = out_logps[:, :T].masked_fill(model_mask == 0, 0.0)  # [B, T]
        texts, episodes = [], []
        for r in range(len(ids)):
            n, start = int(length[r]), int(self.seg_start[r])
            texts.append(self._text(ids[r, :n].tolist(), model_mask[r, :n].tolist()))
            episodes.append(self.turns.episode(r, ids[r, start:n].tolist() if start < n else []))
        return Rollout(prompt_ids, prompt_mask, ids, completion_mask, self.truncated | unfinished, texts, logps,
                       model_mask=model_mask, episodes=episodes)

    def _text(self, ids: list[int], written: list[int]) -> str:
        """The row's assistant side as rendered: its segments decoded as single-turn completions
        are (special tokens skipped), the tool turns between them as the template wrote them."""
        parts, start = [], 0
        for j in range(1, len(ids) + 1):
            if j == len(ids) or written[j] != written[start]:
                parts.append(self.tokenizer.decode(ids[start:j], skip_special_tokens=bool(written[start])))
                start = j
        return "".join(parts)
