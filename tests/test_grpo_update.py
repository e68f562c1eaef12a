"""The GRPO update step against an independent whole-batch computation, in one process.

Every optimizer step must follow the gradient of the loss on the whole batch at the weights it
starts from, however the batch is cut into micro-batches and however many passes
(num_iterations, mu) are taken over it: accumulation and the per-pass steps are bookkeeping, not
part of the objective (TRL's num_iterations, verl's ppo_epochs). And dropout is off by default,
so that on identical weights policy and reference agree exactly.
"""
import pytest
import torch

from r1train.data.tiny import build_tiny_model
from r1train.grpo.config import GRPOJobConfig
from r1train.grpo.loss import policy_loss
from r1train.grpo.trainer import GRPOTrainer
from r1train.model.attention import attention_implementation


def _trainer(model_path, out, keep_dropout=False, checkpointing=False, **grpo):
    cfg = GRPOJobConfig()
    cfg.model.path, cfg.model.keep_dropout = model_path, keep_dropout
    cfg.model.gradient_checkpointing = checkpointing
    cfg.data.num_train, cfg.data.num_eval = 16, 2
    cfg.data.task.max_operands = 2
    cfg.rollout.group_size, cfg.rollout.max_new_tokens = 4, 24
    cfg.grpo.prompts_per_step, cfg.grpo.micro_batch_size = 4, 4
    # A random model is never right; these two rewards vary between its completions, so the
    # advantages, and the gradients compared below, are not zero.
    cfg.grpo.rewards = ["repetition_penalty", "language_consistency"]
    cfg.grpo.beta = 0.04
    for k, v in grpo.items():
        setattr(cfg.grpo, k, v)
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 0
    cfg.train.output_dir, cfg.train.progress = str(out), False
    torch.manual_seed(0)
    return GRPOTrainer(cfg)


def _whole_batch_grads(trainer, batch) -> dict[str, torch.Tensor]:
    """d loss / d theta of the whole batch as ONE micro-batch, at the current weights: one
    process, so the batch's own counts are the step's (policy_loss's default denominator)."""
    g, r = trainer.cfg.grpo, trainer.cfg.rollout
    trainer.optimizer.zero_grad(set_to_none=True)
    whole = batch.micro(list(range(len(batch))))
    with attention_implementation(trainer.policy.lm, "sdpa"):  # padded rows; a checkpointed backward too
        logps = trainer.policy.completion_logprobs(whole.input_ids, whole.attention_mask, whole.position_ids,
                                                   whole.completion_ids, whole.prompt_len,
                                                   temperature=r.temperature)  # [N, T]
        old = whole.old_logps if g.num_iterations > 1 else logps.detach()
        loss, _ = policy_loss(logps, old, whole.advantages.float(), whole.loss_mask, ref_logps=whole.ref_logps,
                              beta=g.beta, epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high or None,
                              loss_type=g.loss_type, importance_sampling=g.importance_sampling,
                              kl_estimator=g.kl_estimator, max_completion_length=r.max_new_tokens)
        loss.backward()
    return {n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type, mu, options", [
    ("grpo", 1, {}), ("grpo", 3, {}), ("bnpo", 2, {}), ("dapo", 2, {}),
    ("grpo", 2, {"packing": False}),  # the padded per-row passes
    ("dr_grpo", 1, {"micro_batch_tokens": 160}),  # token-budget micro-batches, groups split across them
    ("grpo", 2, {"checkpointing": True}),  # the backward recomputes the packed forward
    ("grpo", 2, {"importance_sampling": "sequence"}),  # GSPO
])
def test_each_optimizer_step_follows_the_whole_batch_gradient(tiny, tmp_path, loss_type, mu, options):
    """The trainer's passes (packed by default) against the padded whole batch: the packed rows'
    gradient, the prompt's summed over its group, is the padded rows' gradient."""
    trainer = _trainer(tiny, tmp_path, loss_type=loss_type, num_iterations=mu, **options)
    trainer.step = 1
    batch, _ = trainer.rollout()
    assert len(set(batch.advantages.tolist())) > 1, "all advantages equal: a vacuous comparison"
    if "micro_batch_tokens" in options:  # prompts of ~106 tokens: a group of 4 needs two micro-batches
        assert len(trainer._micro_batches(batch)) > len(batch) // trainer.cfg.rollout.group_size
    trainer.logprobs(batch)
    real_step, checked = trainer.optimizer_step, []

    def checking_step(loss):
        params = dict(trainer.policy.named_parameters())
        accumulated = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
        want = _whole_batch_grads(trainer, batch)
        scale = max(v.abs().max().item() for v in want.values())
        assert scale > 0
        for n, w in want.items():
            torch.testing.assert_close(accumulated[n], w, rtol=1e-4, atol=1e-6 * scale, msg=n)
        for n, p in params.items():  # the step itself runs on what the trainer accumulated
            p.grad = accumulated.get(n)
        checked.append(scale)
        return real_step(loss)

    trainer.optimizer_step = checking_step
    trainer.update(batch)
    assert len(checked) == mu  # one optimizer step per pass, each checked


def test_dropout_is_off_by_default(tmp_path):
    """A model whose config has attention dropout 0.1: at step 1 the policy equals the
    reference, so the KL is exactly 0, unless dropout is kept (then it is noise)."""
    path = str(build_tiny_model(tmp_path / "dropout-model", seed=0, attention_dropout=0.1))
    kl = {}
    for keep in (False, True):
        trainer = _trainer(path, tmp_path / f"run-{keep}", keep_dropout=keep)
        trainer.step = 1
        batch, _ = trainer.rollout()
        trainer.logprobs(batch)
        kl[keep] = trainer.update(batch)["sums"]["kl"]
    assert kl[False] == 0.0
    assert kl[True] != 0.0
