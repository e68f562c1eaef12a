"""The data layer: R1 prompts and dataset loaders that turn every supported layout (schemas.py)
into one record layout (`prompt`, `problem`, `solution`, `answer`, and `messages` for SFT data)."""
from r1train.data.loaders import SCHEMAS, Records, load_held_out, load_records, seeded_split, split_names
from r1train.data.prompts import SYSTEM_PROMPT, make_conversation, render_prompt
from r1train.data.schemas import DatasetError, last_boxed, normalize_answer

__all__ = [
    "SCHEMAS",
    "SYSTEM_PROMPT",
    "DatasetError",
    "Records",
    "last_boxed",
    "load_held_out",
    "load_records",
    "make_conversation",
    "normalize_answer",
    "render_prompt",
    "seeded_split",
    "split_names",
]
