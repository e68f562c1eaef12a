"""A neural reward model as a reward: `--grpo.rewards accuracy,rm:path/to/folder`.

The folder is a Hugging Face sequence-classification model with one output (num_labels=1), its
weights as safetensors and its tokenizer beside them: what `AutoModelForSequenceClassification.
save_pretrained` writes, e.g. a model trained with TRL's RewardTrainer (Bradley-Terry, Ouyang et
al. 2022 Eq. (1)). The reward of a completion is the model's scalar logit r(x, y) on the
conversation x + y, as it is: no normalization. GRPO centres (and with scale_rewards=group,
scales) rewards within each group, so an offset or a scale of the RM cancels there when it is the
only reward; next to other rewards, `--grpo.reward_weights` sets its share.

What the model reads, per completion:
- the conversation is the row's prompt messages (the `prompt` column: the system turn and the
  user's question, as the policy saw them) followed by `{"role": "assistant", "content":
  completion}`;
- with a chat template in the RM's tokenizer it is rendered by that template (no generation
  prompt: the assistant turn is closed as the template closes it) and tokenized without adding
  special tokens, as `apply_chat_template(tokenize=True)` does (the template writes any BOS
  itself). A template without a system role gets the system text merged into the first user turn
  (data/prompts.py `merge_system_turn`);
- without one, it is the plain text "System: ...\\n\\nUser: ...\\n\\nAssistant: ..." (each role
  capitalised, turns joined by a blank line), tokenized with the tokenizer's special tokens
  (a [CLS] or BOS that an encoder RM pools on);
- longer than `--rewards.rm_max_tokens` (0: the RM's own limit, the smaller of its
  max_position_embeddings and its tokenizer's model_max_length): cut from the left, keeping a
  leading BOS or [CLS] token. Decoder RMs read the score at the last token, so the end (the
  completion and its answer) is what must stay; refusing would stop a training run at the first
  long completion. Each cut is counted: `rewards/<name>/truncated` in metrics.jsonl.

How it runs: loaded once when the trainer builds its rewards (before the policy), in eval mode,
its parameters frozen (requires_grad False), every forward under `torch.inference_mode()`, on
`--rewards.rm_device` (default: the trainer's device; each rank holds its own copy) in
`--rewards.rm_dtype`. Sequences are sorted by length and scored `--rewards.rm_batch_size` at a
time, padded on the right, so that each keeps the positions it has alone; the model reads the
score at the last token that is not padding (transformers' own pooling). A model whose config and
tokenizer both lack a pad token scores one sequence at a time. Safe by construction: only
safetensors weights are read and no code from the folder runs (trust_remote_code is never set).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from r1train.rewards.common import add_metric, column, completion_texts
from r1train.rewards.custom import RewardError

RM_DTYPES = ("float32", "bfloat16")  # --rewards.rm_dtype; torch is imported only when a model loads
# A tokenizer with no length limit says so with a huge model_max_length (int(1e30)).
_NO_LIMIT = 10 ** 9


def _fail(entry: str, path: str, why: str) -> RewardError:
    return RewardError(f"reward {entry!r}: {path}: {why}")


def check_reward_model(entry: str, path: str):
    """(config, tokenizer) of the reward-model folder `path`, read without its weights; RewardError
    naming the entry and the folder when it is missing, has no config, is not a one-output
    sequence-classification model, has no safetensors weights or no tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(path).expanduser()
    where = "a local Hugging Face folder: config.json, *.safetensors and the tokenizer's files"
    if not folder.is_dir():
        raise _fail(entry, path, f"no such folder (a reward model is {where}; from {Path.cwd()})")
    if not (folder / "config.json").is_file():
        raise _fail(entry, path, f"has no config.json (a reward model is {where})")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a bad JSON, an unknown model type, remote code: one line
        raise _fail(entry, path, f"config.json cannot be read without remote code: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise _fail(entry, path, f"is {', '.join(architectures) or 'a model of no stated architecture'}, not a "
                                 f"sequence-classification model (AutoModelForSequenceClassification with "
                                 f"num_labels=1, as TRL's RewardTrainer saves one)")
    if config.num_labels != 1:
        raise _fail(entry, path, f"has num_labels={config.num_labels}; a reward model has one output, "
                                 f"its scalar score")
    if not any(folder.glob("*.safetensors")):
        raise _fail(entry, path, "has no .safetensors weights (pickled .bin weights are not loaded: unpickling "
                                 "can run code; save it with save_pretrained(safe_serialization=True))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - missing files surface as OSError, ValueError or TypeError
        raise _fail(entry, path, f"has no tokenizer that loads without remote code ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); save the RM's tokenizer "
                                 f"into the folder") from None
    return config, tokenizer


def max_tokens_of(config, tokenizer) -> int:
    """The RM's own bound on an input's tokens: the smaller of max_position_embeddings and the
    tokenizer's model_max_length; 0 when neither states one."""
    stated = (getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None))
    limits = [n for n in stated if isinstance(n, int) and 0 < n < _NO_LIMIT]
    return min(limits, default=0)


def prompt_messages(prompt: Any) -> list[dict]:
    """A row's `prompt` column as chat messages: a message list as it is, a string as one user
    turn, nothing ("" or None: a batch without prompts) as no turn."""
    if prompt is None or prompt == "":
        return []
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def render_conversation(tokenizer, messages: list[dict], merge_system: bool = False) -> tuple[str, bool]:
    """(text, add_special_tokens) of a conversation for the RM: its chat template's rendering
    (closed, no generation prompt; special tokens are in the text), or without a template the
    plain "Role: content" turns joined by blank lines, to which the tokenizer adds its own."""
    from r1train.data.prompts import merge_system_turn

    if getattr(tokenizer, "chat_template", None):
        if merge_system:
            messages = merge_system_turn(messages)
        return tokenizer.apply_chat_template(messages, tokenize=False), False
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages), True


def truncate_left(ids: list[int], max_tokens: int, keep_first: bool) -> list[int]:
    """The last `max_tokens` of `ids` (0: all of them); with `keep_first`, the first token (a BOS
    or [CLS]) and the last max_tokens - 1."""
    if not max_tokens or len(ids) <= max_tokens:
        return ids
    if keep_first and max_tokens > 1:
        return ids[:1] + ids[len(ids) - max_tokens + 1:]
    return ids[len(ids) - max_tokens:]


class RewardModel:
    """The reward `fn(completions, prompt, **columns) -> list[float]` of a reward-model folder
    (module docstring). Built once per trainer; holds the model on `device`; `summary` is a line
    saying what was loaded, for the trainer to print."""

    def __init__(self, name: str, entry: str, path: str, device: Any = "cpu",
                 dtype: str = "float32", batch_size: int = 8, max_tokens: int = 0):
        import torch
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        from r1train.data.prompts import template_has_system_role

        hf_logging.disable_progress_bar()  # as model/load.py: the trainer says what it loads
        _, tokenizer = check_reward_model(entry, path)
        self.__name__ = self.__qualname__ = name
        self.name, self.path, self.batch_size, self.device = name, path, batch_size, torch.device(device)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                Path(path).expanduser(), dtype=getattr(torch, dtype), trust_remote_code=False, use_safetensors=True)
        except Exception as e:  # noqa: BLE001 - weights that do not match the config, a broken file
            raise _fail(entry, path, f"loading it as a sequence-classification model failed: "
                                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        self.model = model.to(self.device).eval().requires_grad_(False)
        # Padding is read by the model's pooling (the last token that is not pad): the tokenizer's
        # and the config's pad ids must agree, as TRL's RewardTrainer sets them.
        if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.pad_id = model.config.pad_token_id
        if self.pad_id is None:
            self.batch_size = 1  # no pad token: transformers pools at the last position, one row at a time
        self.tokenizer = tokenizer
        self.merge_system = bool(getattr(tokenizer, "chat_template", None)) and not template_has_system_role(tokenizer)
        self.max_tokens = max_tokens or max_tokens_of(model.config, tokenizer)
        self.first_ids = {i for i in (tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None))
                          if i is not None}
        params = sum(p.numel() for p in model.parameters())
        self.summary = (f"reward {name!r}: {type(model).__name__} from {path}, {params / 1e6:.1f}M parameters in "
                        f"{dtype} on {self.device}, inputs of at most {self.max_tokens or 'any number of'} tokens, "
                        f"{self.batch_size} per forward")

    def encode(self, prompt: Any, completion: str) -> tuple[list[int], bool]:
        """(token ids the RM scores, whether they were cut) of one completion after its prompt."""
        messages = [*prompt_messages(prompt), {"role": "assistant", "content": completion}]
        text, special = render_conversation(self.tokenizer, messages, self.merge_system)
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        cut = truncate_left(ids, self.max_tokens, keep_first=bool(ids) and ids[0] in self.first_ids)
        return cut, len(cut) < len(ids)

    def score(self, sequences: list[list[int]]) -> list[float]:
        """The RM's scalar logit of each token sequence, `batch_size` at a time, longest first."""
        import torch

        with torch.inference_mode():
            return self._score(sequences)

    def _score(self, sequences: list[list[int]]) -> list[float]:
        import torch

        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        scores = [math.nan] * len(sequences)
        pad = self.pad_id if self.pad_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(sequences[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [b, T], padded on the right
            mask = torch.zeros((len(rows), width), dtype=torch.long)  # [b, T]
            for k, i in enumerate(rows):
                ids[k, :len(sequences[i])] = torch.tensor(sequences[i])
                mask[k, :len(sequences[i])] = 1
            try:
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits  # [b, 1]
            except torch.OutOfMemoryError:
                raise RewardError(f"reward {self.name!r} (reward model {self.path}) ran out of memory on "
                                  f"{len(rows)} sequences of up to {width} tokens; lower --rewards.rm_batch_size or "
                                  f"--rewards.rm_max_tokens, or put it on another device with --rewards.rm_device"
                                  ) from None
            for k, i in enumerate(rows):
                scores[i] = float(logits[k, 0].float())
        return scores

    def __call__(self, completions: list, prompt: list | None = None, **columns) -> list[float]:
        texts = completion_texts(completions)
        prompts = column({"prompt": prompt}, "prompt", len(texts)) or [None] * len(texts)
        encoded = [self.encode(p, t) for p, t in zip(prompts, texts)]
        add_metric(f"{self.name}/truncated", float(sum(cut for _, cut in encoded)))
        return self.score([ids for ids, _ in encoded])
