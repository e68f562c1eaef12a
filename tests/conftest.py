import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The embedded tiny model (seed 0) in a folder of its own, built once for the whole run: the
    tests that ask for it read it and write their runs elsewhere. A module that needs another
    tiny model defines its own `tiny`."""
    from r1train.data.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))
