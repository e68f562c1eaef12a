"""The GRPO trainer (R1-Zero stage): `torchrun train.py grpo [--recipe ...] [--section.field v]`.

One optimizer step, in named phases (`train_step`; the loop around it is `run.loop.Trainer`):
  1. sample prompts   - this step's slice of a seeded, epoch-wise permutation of the train set
  2. generate         - group_size completions per prompt (model/engine.py), seeded per row;
                        with rollout.tools, multi-turn rows: a call pauses a row, a worker pool
                        answers it, the template's tool turn is inserted and the row goes on
  3. score            - every reward function, weighted, NaN = no opinion (rewards/); they read
                        each completion after data.response_prefix, which ended its prompt
     With grpo.dynamic_sampling (DAPO), 1-3 repeat in rounds of new prompts until the step has
     prompts_per_step groups whose rewards differ; the chosen groups move to the ranks that
     train them (grpo/dynamic.py). The data position is kept in the checkpoints.
  4. advantages       - group-normalized (grpo/advantages.py), on whole groups of one rank
  5. old / ref logps  - no grad, fused log-prob kernel at the sampling temperature (and the
                        policy's entropies, when grpo.top_entropy_quantile selects tokens by them)
  6. update           - num_iterations passes over micro-batches, gradient accumulation,
                        clipped policy loss + beta * KL (grpo/loss.py), AdamW, grad clipping;
                        each token's policy term weighted by the rollout correction and the
                        entropy selection when they are on (`token_weights`)
  Phases 5 and 6 run on packed rows (grpo.packing, grpo/batch.py): each prompt once, then its
  completions, no padding; micro-batches of micro_batch_size completions or micro_batch_tokens.
  7. ref refresh      - optional: ref <- alpha * policy + (1 - alpha) * ref every tau steps;
                        once refreshed, the reference is saved in the checkpoints too
  With LoRA (--model.lora_rank) only the adapters train, and the reference of phase 5 is the
  policy itself with its adapters off: the base model exactly, no second model. A refresh
  (ref_mix_alpha 1) copies the adapters into a frozen reference slot of each layer, and from then
  on phase 5 computes with that slot: the merged policy of the refresh's step (model/lora.py). A
  stage given an earlier stage's adapter folder as model.path trains that adapter on, and its
  reference is where it started, base + that adapter, in the reference slot from step 0.

Departures from DeepSeekMath's GRPO, said out loud:
- with num_iterations == 1 the old policy is the current one, so old_logps = logps.detach():
  the ratio is 1 and the clip never binds (TRL and verl do the same); no extra forward.
- micro-batches are shuffled only when num_iterations > 1 (no pass's summed gradient depends on
  the order; a fixed order keeps runs of different world sizes bit-comparable). Packed passes
  shuffle whole groups, so that a group's completions still share their prompt's computation.
- rows left out of the loss (grpo.mask_truncated, grpo.drop_zero_std_groups; `loss_weight` 0)
  add no term and no tokens: they leave the token counts of "bnpo" and "dapo", but stay in the N
  of "grpo" and "dr_grpo", which count the completions sampled (TRL's mask_truncated_completions,
  which zeroes their completion mask, does the same). grpo.dynamic_sampling resamples instead, as
  DAPO does; where its rounds run out, zero-signal groups fill the batch (verl stops the run).
- grpo.rollout_correction compares the sampler's log-probs (`Rollout.logps`) with pi_old as the
  trainer computes it: the update's logps.detach() when num_iterations is 1 (the same numbers
  as the extra forward TRL runs for it), phase 5's old_logps otherwise. `mismatch_kl`, the k3
  estimate of KL(sampler || trainer) over the step's loss tokens, is logged either way.
- grpo.top_entropy_quantile needs every loss token's entropy before the first micro-batch
  update, since the threshold is a quantile over the whole step on every rank (the paper's
  batch-level tau, and the same mask on 1 and 2 processes): phase 5 computes them with the
  policy at the step's start. With num_iterations > 1 that pass runs anyway (old_logps; the
  fused kernel adds the entropy); with num_iterations 1 it is one extra no-grad forward of the
  policy over the batch, about a third of the update's compute (forward + backward). TRL
  thresholds each micro-batch's tokens instead, gathered over processes.
- rollout.tools: a completion holds the tool turns the engine inserted; they are attended to in
  every pass but carry no loss, KL or entropy and count in no denominator (`GRPOBatch.model_mask`,
  verl's response_mask). The rewards read the whole reply, tool turns as the template wrote them,
  and get each row's `turns`, `tool_calls`, `tool_errors` and `conversation` as columns. A row
  whose last allowed segment ends in a call is not "truncated" (grpo.mask_truncated keeps it).
- each of the num_iterations passes ends in its own optimizer step and carries the whole batch's
  loss (TRL's num_iterations, verl's ppo_epochs): micro-batch losses are divided by the count of
  the whole step (`loss_denominator`) and FSDP sums the ranks' gradients, so a pass's gradient
  is the gradient of the whole batch's loss.
"""
from __future__ import annotations

import torch

from r1train.data.problems import encode_prompts, load_problems, training_prompts
from r1train.data.prompts import with_prefix
from r1train.evaluate import EVAL_BATCH_SIZE, evaluate
from r1train.grpo.advantages import (
    batch_reward_std,
    combine_rewards,
    group_advantages,
    rloo_advantages,
    zero_std_groups,
)
from r1train.grpo.batch import GRPOBatch, split_to, token_budget_micro_batches
from r1train.grpo.config import GRPOJobConfig
from r1train.grpo.dynamic import batch_of_groups, gather_trained_groups, select_groups
from r1train.grpo.loss import (
    entropy_mask,
    entropy_threshold,
    kl_penalty,
    loss_denominator,
    policy_loss,
    rollout_correction,
)
from r1train.grpo.metrics import reward_metrics, tool_metrics, update_metrics
from r1train.inspector.records import RECORDS_FILE, GroupRecorder
from r1train.model.attention import VARLEN_ATTENTION, attention_implementation
from r1train.model.engine import Engine, row_seed
from r1train.model.load import load_model, lora_base, read_adapter_folder
from r1train.model.lora import (
    adapters_disabled,
    add_reference_adapters,
    reference_adapters,
    refresh_reference_adapters,
)
from r1train.model.memory import (
    TILE_BYTES_CPU,
    TILE_BYTES_CUDA,
    ModelShape,
    available_memory,
    check_memory,
    compute_bytes,
    estimate_memory,
    local_processes,
    packed_micro_tokens,
)
from r1train.model.policy import PolicyModel
from r1train.rewards import RewardError, RewardInterrupted, entry_text, get_reward_functions, score_completions
from r1train.rewards.reward_model import RewardModel
from r1train.run.config import ConfigError
from r1train.run.dist import (
    all_gather_cat,
    all_gather_ragged,
    all_reduce_max,
    all_reduce_sum,
    decoder_layers,
    shard_model,
)
from r1train.run.folder import on_main
from r1train.run.logging import clock, write_jsonl
from r1train.run.loop import Trainer, epoch_order
from r1train.tools.episodes import ToolEpisodes, with_episodes
from r1train.tools.stage import StageTools

STATS = ("kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean")


class GRPOTrainer(Trainer):
    tag = "grpo"
    step_keys = ("reward", "accuracy/mean", "format/mean", "reward_std", "loss", "kl",
                 "completion_length/mean", "grad_norm")
    bar_key = "reward"

    def __init__(self, cfg: GRPOJobConfig, reward_funcs: list | None = None):
        """`reward_funcs`: the rewards, from Python, instead of `cfg.grpo.rewards`: built-in
        names, references (`module:fn`, `file.py:fn`), callables `fn(completions, **columns)`
        or `(name, fn)` pairs, weighted by `cfg.grpo.reward_weights`. The run's config.yaml then
        lists them (a callable as `name=module:qualname`; rewards/custom.py)."""
        if reward_funcs is not None:
            cfg.grpo.rewards = [entry_text(e) for e in reward_funcs]  # before the config is printed, saved
        super().__init__(cfg)
        # Data and rewards before the models: a bad file or row fails in seconds, not after a
        # 7B model (and its reference copy) has loaded.
        say = (lambda line: print(f"[grpo] {line}", flush=True)) if self.main else None
        problems = load_problems(cfg.data, cfg.train.seed, say=say)
        g = cfg.grpo
        try:
            self.rewards = get_reward_functions(g.rewards if reward_funcs is None else reward_funcs,
                                                cfg.rewards, g.reward_weights or None, device=self.info.device)
        except ValueError as e:
            raise ConfigError(f"--grpo.rewards: {e}") from None
        self.weights = [w for _, _, w in self.rewards]
        for _, fn, _ in self.rewards:
            if say and isinstance(fn, RewardModel):
                say(fn.summary)

        path, tokenizer, lm = load_model(cfg.model, self.out, self.info)
        base = lora_base(path, lm, self.info)  # before sharding: it hashes the whole base
        # With LoRA the reference is the policy with its adapters off (`adapters_disabled`): the
        # base model exactly, and no second copy of the weights. A stage that trains on an earlier
        # stage's adapter (model.path = its folder) starts from base + that adapter, which is then
        # its reference: a copy of the adapter in the reference slot, as a refresh would make.
        self.ref_in_policy = g.beta > 0 and cfg.model.lora_rank > 0
        self.ref_from_start = self.ref_in_policy and read_adapter_folder(path) is not None
        if self.ref_in_policy and (g.ref_refresh_steps or self.ref_from_start):
            add_reference_adapters(lm)  # before sharding: FSDP2 shards the slot with its layer
            if self.ref_from_start:
                refresh_reference_adapters(lm)
        self.policy = shard_model(PolicyModel(lm), decoder_layers(lm), self.info)
        self.ref = None
        if g.beta > 0 and not self.ref_in_policy:
            _, _, ref_lm = load_model(cfg.model, self.out, self.info, trainable=False)
            self.ref = shard_model(PolicyModel(ref_lm), decoder_layers(ref_lm), self.info).eval()
        self.ref_refreshes = 0  # refreshes applied to the reference: 0 means it is the initial model
        # Prompts of the epoch order taken before this step (dynamic sampling takes more than
        # prompts_per_step in a step); the next step's start once this one is done.
        self.data_position = self.next_position = 0
        self.warned_cap = False  # dynamic sampling said once that a step ran out of rounds
        self.engine = Engine(self.policy, tokenizer, self.info, autocast=self.autocast,
                             compile_decode=cfg.rollout.compile_decode)
        self.setup_training(self.policy, lm.config, tokenizer, lora_base=base)

        train, held_out, r = problems.train, problems.held_out, cfg.rollout
        self.tools = None  # rollout.tools: the tools, this rank's worker pool, the schemas (tools/stage.py)
        if r.tools:
            self.tools = StageTools(r.tools, tokenizer, max_turns=r.max_turns, timeout_s=r.tool_timeout_s,
                                    workers=r.tool_workers, schemas_in_prompt=r.tools_prompt,
                                    prefix=cfg.data.response_prefix, option="--rollout.tools",
                                    model_path=cfg.model.path, sample=train[0]["prompt"] if train else None)
            train, held_out = self.tools.prompts(train), self.tools.prompts(held_out)
            if say:
                say(f"tools: {self.tools.describe()}")
        schemas = self.tools.template_schemas if self.tools else None
        self.train_records, self.train_ids, _ = training_prompts(tokenizer, train, cfg.data, "data", "grpo",
                                                                 self.main, eos_ids=self.engine.eos_token_ids,
                                                                 tools=schemas)
        self.eval_records, self.eval_ids, _ = encode_prompts(tokenizer, held_out, cfg.data.max_prompt_tokens,
                                                             cfg.data.response_prefix, schemas)
        on_main(self.info, self.check_memory)  # before anything generates; rank 0 decides for all

    def check_memory(self) -> None:
        """Refuse settings whose estimated peak memory exceeds what the device has (model/memory.py);
        print the estimate otherwise."""
        cfg, r, g, info = self.cfg, self.cfg.rollout, self.cfg.grpo, self.info
        per_rank = g.prompts_per_step // info.world_size
        longest = max((len(x) for x in self.train_ids + self.eval_ids), default=1)
        shape = ModelShape.of(self.policy.lm)
        est = estimate_memory(
            shape, gen_rows=max(min(r.prompts_per_generation or per_rank, per_rank) * r.group_size,
                                min(EVAL_BATCH_SIZE, len(self.eval_ids) * cfg.eval.samples)),
            prompt_tokens=longest, new_tokens=r.max_new_tokens,
            compute_bytes=compute_bytes(info.device, shape.param_bytes, bf16=True),  # autocast or FSDP's
            reference=self.ref is not None, step_rows=per_rank * r.group_size,
            micro_tokens=packed_micro_tokens(g.micro_batch_size, r.group_size, longest, r.max_new_tokens,
                                             g.micro_batch_tokens, g.packing),
            gradient_checkpointing=cfg.model.gradient_checkpointing, world_size=info.world_size,
            sharded=info.distributed, tile_bytes=TILE_BYTES_CUDA if info.device.type == "cuda" else TILE_BYTES_CPU)
        est.held = est.weights + est.reference
        check_memory(est, available_memory(info.device), "grpo", {
            "generation": "lower --rollout.group_size, or generate fewer prompts at once with "
                          "--rollout.prompts_per_generation (or --grpo.prompts_per_step), or --rollout.max_new_tokens",
            "update": "lower --grpo.micro_batch_size (or --grpo.micro_batch_tokens) or --rollout.max_new_tokens, "
                      "or turn on --model.gradient_checkpointing",
            "weights": "use a smaller model, --grpo.beta 0 (no reference model), or shard it over more GPUs"},
            processes=local_processes(info.device, info.world_size), say=print)

    def episodes(self, records: list[dict]) -> ToolEpisodes | None:
        """Multi-turn rows for `records` (one per row) with rollout.tools; None without tools."""
        return self.tools.episodes(records) if self.tools else None

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict:
        batch, timings = self.rollout()  # phases 1-4
        t0 = clock(self.info.device)
        self.logprobs(batch)  # phase 5
        timings["time/logprob"] = clock(self.info.device) - t0
        t0 = clock(self.info.device)
        update = self.update(batch)  # phase 6
        timings["time/update"] = clock(self.info.device) - t0
        g = self.cfg.grpo
        if g.ref_refresh_steps and self.step % g.ref_refresh_steps == 0:
            self.refresh_reference()  # phase 7
        t, names = self.cfg.train, [n for n, _, _ in self.rewards]
        if self.main and t.sample_every and self.step % t.sample_every == 0:
            write_jsonl(self.out / "samples.jsonl", [
                {"step": self.step, "problem": batch.records[j]["problem"],
                 "answer": batch.records[j].get("answer", ""), "completion": batch.texts[j],
                 "reward": float(batch.rewards[j]), "advantage": float(batch.advantages[j]),
                 **{n: float(batch.per_fn[j, f]) for f, n in enumerate(names)}}
                for j in range(min(8, len(batch)))])
        if "recorder" in update:
            self._write_records(batch, update.pop("recorder"), update.get("entropy_threshold"))
        self.data_position = self.next_position  # the step is done: a save from here on starts after it
        extra = {"entropy_threshold": update["entropy_threshold"]} if "entropy_threshold" in update else {}
        if self.tools:
            extra.update(tool_metrics(batch.episodes, (batch.completion_mask * batch.model_mask).sum(-1).cpu(),
                                      self.tools.names, self.info.device))
        return {**reward_metrics(batch.per_fn, batch.rewards, batch.lengths.cpu(), batch.truncated.cpu(),
                                 names, self.cfg.rollout.group_size, self.info.device),
                **update_metrics(update, self.info.device), **extra,
                "grad_norm": update["grad_norm"], "skipped_update": update["skipped_update"], **timings}

    def rollout(self) -> tuple[GRPOBatch, dict]:
        """Phases 1-4: this rank's prompts, their completions, rewards and advantages. With
        grpo.dynamic_sampling, phases 1-3 run in rounds until the step holds prompts_per_step
        groups whose rewards differ (grpo/dynamic.py). Also returns the step's timings (and
        dynamic/* metrics); `next_position` is where the next step's prompts start."""
        g, r = self.cfg.grpo, self.cfg.rollout
        if g.dynamic_sampling:
            batch, valid, stats = self._dynamic_rounds()
        else:
            batch, valid, stats = self._candidates(self.data_position, 0)
            self.next_position = self.data_position + g.prompts_per_step

        # 4. advantages on this rank's whole groups
        if g.advantage_estimator == "rloo":
            batch.advantages = rloo_advantages(batch.rewards, r.group_size, valid=valid)
        else:
            std = None
            if g.scale_rewards == "batch":  # the std of the whole global batch, every rank's rows
                dev = self.info.device
                std = batch_reward_std(all_gather_cat(batch.rewards.to(dev)).cpu(),
                                       all_gather_cat(valid.to(dev, batch.rewards.dtype)).cpu() > 0)
            batch.advantages = group_advantages(batch.rewards, r.group_size, scale=g.scale_rewards,
                                                valid=valid, batch_std=std)
        flat = zero_std_groups(batch.rewards, r.group_size, valid=valid).repeat_interleave(r.group_size)  # [N]
        drop = (g.mask_truncated & batch.truncated.cpu()) | (g.drop_zero_std_groups & flat)
        batch.loss_weight = (~drop).double()  # [N]
        return batch, stats

    def _candidates(self, start: int, first: int) -> tuple[GRPOBatch, torch.Tensor, dict]:
        """Phases 1-3 for prompts_per_step prompts, items `start`.. of the epoch order: this rank's
        whole groups, generated and scored. `first`: the step's global index of the first group
        (0, or a later round's; rows are seeded by their global index). Returns the batch, the
        rows that some reward had an opinion on ([N] bool), and the phases' timings."""
        cfg, info, g, r = self.cfg, self.info, self.cfg.grpo, self.cfg.rollout
        # 1. sample prompts: this rank's whole groups
        t0 = clock(info.device)
        per_rank = g.prompts_per_step // info.world_size
        order = epoch_order(len(self.train_records), cfg.train.seed, start, g.prompts_per_step)
        mine = order[info.rank * per_rank:(info.rank + 1) * per_rank]
        # 2. generate, in chunks of prompts_per_generation prompts
        chunk = r.prompts_per_generation or per_rank
        rollouts, records = [], []
        for c in range(0, per_rank, chunk):
            idx = [i for i in mine[c:c + chunk] for _ in range(r.group_size)]
            first_row = (first + info.rank * per_rank + c) * r.group_size  # global row index: seeds
            rollouts.append(self.engine.generate(
                [self.train_ids[i] for i in idx], [row_seed(cfg.train.seed, self.step, first_row + j)
                                                   for j in range(len(idx))],
                max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k,
                top_p=r.top_p, stop_strings=r.stop_strings, stop_requested=lambda: self.stop_requested,
                turns=self.episodes([self.train_records[i] for i in idx])))
            records += [self.train_records[i] for i in idx]
        batch = GRPOBatch.from_rollouts(rollouts, records, self.tokenizer.pad_token_id)
        # The rewards and samples.jsonl read the reply with the response prefix that ended its
        # prompt; completion_ids, log-probs and the loss keep the model's own tokens.
        batch.texts = with_prefix(cfg.data.response_prefix, batch.texts)
        timings = {"time/generate": clock(info.device) - t0}
        self.stop_point()

        # 3. score: [N, F], NaN where a reward has no opinion
        t0 = clock(info.device)
        failure, valid = None, None
        try:
            batch.per_fn = score_completions(self.rewards, batch.texts, with_episodes(records, batch.episodes),
                                             batch.completion_lists())  # [N, F]
            batch.rewards, valid = combine_rewards(batch.per_fn, self.weights)  # [N], [N]
            overflow = torch.nonzero(~torch.isfinite(batch.rewards)).flatten().tolist()
            if overflow:  # finite rewards times finite weights can still sum past the float range
                i = overflow[0]
                raise RewardError(f"the weighted reward of completion {i} is {batch.rewards[i].item()} (rewards "
                                  f"{batch.per_fn[i].tolist()} weighted by --grpo.reward_weights {self.weights}); "
                                  f"scale the weights down")
        except RewardInterrupted:  # a stop signal while a user's reward ran
            self.stop_requested = True
        except RewardError as e:  # stops every rank at the next line, the last step saved
            failure = RewardError(f"step {self.step}: {e}")
        timings["time/score"] = clock(info.device) - t0
        self.stop_point(failure)
        return batch, valid, timings

    def _dynamic_rounds(self) -> tuple[GRPOBatch, torch.Tensor, dict]:
        """Phases 1-3 with DAPO dynamic sampling (grpo/dynamic.py): rounds of prompts_per_step new
        groups until prompts_per_step of them carry a signal, or max_generation_rounds ran; then
        this rank's share of the chosen groups, in candidate order."""
        cfg, info, g, G = self.cfg, self.info, self.cfg.grpo, self.cfg.rollout.group_size
        P = g.prompts_per_step
        rounds, flags, stats = [], [], {"time/generate": 0.0, "time/score": 0.0}
        for k in range(g.max_generation_rounds):
            batch, valid, timings = self._candidates(self.data_position + k * P, k * P)
            stats = {key: stats[key] + timings[key] for key in stats}
            local = zero_std_groups(batch.rewards, G, valid=valid)  # [P / W], this rank's groups
            flags.append(all_gather_cat(local.to(info.device, torch.float32)).cpu() > 0)  # [P], candidate order
            rounds.append(batch)
            if int((~torch.cat(flags)).sum()) >= P:
                break
        zero_std = torch.cat(flags)  # [rounds * P]
        kept = select_groups(zero_std, P)
        t0 = clock(info.device)
        groups = gather_trained_groups(rounds, kept, info.rank, info.world_size, G)
        prompts = epoch_order(len(self.train_records), cfg.train.seed, self.data_position, len(zero_std))
        mine = [prompts[c] for c in kept[info.rank * len(groups):(info.rank + 1) * len(groups)]]
        batch = batch_of_groups(groups, [self.train_ids[i] for i in mine], [self.train_records[i] for i in mine],
                                G, self.tokenizer.pad_token_id, info.device)
        batch.rewards, valid = combine_rewards(batch.per_fn, self.weights)  # [N], [N]: as the round computed them
        stats["time/generate"] += clock(info.device) - t0
        self.next_position = self.data_position + len(zero_std)
        with_signal = int((~zero_std[kept]).sum())
        stats.update({"dynamic/rounds": len(rounds),  # generation rounds this step
                      # groups generated per group trained with a signal: what a useful group cost
                      "dynamic/groups_per_kept": len(zero_std) / with_signal if with_signal else float("nan"),
                      # share of the generated groups without signal (frac_reward_zero_std: the trained ones)
                      "dynamic/frac_zero_std_generated": zero_std.double().mean().item()})
        if with_signal < P and self.main and not self.warned_cap:
            self.warned_cap = True
            print(f"[grpo] step {self.step}: {with_signal} of {P} groups carry a signal after "
                  f"--grpo.max_generation_rounds={g.max_generation_rounds} rounds; groups whose rewards are all "
                  f"equal fill the batch (frac_reward_zero_std in metrics.jsonl counts them at every step)",
                  flush=True)
        return batch, valid, stats

    def _training_attention(self):
        """Packed passes attend within their segments, in the forward and in a checkpointed
        backward's recomputation alike (packed_logprobs alone switches for its forward only)."""
        return attention_implementation(self.policy.lm, VARLEN_ATTENTION if self.cfg.grpo.packing else None)

    def _order(self, n: int, gen: torch.Generator) -> list[int]:
        """A pass's row order when num_iterations > 1: shuffled (packed passes: whole groups)."""
        if not self.cfg.grpo.packing:
            return torch.randperm(n, generator=gen).tolist()
        G = self.cfg.rollout.group_size
        return [k * G + j for k in torch.randperm(n // G, generator=gen).tolist() for j in range(G)]

    def _micro_batches(self, batch: GRPOBatch, order: list[int] | None = None) -> list[list[int]]:
        n, g = len(batch), self.cfg.grpo
        order = list(range(n)) if order is None else order
        if not g.micro_batch_tokens:
            return [order[k:k + g.micro_batch_size] for k in range(0, n, g.micro_batch_size)]
        out = token_budget_micro_batches(order, batch.prompt_lists(), batch.lengths.tolist(), g.micro_batch_tokens)
        # Every rank runs as many forwards as the rank that needs the most (FSDP's collectives).
        return split_to(out, all_reduce_max(len(out), self.info.device))

    def _logps(self, model, mb: GRPOBatch, with_entropy: bool = False):
        """[n, t] log-probs of the micro-batch's completions (and [n, t] entropies)."""
        temperature = self.cfg.rollout.temperature
        if not self.cfg.grpo.packing:
            return model.completion_logprobs(mb.input_ids, mb.attention_mask, mb.position_ids,
                                             mb.completion_ids, mb.prompt_len, temperature=temperature,
                                             return_entropy=with_entropy)
        packed = mb.packed()
        out = model.packed_logprobs(packed.input_ids, packed.position_ids, packed.sources, packed.targets,
                                    temperature=temperature, return_entropy=with_entropy, **packed.attention())
        return tuple(packed.scatter(o) for o in out) if with_entropy else packed.scatter(out)

    @torch.no_grad()
    def logprobs(self, batch: GRPOBatch) -> None:
        """Phase 5: old-policy (num_iterations > 1) and reference log-probs, [N, T] each, and the
        policy's entropies when grpo.top_entropy_quantile < 1 (module docstring)."""
        g = self.cfg.grpo
        with self.autocast():
            for rows in self._micro_batches(batch):
                self.stop_point()
                mb = batch.micro(rows)
                if g.top_entropy_quantile < 1:  # the extra forward when num_iterations is 1
                    logps, entropy = self._logps(self.policy, mb, with_entropy=True)
                    batch.set_logps("entropy", rows, entropy)
                    if g.num_iterations > 1:
                        batch.set_logps("old_logps", rows, logps)
                elif g.num_iterations > 1:
                    batch.set_logps("old_logps", rows, self._logps(self.policy, mb))
                if self.ref is not None:
                    batch.set_logps("ref_logps", rows, self._logps(self.ref, mb))
                elif self.ref_in_policy:  # LoRA: the base, or the adapters of the last refresh
                    slot = self.ref_refreshes or self.ref_from_start
                    with (reference_adapters if slot else adapters_disabled)(self.policy.lm):
                        batch.set_logps("ref_logps", rows, self._logps(self.policy, mb))

    def update(self, batch: GRPOBatch) -> dict:
        """Phase 6: num_iterations passes, each accumulating the whole batch's gradient over
        micro-batches and ending in one optimizer step. Returns this rank's share of the step's
        loss (averaged over passes), its loss tokens counted once per pass ("tokens"), and each
        statistic's sum over those tokens ("sums"): `update_metrics` turns them into means; and
        the entropy selection's threshold, the same on every rank ("entropy_threshold"), when on."""
        info, g, r = self.info, self.cfg.grpo, self.cfg.rollout
        local_tokens = batch.loss_mask.sum()  # this rank's loss tokens
        denominator = loss_denominator(
            g.loss_type, sequences=len(batch) * info.world_size, tokens=all_reduce_sum(local_tokens.clone()),
            rank_tokens=local_tokens, world_size=info.world_size, max_completion_length=r.max_new_tokens)
        # The statistics' sums over every loss token of every pass (update_metrics divides them).
        names = ("entropy", *STATS, "mismatch_kl")
        if g.rollout_correction != "none":
            names += ("is_weight_mean", "is_truncated_frac" if g.rollout_correction == "tis" else "is_masked_frac")
        threshold = None
        if g.top_entropy_quantile < 1:  # over every loss token of the step, every rank's
            names += ("entropy_kept_frac",)
            local = batch.entropy[batch.loss_mask.to(batch.entropy.device) > 0]  # [M_rank]
            threshold = entropy_threshold(all_gather_ragged(local.to(info.device)), g.top_entropy_quantile)
        sums = {k: torch.zeros((), device=info.device) for k in names}
        recorder = self._recorder(len(batch))  # per-token records of a few groups, on sample steps
        step_loss = torch.zeros((), device=info.device)
        gen = torch.Generator().manual_seed(row_seed(self.cfg.train.seed, self.step, 7))
        skipped, norm = False, torch.zeros(())
        with self._training_attention():
            for it in range(g.num_iterations):
                order = self._order(len(batch), gen) if g.num_iterations > 1 else None
                pass_loss = torch.zeros((), device=info.device)
                for rows in self._micro_batches(batch, order):
                    if it == 0:  # before the step's first update the previous step's state is intact
                        self.stop_point()
                    mb = batch.micro(rows)
                    with self.autocast():
                        logps, entropy = self._logps(self.policy, mb, with_entropy=True)  # [n, t] each
                    mask = mb.loss_mask  # [n, t]
                    # float32 advantages under float32 or bf16 log-probs; float64 ones keep theirs
                    advantages = mb.advantages.to(info.device, torch.promote_types(logps.dtype, torch.float32))
                    old_logps = mb.old_logps if mb.old_logps is not None else logps.detach()
                    weights, selected = self._token_weights(mb, old_logps, mask, threshold)  # [n, t] or None
                    record = recorder is not None and it == g.num_iterations - 1  # the last pass's numbers
                    loss, m = policy_loss(logps, old_logps, advantages, mask,
                                          ref_logps=mb.ref_logps, beta=g.beta, epsilon_low=g.epsilon_low,
                                          epsilon_high=g.epsilon_high or None, loss_type=g.loss_type,
                                          importance_sampling=g.importance_sampling,
                                          kl_estimator=g.kl_estimator, max_completion_length=r.max_new_tokens,
                                          denominator=denominator, token_weights=weights, per_token=record)
                    if record:
                        pt = m.pop("per_token")
                        recorder.add(rows, mb.completion_mask.sum(-1), {
                            "logp": logps, "old_logp": mb.old_logps, "ref_logp": mb.ref_logps,
                            "sampler_logp": mb.sampler_logps, "ratio": pt["ratio"], "clip": pt["clip"],
                            "kl": pt.get("kl"), "entropy": entropy, "selection_entropy": mb.entropy,
                            "loss_mask": mask, "weight": weights})
                    m.update(selected)
                    loss.backward()
                    pass_loss += loss.detach()
                    # Metrics stay on the device until the step ends: one host sync per step.
                    tokens = mask.sum()  # m's means are over these tokens
                    sums["entropy"] += (entropy.detach() * mask).sum()
                    for k in names[1:]:
                        if k in m:
                            sums[k] += m[k] * tokens
                step_loss += pass_loss / g.num_iterations
                norm, stepped = self.optimizer_step(pass_loss)
                skipped |= not stepped
        out = {"loss": float(step_loss), "tokens": float(local_tokens) * g.num_iterations,
               "sums": {k: float(v) for k, v in sums.items()}, "grad_norm": float(norm),
               "skipped_update": float(skipped)}
        if threshold is not None:
            out["entropy_threshold"] = float(threshold)
        if recorder is not None:
            out["recorder"] = recorder
        return out

    def _recorder(self, rows: int) -> GroupRecorder | None:
        """Rank 0's first train.token_records groups on a sample step (None otherwise)."""
        t, G = self.cfg.train, self.cfg.rollout.group_size
        if not (self.main and t.sample_every and t.token_records and self.step % t.sample_every == 0):
            return None
        return GroupRecorder(list(range(min(t.token_records * G, rows))))

    def _write_records(self, batch: GRPOBatch, recorder: GroupRecorder, threshold: float | None) -> None:
        """The recorded groups to tokens.jsonl, with why each token left the loss (or its policy term)."""
        g = self.cfg.grpo
        weight = batch.loss_weight.tolist()
        why_row = ["" if w else ("truncated" if g.mask_truncated and bool(batch.truncated[i]) else "zero-std group")
                   for i, w in enumerate(weight)]

        def why_token(values: dict) -> list[str]:
            # a tool turn (rollout.tools) is context: its tokens were inserted, not written
            inserted = ["tool turn (inserted, no loss)" if m == 0 else "" for m in values["loss_mask"].tolist()]
            if "weight" not in values:
                return inserted
            low = values["selection_entropy"] < threshold if threshold is not None else None
            return [tool or ("" if w else "low entropy (policy term 0)" if low is not None and low[k]
                             else "IS ratio out of bounds (policy term 0)")
                    for k, (w, tool) in enumerate(zip(values["weight"].tolist(), inserted))]
        settings = {"epsilon_low": g.epsilon_low, "epsilon_high": g.epsilon_high or g.epsilon_low, "beta": g.beta,
                    "kl_estimator": g.kl_estimator, "importance_sampling": g.importance_sampling,
                    "loss_type": g.loss_type, "rollout_correction": g.rollout_correction,
                    "entropy_threshold": threshold}
        write_jsonl(self.out / RECORDS_FILE, recorder.records(
            self.step, self.cfg.rollout.group_size, batch, self.tokenizer, [n for n, _, _ in self.rewards],
            settings, why_row, why_token, self.cfg.data.response_prefix))

    def _token_weights(self, mb: GRPOBatch, old_logps: torch.Tensor, mask: torch.Tensor, threshold):
        """The micro-batch's [n, t] weights of the policy term (None: all 1): the rollout
        correction's importance weights times the entropy selection's 0/1, each when on; and
        the per-token means that describe them (means over `mask`'s tokens)."""
        g, stats, weights = self.cfg.grpo, {}, None
        if mb.sampler_logps is None and g.rollout_correction != "none":
            raise RuntimeError("grpo.rollout_correction needs the sampler's log-probs (Rollout.logps) in the batch")
        if mb.sampler_logps is not None:
            sampler_logps = mb.sampler_logps.to(old_logps.device)
            if g.rollout_correction != "none":
                weights, stats = rollout_correction(old_logps, sampler_logps, mask, method=g.rollout_correction,
                                                    level=g.correction_level, bound=g.correction_bound,
                                                    bound_low=g.correction_bound_low)
            else:  # measured all the same: whether the correction is needed
                n_tok = (mask != 0).sum().clamp(min=1)
                kl = kl_penalty(sampler_logps, old_logps.detach().double(), "k3")  # [n, t]
                stats = {"mismatch_kl": (torch.where(mask != 0, kl, 0.0).sum() / n_tok).to(old_logps.dtype)}
        if threshold is not None:
            kept = entropy_mask(mb.entropy.to(mask.device), mask, threshold)  # [n, t] bool
            stats["entropy_kept_frac"] = kept.sum().to(old_logps.dtype) / (mask != 0).sum().clamp(min=1)
            weights = kept.to(old_logps.dtype) if weights is None else weights * kept
        return weights, stats

    def refresh_reference(self) -> None:
        """Phase 7 (TR-DPO style): ref <- alpha * policy + (1 - alpha) * ref, shard by shard. With
        LoRA (alpha = 1, checked at start): the reference slot <- A, B, shard by shard."""
        if self.ref_in_policy:
            refresh_reference_adapters(self.policy.lm)
            self.ref_refreshes += 1
            return
        a = self.cfg.grpo.ref_mix_alpha
        with torch.no_grad():
            for p_ref, p in zip(self.ref.parameters(), self.policy.parameters()):
                p_ref.mul_(1 - a).add_(p.detach(), alpha=a)
        self.ref_refreshes += 1

    # ---------------------------------------------------------------- what the loop asks
    def evaluate(self) -> dict:
        r, e = self.cfg.rollout, self.cfg.eval
        return evaluate(self.engine, self.eval_records, self.eval_ids, self.info,
                        max_new_tokens=r.max_new_tokens, seed=self.cfg.train.seed,
                        temperature=e.temperature if e.samples > 1 else r.eval_temperature,
                        samples=e.samples, return_samples=len(self.eval_records),
                        response_prefix=self.cfg.data.response_prefix, turns=self.episodes if self.tools else None)

    def trainer_state(self) -> dict:
        return {"ref_refreshes": self.ref_refreshes, "data_position": self.data_position}

    def load_trainer_state(self, state: dict, checkpoint) -> None:
        # The reference model (or LoRA's reference slot, in the model's own checkpoint) came back.
        self.ref_refreshes = int(state["ref_refreshes"]) if self.ref is not None or self.ref_in_policy else 0
        # Checkpoints written before the position was kept: every step had taken prompts_per_step.
        self.data_position = int(state.get("data_position", self.step * self.cfg.grpo.prompts_per_step))
        if self.main and self.ref_refreshes:
            print(f"[grpo] reference refreshed {self.ref_refreshes} times", flush=True)

    def checkpoint_models(self, saving: bool) -> dict | None:
        # The reference is saved only once a refresh has moved it: until then it is the initial
        # model, which a resume loads from model.path anyway. Loading takes it when it is there.
        if self.ref is None or (saving and not self.ref_refreshes):
            return None
        return {"ref": self.ref}


def main(argv: list[str]) -> dict:
    from r1train.run.config import parse_args

    return GRPOTrainer(parse_args(GRPOJobConfig, argv, prog="grpo")).train()
