"""GRPO job configuration: typed dataclasses with a documented default per field.

Defaults target a real model (Qwen2.5-0.5B-Instruct class) and follow the literature rather than
the tutorial: learning rate 1e-6 (DeepSeekMath used 1e-6; the tutorial's 5e-5 destroys a
pretrained model within a few hundred steps), beta 0.04, group size 8, clip 0.2. The embedded
recipe (`configs/tiny-r1.yaml`, and what `train.py` runs with no arguments) sets its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from r1train.rewards import RewardConfig
from r1train.run.config import ConfigError
from r1train.run.sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    at_least,
    bad,
    check_data,
    check_eval,
    check_export_adapter,
    check_model,
    check_optim,
    check_rewards,
    check_train,
    finite,
    one_of,
)


@dataclass
class RolloutConfig:
    group_size: int = 8
    """G: completions sampled per prompt; advantages are relative within a group."""
    max_new_tokens: int = 512
    """Completion budget in tokens; longer completions are cut and flagged truncated."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    stop_strings: list[str] = field(default_factory=list)
    """Extra strings that end a completion (EOS always does)."""
    prompts_per_generation: int = 0
    """Prompts generated together in one batch per rank (0 = all of the rank's prompts)."""
    eval_temperature: float = 0.0
    """Temperature of evaluation decoding (0 = greedy)."""
    compile_decode: bool = False
    """Decode steps compiled (torch.compile; CUDA graphs on a GPU) over a static KV cache in
    batch-size buckets (model/static_decode.py). One process only; the first steps compile a
    graph per bucket. For GPUs, where a decode step is launch-bound; on a CPU it gains nothing."""
    tools: list[str] = field(default_factory=list)
    """Tools the model may call, making rollouts multi-turn: built-in names (calculator, python),
    module:function or path/to/file.py:function (tools/registry.py). Empty = one assistant turn."""
    max_turns: int = 4
    """With tools: assistant segments per completion at most; the call that closes the last one
    goes unanswered and the completion ends there."""
    tool_timeout_s: float = 30.0
    """With tools: wall seconds one call may run; past it its worker is killed, the answer an error."""
    tool_workers: int = 2
    """With tools: worker processes per rank that run a step's calls in parallel."""
    tools_prompt: bool = True
    """With tools: the tools' schemas go into each prompt (template's tools branch, else the system
    turn). False: prompts as they are, for a model SFT-taught its calls (the tiny tools recipe)."""


@dataclass
class GRPOConfig:
    prompts_per_step: int = 16
    """Prompts per optimizer step, over all ranks (global batch = prompts_per_step * group_size)."""
    micro_batch_size: int = 8
    """Completions per forward/backward on one rank (gradient accumulation over the rest)."""
    packing: bool = True
    """Log-prob and update passes on packed rows: each prompt computed once for its completions,
    no padding (grpo/batch.py). False: the padded per-row pass, kept as the oracle."""
    micro_batch_tokens: int = 0
    """Packed passes: tokens per forward/backward on one rank, instead of micro_batch_size
    completions (0 = use micro_batch_size). A completion longer than this gets its own."""
    num_iterations: int = 1
    """mu: passes over each batch of rollouts; > 1 needs old-policy log-probs and clipping."""
    beta: float = 0.04
    """KL coefficient against the frozen reference model (0 = no reference model)."""
    kl_estimator: str = "k3"
    """k1, k2 or k3 (DeepSeekMath Eq. 4)."""
    epsilon_low: float = 0.2
    """Lower clip range: ratio >= 1 - epsilon_low."""
    epsilon_high: float = 0.0
    """Upper clip range (DAPO clip-higher); 0 = same as epsilon_low."""
    loss_type: str = "grpo"
    """grpo, bnpo, dr_grpo or dapo (see grpo/loss.py)."""
    importance_sampling: str = "token"
    """token (GRPO) or sequence (GSPO)."""
    advantage_estimator: str = "grpo"
    """grpo (group mean/std) or rloo (leave-one-out)."""
    scale_rewards: str = "group"
    """group, batch or none (Dr. GRPO): what the centred rewards are divided by."""
    mask_truncated: bool = False
    """Exclude completions that hit max_new_tokens from the loss (DAPO); their tokens leave the
    loss's token counts, the row stays in grpo's and dr_grpo's N (grpo/trainer.py docstring)."""
    drop_zero_std_groups: bool = False
    """Leave groups whose rewards are all equal out of the loss (DAPO dynamic sampling, lite), as
    mask_truncated leaves a row out."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: generate rounds of prompts_per_step new prompts until prompts_per_step
    groups have rewards that differ, and train on those (grpo/dynamic.py)."""
    max_generation_rounds: int = 4
    """dynamic_sampling: rounds one step may generate; at the cap, groups without signal fill the
    batch (verl's max_num_gen_batches, which stops the run instead)."""
    rollout_correction: str = "none"
    """none, tis or mis: weight each token's policy term by pi_old / pi_sampler, truncated at
    correction_bound (tis) or masked to 0 past the bounds (mis), for a sampler whose numbers
    differ from the trainer's (grpo/loss.py rollout_correction)."""
    correction_level: str = "token"
    """token or sequence: the ratio of each token, or of the whole completion (the product)."""
    correction_bound: float = 2.0
    """C: tis truncates the ratio at C; mis masks ratios above C (Yao et al. use C = 2)."""
    correction_bound_low: float = 0.0
    """mis only: also mask ratios below this (IcePop's two-sided mask; 0 = from above only)."""
    top_entropy_quantile: float = 1.0
    """rho: share of the step's loss tokens, the highest-entropy ones, that keep the policy
    gradient ("Beyond the 80/20 Rule" uses 0.2; 1.0 = all). The KL applies to every token."""
    ref_refresh_steps: int = 0
    """tau: every tau steps mix the policy into the reference (0 = never)."""
    ref_mix_alpha: float = 0.6
    """alpha: reference <- alpha * policy + (1 - alpha) * reference at each refresh."""
    rewards: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    """Reward functions: built-in names (see rewards), module:function, path/to/file.py:function,
    or name=<either> to set the metric name (rewards/custom.py)."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward (empty = all 1.0)."""


@dataclass
class GRPOJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, world_size: int = 1) -> None:
        """Fail at start, naming the option, on values and combinations that cannot train.

        Runs in `parse_args`, before any model or data loads. Bounds are written as
        `not (x > 0)` where a NaN must fail too (`nan <= 0` is False)."""
        r, g, o, t = self.rollout, self.grpo, self.optim, self.train
        check_model(self.model)
        check_data(self.data)
        check_optim(o)
        check_train(t)
        check_export_adapter(self.model, t)
        at_least("rollout.group_size", r.group_size, 2, "(advantages compare completions within a group)")
        at_least("grpo.prompts_per_step", g.prompts_per_step, 1)
        if g.prompts_per_step % world_size:
            bad("grpo.prompts_per_step", g.prompts_per_step,
                f"must be divisible by the world size {world_size} (each rank scores whole groups)")
        local = g.prompts_per_step // world_size * r.group_size
        if not g.micro_batch_tokens and (g.micro_batch_size < 1 or local % g.micro_batch_size):
            bad("grpo.micro_batch_size", g.micro_batch_size,
                f"must divide the per-rank batch of {local} completions "
                f"(prompts_per_step / world_size * group_size)")
        at_least("grpo.micro_batch_tokens", g.micro_batch_tokens, 0, "(0 = micro_batch_size completions)")
        if g.micro_batch_tokens and not g.packing:
            bad("grpo.micro_batch_tokens", g.micro_batch_tokens,
                "needs --grpo.packing true (padded micro-batches count completions)")
        at_least("rollout.prompts_per_generation", r.prompts_per_generation, 0)
        at_least("rollout.max_new_tokens", r.max_new_tokens, 1)
        if not (finite(r.temperature) and r.temperature > 0):
            bad("rollout.temperature", r.temperature, "must be a finite number > 0 for GRPO sampling")
        if not 0 < r.top_p <= 1:
            bad("rollout.top_p", r.top_p, "must be in (0, 1]")
        at_least("rollout.top_k", r.top_k, 0, "(0 = off)")
        at_least("rollout.eval_temperature", r.eval_temperature, 0, "(0 = greedy)", finite_only=True)
        check_eval(self.eval, r.eval_temperature)
        check_tools(r, g)
        at_least("grpo.beta", g.beta, 0, finite_only=True)
        at_least("grpo.num_iterations", g.num_iterations, 1)
        if not 0 <= g.epsilon_low < 1:  # 1 - epsilon_low is the ratio's lower clip, and a ratio is > 0
            bad("grpo.epsilon_low", g.epsilon_low, "must be in [0, 1): the ratio is clipped below at "
                                                   "1 - epsilon_low (0.2 in DeepSeekMath and DAPO)")
        at_least("grpo.epsilon_high", g.epsilon_high, 0, "(0 = same as epsilon_low; DAPO uses 0.28)",
                 finite_only=True)
        for opt, val, allowed in (("grpo.loss_type", g.loss_type, ("grpo", "bnpo", "dr_grpo", "dapo")),
                                  ("grpo.kl_estimator", g.kl_estimator, ("k1", "k2", "k3")),
                                  ("grpo.importance_sampling", g.importance_sampling, ("token", "sequence")),
                                  ("grpo.advantage_estimator", g.advantage_estimator, ("grpo", "rloo")),
                                  ("grpo.scale_rewards", g.scale_rewards, ("group", "batch", "none")),
                                  ("grpo.rollout_correction", g.rollout_correction, ("none", "tis", "mis")),
                                  ("grpo.correction_level", g.correction_level, ("token", "sequence"))):
            one_of(opt, val, allowed)
        if not (finite(g.correction_bound) and g.correction_bound > 0):
            bad("grpo.correction_bound", g.correction_bound, "must be a finite number > 0 (2 in Yao et al.)")
        if not (finite(g.correction_bound_low) and 0 <= g.correction_bound_low < g.correction_bound):
            bad("grpo.correction_bound_low", g.correction_bound_low,
                f"must be in [0, correction_bound = {g.correction_bound})")
        if g.correction_bound_low and g.rollout_correction != "mis":
            bad("grpo.correction_bound_low", g.correction_bound_low,
                "needs --grpo.rollout_correction mis (tis truncates from above only)")
        if g.rollout_correction == "none":
            for opt, val, default in (("grpo.correction_level", g.correction_level, "token"),
                                      ("grpo.correction_bound", g.correction_bound, 2.0)):
                if val != default:
                    bad(opt, val, "has no effect with --grpo.rollout_correction none (tis or mis turn it on)")
        if not 0 <= g.top_entropy_quantile <= 1:
            bad("grpo.top_entropy_quantile", g.top_entropy_quantile,
                "must be in [0, 1]: the share of tokens that keep the policy gradient (1 = all)")
        check_rewards("grpo.rewards", g.rewards, g.reward_weights)
        at_least("grpo.max_generation_rounds", g.max_generation_rounds, 1,
                 "(1 = generate once; verl's 0, no limit, is not offered: data with no signal would never end)")
        if not g.dynamic_sampling and g.max_generation_rounds != GRPOConfig.max_generation_rounds:
            bad("grpo.max_generation_rounds", g.max_generation_rounds, "needs --grpo.dynamic_sampling true")
        if not 0 <= g.ref_mix_alpha <= 1:
            bad("grpo.ref_mix_alpha", g.ref_mix_alpha, "must be in [0, 1]")
        at_least("grpo.ref_refresh_steps", g.ref_refresh_steps, 0, "(0 = never)")
        if g.ref_refresh_steps and g.beta == 0:
            bad("grpo.ref_refresh_steps", g.ref_refresh_steps, "needs beta > 0 (no reference model otherwise)")
        if g.ref_refresh_steps and self.model.lora_rank and g.ref_mix_alpha != 1:
            bad("grpo.ref_mix_alpha", g.ref_mix_alpha, "must be 1 with --model.lora_rank > 0 and ref_refresh_steps: "
                                                       "the refreshed reference is the policy of that step, kept as a "
                                                       "copy of its adapters; a mix of two adapters' B A is not one "
                                                       "adapter of the same rank")
        try:
            self.rewards.check()
        except ValueError as e:
            raise ConfigError(f"--rewards.{e}") from None
        at_least("train.max_steps", t.max_steps, 1)


def check_tools(r: RolloutConfig, g: GRPOConfig) -> None:
    """rollout.tools loadable (imported here: a wrong module or file fails at start) and the
    options that only mean something with tools left alone without them."""
    if not r.tools:
        for opt, val in (("rollout.max_turns", r.max_turns), ("rollout.tool_timeout_s", r.tool_timeout_s),
                         ("rollout.tool_workers", r.tool_workers), ("rollout.tools_prompt", r.tools_prompt)):
            if val != getattr(RolloutConfig, opt.split(".")[1]):
                bad(opt, val, "needs --rollout.tools (no tool, one assistant turn)")
        return
    from r1train.tools import ToolSpecError, load_tools
    try:
        load_tools(r.tools)
    except ToolSpecError as e:
        raise ConfigError(str(e)) from None
    at_least("rollout.max_turns", r.max_turns, 1, "(assistant segments of a completion; 1 = no call answered)")
    at_least("rollout.tool_workers", r.tool_workers, 1)
    if not (finite(r.tool_timeout_s) and r.tool_timeout_s > 0):
        bad("rollout.tool_timeout_s", r.tool_timeout_s, "must be a finite number of seconds > 0")
    if r.compile_decode:
        bad("rollout.compile_decode", r.compile_decode, "does not take --rollout.tools: a multi-turn row's "
                                                         "decode steps insert tool turns of varying widths")
