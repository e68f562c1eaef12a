"""usage: [torchrun --nproc_per_node=N] train.py [COMMAND] [--recipe FILE] [--section.field VALUE ...]
(or plain `python train.py ...`).

Commands:
  (none)             the embedded tiny R1 pipeline (configs/tiny-r1.yaml): builds a tiny model,
                     cold-start SFT, then GRPO with the R1 rewards; prints a table at the end
  grpo               GRPO (R1-Zero / reasoning-oriented RL)          r1train/grpo/trainer.py
  sft                supervised fine-tuning with packing              r1train/sft/trainer.py
  rejection-sample   K samples per prompt, keep the ones the rewards pass, write an SFT set
  distill            teacher traces -> student SFT (optionally token-level KL)
  pipeline           run the stages of a recipe in order, resumable stage by stage
  inspect RUN_DIR    one HTML page of a run (or a pipeline's stages): curves, groups and
                     completions token by token, held-out samples    r1train/inspector/page.py

`python train.py COMMAND --help` lists every option with its default and documentation. The same
commands: `r1-train` once installed, or `python -m r1train`.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny-r1.yaml")


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return None
    command = argv.pop(0) if argv and not argv[0].startswith("-") else None
    from r1train.data.loaders import DatasetError
    from r1train.rewards.custom import RewardError
    from r1train.run.config import ConfigError, error_line

    try:
        if command is None:
            from r1train.pipeline import main as run
            if "--recipe" not in argv and not any(a.startswith("--recipe=") for a in argv):
                if not os.path.exists(DEFAULT_RECIPE):  # installed from a wheel, not a checkout
                    raise ConfigError(f"the main job's recipe {DEFAULT_RECIPE} is not there: it comes with a "
                                      f"checkout of the repository (pip install -e .); or name one with --recipe")
                argv = ["--recipe", DEFAULT_RECIPE, *argv]
            return _leave_process_group(run(argv))
        if command == "inspect":
            from r1train.inspector.page import main as inspect
            return inspect(argv)
        from r1train.pipeline import command_entry
        from r1train.pipeline import main as run_pipeline
        run = run_pipeline if command == "pipeline" else command_entry(command)[1]
        return _leave_process_group(run(argv))
    except (ConfigError, DatasetError, RewardError) as e:
        # A user's mistake (an option, a recipe, a data file or row, a model path, a reward
        # function that broke its contract): one line that names it, no traceback, and status 2
        # as for a usage error. Anything else is a bug or a fault and keeps its traceback.
        print(error_line(e), file=sys.stderr)
        raise SystemExit(2) from None



def _leave_process_group(result):
    """A torchrun worker whose run finished: the ranks leave together and the process group is
    destroyed before the interpreter exits, rather than torn down by its finalizers in whatever
    order they run (PyTorch asks for this; a teardown left to the finalizers was seen to abort
    once, after the run's work was done)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result
