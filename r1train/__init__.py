"""r1-from-scratch: DeepSeek-R1-style GRPO and SFT in plain PyTorch, as one import package.

The parts, and the way the layers point (tests/test_layers.py checks it):

    cli.py, pipeline/    the commands and the recipe runner: above everything
    grpo/, sft/          the stages: each imports the layers below, never the other stage
    run/                 run mechanics: the one training loop, checkpoints, resume, the run folder,
                         optimizer and schedule, typed options, torchrun and FSDP2, logging
    model/               the model and its generation: loading, policy forwards, packed attention,
                         the one generation engine and its compiled decode
    evaluate.py          held-out evaluation
    data/                data sections -> problems and prompts; dataset layouts; the embedded task
    rewards/             the R1 rewards and the ones users bring
    tools/               tools a model calls in multi-turn rollouts, their worker pool and sandbox
    kernels/             fused log-probs (Triton on CUDA, chunked PyTorch elsewhere)

Every import inside the project names this package (`from r1train.grpo.loss import policy_loss`).
"""
