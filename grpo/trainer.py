"""The GRPO trainer (R1-Zero stage): `torchrun train.py grpo [--recipe ...] [--section.field v]`.

One optimizer step, in named phases:
  1. sample prompts   - this step's slice of a seeded, epoch-wise permutation of the train set
  2. generate         - group_size completions per prompt (grpo/rollout.py), KV cache, seeded per row
  3. score            - every reward function, weighted, NaN = no opinion (rewards)
  4. advantages       - group-normalized (grpo/advantages.py), on whole groups of one rank
  5. old / ref logps  - no grad, fused log-prob kernel at the sampling temperature
  6. update           - num_iterations passes over micro-batches, gradient accumulation,
                        clipped policy loss + beta * KL (grpo/loss.py), AdamW, grad clipping
  7. ref refresh      - optional: ref <- alpha * policy + (1 - alpha) * ref every tau steps;
                        once refreshed, the reference is saved in the checkpoints too
  8. log, evaluate, checkpoint

Departures from DeepSeekMath's GRPO, said out loud:
- with num_iterations == 1 the old policy is the current one, so old_logps = logps.detach():
  the ratio is 1 and the clip never binds (TRL and verl do the same); no extra forward.
- micro-batches are shuffled only when num_iterations > 1: with one pass the order cannot change
  the summed gradient, and a fixed order keeps runs of different world sizes bit-comparable.
- the loss of each micro-batch is rescaled so that the accumulated, rank-averaged gradient equals
  the gradient of the loss on the whole global batch (see `_loss_scale`).
"""
from __future__ import annotations

import json
import math
from contextlib import closing, nullcontext

import torch

from data.task import task_records
from grpo.advantages import (batch_reward_std, combine_rewards, group_advantages, rloo_advantages,
                             zero_std_groups)
from grpo.config import EMBEDDED, DataConfig, GRPOJobConfig
from grpo.evaluate import encode_prompts, evaluate
from grpo.loss import policy_loss
from rewards import get_reward_functions
from grpo.rollout import PolicyModel, generate, pad_prompts
from infra.checkpoint import CheckpointManager, export_hf
from infra.config import ConfigError, format_config, load_recipe, to_dict
from infra.dist import all_gather_cat, all_reduce_sum, decoder_layers, set_gathered, shard_model
from infra.logging import MetricsLogger, ProgressBar, clock, say, step_line, write_jsonl
from infra.loop import (StepInterrupted, check_finite_params, epoch_order, eval_due, generation_all_done,
                        open_run, record_eval, save_and_stop, start_run, stop_agreed, stop_before_update,
                        stop_signals)
from infra.model import build_optimizer, build_scheduler, grad_norm_and_clip, load_model
from infra.resume import apply_optimizer_options, check_resume


def row_seed(seed: int, step: int, row: int) -> int:
    """Seed of one completion's sampler: depends on (seed, step, global row) only."""
    return (seed * 0x9E3779B1 + step * 0x85EBCA77 + row * 0xC2B2AE3D) % (2**61 - 1)


def load_train_records(d: DataConfig, seed: int) -> list[dict]:
    """The training problems of `d` alone (rejection sampling and distillation need no more)."""
    if d.source == EMBEDDED:
        return task_records(d.task, d.num_train, seed=seed, split="train")
    from data import load_records
    return list(load_records(d.source, schema=d.schema, split=d.train_split, on_bad_row=d.on_bad_row,
                             test_size=d.test_size, seed=seed).records)


def load_datasets(cfg: GRPOJobConfig) -> tuple[list[dict], list[dict]]:
    d = cfg.data
    train = load_train_records(d, cfg.train.seed)
    if d.source == EMBEDDED:
        return train, task_records(d.task, d.num_eval, seed=cfg.train.seed, split="test")
    from data import load_held_out
    # The same rule as SFT's held-out problems (data.loaders.load_held_out): never a row trained on.
    evals = load_held_out(d.source, d.eval_source, train_split=d.train_split, eval_split=d.eval_split,
                          schema=d.schema, on_bad_row=d.on_bad_row, test_size=d.test_size,
                          seed=cfg.train.seed).records[: d.num_eval]
    return train, list(evals)


def prompt_order(n: int, seed: int, step: int, count: int) -> list[int]:
    """Indices of the `count` prompts of `step` (1-based) in a stream of seeded epoch permutations."""
    return epoch_order(n, seed, (step - 1) * count, count)


def _saved_ref_refreshes(path, state: dict) -> int:
    """Reference refreshes applied before checkpoint `path` was taken."""
    if "ref_refreshes" in state:
        return int(state["ref_refreshes"])
    # Older checkpoints did not count them: take the count the checkpoint's config implies.
    g = load_recipe(path / "config.yaml").get("grpo") or {}
    tau, beta = int(g.get("ref_refresh_steps", 0)), float(g.get("beta", 0))
    return int(state["step"]) // tau if tau and beta > 0 else 0


def _loss_scale(loss_type: str, rows: int, local_rows: int, tokens, local_tokens, world: int):
    """Factor that turns one micro-batch's loss into its share of the global-batch loss.

    FSDP averages gradients over ranks, so a loss whose normalization is already global (dapo's
    num_loss_tokens) is multiplied by the world size; the per-rank means (grpo, dr_grpo: over
    sequences; bnpo: over tokens) are weighted by the micro-batch's share of the rank's batch.
    """
    if loss_type == "dapo":
        return float(world)
    if loss_type == "bnpo":
        return tokens / local_tokens.clamp(min=1)
    return rows / local_rows


def _collate(rows: list[dict], pad_id: int, device):
    """Left-pad prompts and right-pad completions of a micro-batch into one sequence tensor."""
    p = max(len(r["prompt_ids"]) for r in rows)
    t = max(len(r["completion_ids"]) for r in rows)
    ids = torch.full((len(rows), p + t), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), p + t), dtype=torch.long)
    targets = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t))
    for i, r in enumerate(rows):
        pi, ci = r["prompt_ids"], r["completion_ids"]
        ids[i, p - len(pi):p] = torch.tensor(pi)
        ids[i, p:p + len(ci)] = torch.tensor(ci)
        attn[i, p - len(pi):p + len(ci)] = 1
        targets[i, :len(ci)] = torch.tensor(ci)
        mask[i, :len(ci)] = r["loss_weight"]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), attn.to(device), pos.to(device), targets.to(device), mask.to(device), p


def _seq_logps(model, batch, temperature, with_entropy=False):
    ids, attn, pos, targets, mask, p = batch
    return model(ids, attn, pos, targets=targets, target_start=p, temperature=temperature,
                 return_entropy=with_entropy)


class GRPOTrainer:
    def __init__(self, cfg: GRPOJobConfig):
        self.cfg = cfg
        self.info, self.out = start_run(cfg, "grpo")
        self.main = self.info.is_main
        # Data and rewards before the models: a bad file or row fails in seconds, not after a
        # 7B model (and its reference copy) has loaded.
        train, evals = load_datasets(cfg)
        for col in ("prompt", "solution", "answer"):
            if train and col not in train[0]:
                raise ConfigError(f"--data.source={cfg.data.source!r}: records lack column {col!r}")
        g = cfg.grpo
        self.rewards = get_reward_functions(g.rewards, cfg.rewards, g.reward_weights or None)
        self.weights = [w for _, _, w in self.rewards]

        m = cfg.model
        path, self.tokenizer, lm = load_model(m, self.out, self.info)
        self.hf_config = lm.config
        self.policy = shard_model(PolicyModel(lm), decoder_layers(lm), self.info)
        self.ref = None
        if cfg.grpo.beta > 0:
            _, _, ref_lm = load_model(m, self.out, self.info, trainable=False)
            self.ref = shard_model(PolicyModel(ref_lm), decoder_layers(ref_lm), self.info,
                                   reshard_after_forward=True).eval()
        # Single-GPU runs compute in bf16 through autocast; FSDP runs through its MixedPrecisionPolicy.
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.info.device.type == "cuda" and not self.info.distributed else nullcontext())

        o = cfg.optim
        self.optimizer = build_optimizer(self.policy.parameters(), o.lr, o.weight_decay, (o.beta1, o.beta2))
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=o.warmup_steps,
                                         max_steps=cfg.train.max_steps, schedule=o.schedule,
                                         min_lr_ratio=o.min_lr_ratio)
        self.train_records, self.train_ids, dropped = encode_prompts(self.tokenizer, train, cfg.data.max_prompt_tokens)
        self.eval_records, self.eval_ids, _ = encode_prompts(self.tokenizer, evals, cfg.data.max_prompt_tokens)
        if not self.train_records:
            raise ConfigError(f"--data.source={cfg.data.source!r}: no training prompts left "
                              f"(dropped {dropped} longer than --data.max_prompt_tokens)")
        if self.main and dropped:
            print(f"[grpo] dropped {dropped} prompts longer than {cfg.data.max_prompt_tokens} tokens")

        self.ckpt = CheckpointManager(self.out / "checkpoints", self.info, cfg.train.keep_last)
        self.logger = MetricsLogger(self.out, self.main,
                                    cfg.train.wandb_project if cfg.train.wandb else None,
                                    config=to_dict(cfg))
        self.step = 0
        self.ref_refreshes = 0  # refreshes applied to self.ref: 0 means it is the initial model
        self.nonfinite_in_row = 0
        self.stop_requested = False
        self.eval_history: list[dict] = []

    # ---------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "nonfinite_in_row": self.nonfinite_in_row,
                "eval_history": json.dumps(self.eval_history), "ref_refreshes": self.ref_refreshes}

    def save(self) -> None:
        # The reference is saved only once a refresh has moved it: until then it is the initial
        # model, which resume loads from model.path anyway.
        extra = {"ref": self.ref} if self.ref is not None and self.ref_refreshes else None
        self.ckpt.save(self.step, self.policy, self.optimizer, self._trainer_state(),
                       format_config(self.cfg), extra_models=extra)

    def maybe_resume(self) -> None:
        latest = open_run(self.ckpt, self.out, self.cfg.train.resume, "grpo", format_config(self.cfg))
        if latest is None:
            return
        changed = check_resume(latest, self.cfg, "grpo")  # refuses a different run's options
        state = self.ckpt.load(latest, self.policy, self.optimizer,
                               extra_models={"ref": self.ref} if self.ref is not None else None)
        self.scheduler.load_state_dict(state["scheduler"])
        apply_optimizer_options(self.optimizer, self.scheduler, self.cfg.optim)
        self.step = int(state["step"])
        self.nonfinite_in_row = int(state["nonfinite_in_row"])
        self.eval_history = json.loads(state["eval_history"])
        self.logger.truncate_after(self.step)
        if self.ref is not None:
            self.ref_refreshes = _saved_ref_refreshes(latest, state)
            # A checkpoint without reference weights is exact only if its reference was never
            # refreshed (it is then the initial model, just loaded from model.path). That holds
            # when refreshes are turned on at resume: they start from the initial reference, as
            # if the run had had them from this step on. A refreshed reference that was not saved
            # (checkpoints from before references were saved) cannot be rebuilt: the initial one
            # would silently change the KL term, so refuse.
            if self.ref_refreshes and "ref" not in state["extra_models"]:
                raise ConfigError(
                    f"--grpo.ref_refresh_steps: checkpoint {latest} was taken after "
                    f"{self.ref_refreshes} reference refreshes but does not hold the refreshed "
                    f"reference model, and the initial one would change the KL term. Start over "
                    f"with --train.resume false, or resume without a reference with --grpo.beta 0.")
        if self.main:
            restored = f", reference refreshed {self.ref_refreshes} times" if self.ref_refreshes else ""
            print(f"[grpo] resumed from {latest} at step {self.step}{restored}", flush=True)
            for line in changed:
                print(line, flush=True)

    def _on_signal(self, signum, frame):
        self.stop_requested = True
        if self.main:
            say(f"\n[grpo] signal {signum}: saving a checkpoint at the next safe point, then exiting")

    def _stop_point(self) -> None:
        """A safe point before the step's first update (infra/loop.py): stop if any rank got a signal."""
        if stop_agreed(self.stop_requested, self.info.device):
            raise StepInterrupted

    # ---------------------------------------------------------------- one step
    def rollout_step(self) -> tuple[list[dict], dict]:
        """Phases 1-4: prompts, generation, rewards, advantages. Returns this rank's rows."""
        cfg, info, g, r = self.cfg, self.info, self.cfg.grpo, self.cfg.rollout
        timings = {}
        # 1. sample prompts: this rank's whole groups
        t0 = clock(info.device)
        per_rank = g.prompts_per_step // info.world_size
        order = prompt_order(len(self.train_records), cfg.train.seed, self.step, g.prompts_per_step)
        mine = order[info.rank * per_rank:(info.rank + 1) * per_rank]
        first_prompt = info.rank * per_rank
        # 2. generate, in chunks of prompts_per_generation prompts
        chunk = r.prompts_per_generation or per_rank
        rows = []
        self.policy.eval()
        set_gathered(self.policy, True)
        for c in range(0, per_rank, chunk):
            idx = mine[c:c + chunk]
            prompts = [self.train_ids[i] for i in idx for _ in range(r.group_size)]
            ids, mask = pad_prompts(prompts, self.tokenizer.pad_token_id, info.device)
            g0 = (first_prompt + c) * r.group_size
            seeds = [row_seed(cfg.train.seed, self.step, g0 + j) for j in range(len(prompts))]
            with self.autocast:
                out = generate(self.policy, self.tokenizer, ids, mask, seeds=seeds,
                               max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                               top_k=r.top_k, top_p=r.top_p,
                               stop_strings=r.stop_strings,
                               all_done=generation_all_done(info.device, lambda: self.stop_requested))
            for j in range(len(prompts)):
                m = out.completion_mask[j].bool()
                rows.append({"record": self.train_records[idx[j // r.group_size]],
                             "prompt_ids": prompts[j], "completion_ids": out.completion_ids[j][m].tolist(),
                             "text": out.texts[j], "truncated": bool(out.truncated[j])})
        set_gathered(self.policy, False)
        self.policy.train()
        timings["time/generate"] = clock(info.device) - t0
        self._stop_point()

        # 3. score: [N, F], NaN where a reward has no opinion
        t0 = clock(info.device)
        texts = [x["text"] for x in rows]
        columns = {k: [x["record"].get(k, "") for x in rows] for k in ("solution", "answer", "problem", "prompt")}
        columns["completion_ids"] = [x["completion_ids"] for x in rows]
        per_fn = torch.tensor([[math.nan if v is None else float(v) for v in fn(texts, **columns)]
                               for _, fn, _ in self.rewards], dtype=torch.float64).T  # [N, F]
        timings["time/score"] = clock(info.device) - t0
        self._stop_point()

        # 4. advantages on this rank's whole groups
        rewards, valid = combine_rewards(per_fn, self.weights)  # [N], [N]
        if g.advantage_estimator == "rloo":
            adv = rloo_advantages(rewards, r.group_size, valid=valid)
        else:
            std = None
            if g.scale_rewards == "batch":  # the std of the whole global batch, every rank's rows
                dev = info.device
                std = batch_reward_std(all_gather_cat(rewards.to(dev)).cpu(),
                                       all_gather_cat(valid.to(dev, rewards.dtype)).cpu() > 0)
            adv = group_advantages(rewards, r.group_size, scale=g.scale_rewards, valid=valid,
                                   batch_std=std)
        flat = zero_std_groups(rewards, r.group_size, valid=valid)  # [num_groups]
        for j, x in enumerate(rows):
            keep = not (g.mask_truncated and x["truncated"]) and not (g.drop_zero_std_groups and flat[j // r.group_size])
            x.update(advantage=float(adv[j]), reward=float(rewards[j]), loss_weight=1.0 if keep else 0.0,
                     rewards={name: float(per_fn[j, f]) for f, (name, _, _) in enumerate(self.rewards)})
        stats = {"per_fn": per_fn, "rewards": rewards, "flat": flat.double(), **timings}
        return rows, stats

    def update_step(self, rows: list[dict]) -> dict:
        """Phases 5-6: old/ref log-probs, then num_iterations passes of accumulated updates."""
        cfg, info, g, r = self.cfg, self.info, self.cfg.grpo, self.cfg.rollout
        mb = g.micro_batch_size
        pad = self.tokenizer.pad_token_id
        micro = [rows[i:i + mb] for i in range(0, len(rows), mb)]
        # 5. old-policy and reference log-probs, no grad
        t0 = clock(info.device)
        with torch.no_grad(), self.autocast:
            for part in micro:
                self._stop_point()
                batch = _collate(part, pad, info.device)
                if g.num_iterations > 1:
                    old = _seq_logps(self.policy, batch, r.temperature)
                    for x, lp in zip(part, old):
                        x["old_logps"] = lp
                if self.ref is not None:
                    ref = _seq_logps(self.ref, batch, r.temperature)
                    for x, lp in zip(part, ref):
                        x["ref_logps"] = lp
        t_logp = clock(info.device) - t0

        # 6. update
        t0 = clock(info.device)
        local_tokens = torch.tensor(float(sum(len(x["completion_ids"]) * x["loss_weight"] for x in rows)))
        global_tokens = all_reduce_sum(local_tokens.clone().to(info.device))
        acc = {k: torch.zeros((), device=info.device) for k in
               ("loss", "kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "entropy")}
        gen = torch.Generator().manual_seed(row_seed(cfg.train.seed, self.step, 7))
        skipped = False
        for it in range(g.num_iterations):
            order = torch.randperm(len(rows), generator=gen).tolist() if g.num_iterations > 1 else list(range(len(rows)))
            parts = [[rows[i] for i in order[k:k + mb]] for k in range(0, len(rows), mb)]
            for part in parts:
                if it == 0:  # before the step's first update the previous step's state is intact
                    self._stop_point()
                batch = _collate(part, pad, info.device)
                with self.autocast:
                    logps, entropy = _seq_logps(self.policy, batch, r.temperature, with_entropy=True)
                mask = batch[4]
                t = logps.shape[1]
                old = (torch.stack([torch.nn.functional.pad(x["old_logps"], (0, t - len(x["old_logps"])))[:t] for x in part])
                       if g.num_iterations > 1 else logps.detach())
                ref = (torch.stack([torch.nn.functional.pad(x["ref_logps"], (0, t - len(x["ref_logps"])))[:t] for x in part])
                       if self.ref is not None else None)
                adv = torch.tensor([x["advantage"] for x in part], device=info.device)
                loss, m = policy_loss(logps, old, adv, mask, ref_logps=ref, beta=g.beta,
                                      epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high or None,
                                      loss_type=g.loss_type, importance_sampling=g.importance_sampling,
                                      kl_estimator=g.kl_estimator, max_completion_length=r.max_new_tokens,
                                      num_loss_tokens=global_tokens)
                scale = _loss_scale(g.loss_type, len(part), len(rows), mask.sum(), local_tokens, info.world_size)
                # Each pass ends in its own optimizer step, so each pass carries the whole
                # batch's loss: dividing by num_iterations would shrink every update by 1/mu.
                (loss * scale).backward()
                # Metrics stay on the device until the step ends: one host sync per step.
                share = len(part) / len(rows) / g.num_iterations
                acc["loss"] += loss.detach() * share
                acc["entropy"] += (entropy.detach() * mask).sum() / mask.sum().clamp(min=1) * share
                for k in ("kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean"):
                    if k in m:
                        acc[k] += m[k] * share
            if not self._optimizer_step(acc):
                skipped = True
        acc = {k: float(v) for k, v in acc.items()}
        acc["time/logprob"] = t_logp
        acc["time/update"] = clock(info.device) - t0
        acc["skipped_update"] = float(skipped)
        return acc

    def _optimizer_step(self, acc: dict) -> bool:
        """Clip, check for non-finite values, step. False (and no update) when non-finite."""
        norm = grad_norm_and_clip(self.policy.parameters(), self.cfg.optim.max_grad_norm)
        acc["grad_norm"] = norm.detach()
        finite = (torch.isfinite(norm) & torch.isfinite(torch.as_tensor(acc["loss"]))).float().reshape(1)
        finite = all_reduce_sum(finite.to(self.info.device)).item() == self.info.world_size
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            if self.main:
                say(f"[grpo] step {self.step}: non-finite loss/grad norm "
                      f"({float(acc['loss'])}, {float(norm)}): update skipped "
                      f"({self.nonfinite_in_row}/{self.cfg.train.max_nonfinite} in a row)")
            if self.nonfinite_in_row >= self.cfg.train.max_nonfinite:
                raise RuntimeError(
                    f"[grpo] {self.nonfinite_in_row} non-finite updates in a row at step {self.step}; "
                    f"stopping. The last checkpoint in {self.ckpt.root} is intact. Lower --optim.lr, "
                    f"check the rewards for NaN, or raise --train.max_nonfinite.")
            return False
        self.nonfinite_in_row = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        check_finite_params(self.policy.parameters(), self.step, self.ckpt, self.info.device, "grpo")
        return True

    def refresh_reference(self) -> None:
        """Phase 7 (TR-DPO style): ref <- alpha * policy + (1 - alpha) * ref, shard by shard."""
        a = self.cfg.grpo.ref_mix_alpha
        with torch.no_grad():
            for p_ref, p in zip(self.ref.parameters(), self.policy.parameters()):
                p_ref.mul_(1 - a).add_(p.detach(), alpha=a)
        self.ref_refreshes += 1

    # ---------------------------------------------------------------- the loop
    def run_eval(self) -> dict:
        r = self.cfg.rollout
        res = evaluate(self.policy, self.tokenizer, self.eval_records, self.eval_ids, self.info,
                       max_new_tokens=r.max_new_tokens, temperature=r.eval_temperature,
                       seed=self.cfg.train.seed, return_samples=len(self.eval_records))
        return record_eval(self, "grpo", res)

    def train(self) -> dict:
        from grpo.metrics import step_metrics

        cfg, t = self.cfg, self.cfg.train
        self.maybe_resume()
        # Exits in reverse order: the old signal handlers come back, then the logger closes.
        with closing(self.logger), stop_signals(self._on_signal):
            if self.step == 0:
                self.run_eval()
            bar = ProgressBar(t.max_steps, "grpo", enabled=self.main and t.progress, start=self.step)
            while self.step < t.max_steps:
                self.step += 1
                t0 = clock(self.info.device)
                try:
                    rows, stats = self.rollout_step()
                    upd = self.update_step(rows)
                except StepInterrupted:
                    return stop_before_update(self, "grpo")
                if cfg.grpo.ref_refresh_steps and self.ref is not None and self.step % cfg.grpo.ref_refresh_steps == 0:
                    self.refresh_reference()
                self.scheduler.step()
                metrics = step_metrics(self, rows, stats, upd, clock(self.info.device) - t0)
                self.logger.log(metrics, self.step)
                if self.main and (self.step % t.log_every == 0):
                    say(step_line(self.step, t.max_steps, metrics,
                                    ["reward", "accuracy/mean", "format/mean", "reward_std", "loss", "kl",
                                     "completion_length/mean", "grad_norm", "lr", "time/step"]))
                if self.main and t.sample_every and self.step % t.sample_every == 0:
                    write_jsonl(self.out / "samples.jsonl", [
                        {"step": self.step, "problem": x["record"]["problem"],
                         "answer": x["record"].get("answer", ""), "completion": x["text"],
                         "reward": x["reward"], "advantage": x["advantage"], **x["rewards"]} for x in rows[:8]])
                bar.update(1, f"reward={metrics['reward']:.3f}")
                if eval_due(self.step, t):
                    self.run_eval()
                save, stop = save_and_stop(self.step, t, self.info.device, self.stop_requested)
                if save:
                    self.save()
                if stop:
                    bar.close()
                    if self.main:
                        say(f"[grpo] stopped by signal at step {self.step}; resume with the same command")
                    return {"stopped": True, "step": self.step}
            bar.close()
            final = self.run_eval()
            self.save()
            if t.export:
                export_hf(self.policy, self.hf_config, self.tokenizer, self.out / "final", self.info, prefix="lm.",
                          config_text=format_config(self.cfg))
                if self.main:
                    print(f"[grpo] exported {self.out / 'final'}", flush=True)
            return {**final, "initial": self.eval_history[0], "eval_history": self.eval_history}


def main(argv: list[str]) -> dict:
    from infra.config import parse_args

    cfg = parse_args(GRPOJobConfig, argv, prog="grpo")
    return GRPOTrainer(cfg).train()
