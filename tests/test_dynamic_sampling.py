"""DAPO dynamic sampling (grpo.dynamic_sampling, grpo/dynamic.py) on the tiny model.

The reward is 0 on every completion of a subtraction problem ("What is 63 - 34?", about half of
the embedded task's) and varies between the random model's completions elsewhere, so which groups
carry a signal is known from the prompts alone: the tests work out from the epoch order which
prompts a step must train on, how many rounds it needs and what the data position becomes, and
check the trainer against that. Then: every row keeps the seed of its global candidate index, the
rounds stop at the cap with zero-signal groups filling the batch, scale_rewards=batch and
drop_zero_std_groups act on the trained batch (advantages against a float64 transcription), a step
whose groups all carry a signal is the plain step, 2 processes train what 1 does (groups change
ranks), a resumed run equals an uninterrupted one, and checkpoints written before the data
position was kept still resume. Mutations checked to fail here: groups that never change ranks,
later rounds seeded as round 0, the position not restored, the surplus kept instead of dropped.
"""
import json
import os
from pathlib import Path

import pytest
import torch

from r1train.grpo.advantages import zero_std_groups
from r1train.grpo.config import GRPOJobConfig
from r1train.grpo.dynamic import select_groups
from r1train.grpo.trainer import GRPOTrainer
from r1train.model.engine import row_seed
from r1train.run.config import ConfigError, parse_args
from r1train.run.folder import write_manifest
from r1train.run.loop import epoch_order

from launch import torchrun_py, train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
P, G = 4, 4  # prompts_per_step, group_size

REWARD_FILE = '''
def token_sum_or_flat(completions, completion_ids, problem, **columns):
    return [0.0 if " - " in p else (sum(ids) % 11) / 11 for p, ids in zip(problem, completion_ids)]
'''


def _flat(problem: str) -> bool:
    return " - " in problem


def _rare(problem: str) -> bool:
    """Flat unless three operands are all added ("What is 69 + 8 + 91?"): most groups are flat."""
    return problem.count(" + ") < 2


def token_sum(completions, completion_ids, **columns):
    return [(sum(ids) % 11) / 11 for ids in completion_ids]


def flat_if(rule):
    """token_sum, but 0 on every completion of a problem that `rule` calls flat."""
    def reward(completions, completion_ids, problem, **columns):
        return [0.0 if rule(p) else v for p, v in zip(problem, token_sum(completions, completion_ids))]
    return reward


def _trainer(tiny, out, reward=flat_if(_flat), **grpo) -> GRPOTrainer:
    cfg = GRPOJobConfig()
    cfg.model.path = tiny
    cfg.data.num_train, cfg.data.num_eval = 64, 2
    cfg.rollout.group_size, cfg.rollout.max_new_tokens = G, 12
    cfg.grpo.prompts_per_step, cfg.grpo.micro_batch_size, cfg.grpo.beta = P, 4, 0.0
    for k, v in grpo.items():
        setattr(cfg.grpo, k, v)
    cfg.train.output_dir, cfg.train.progress = str(out), False
    return GRPOTrainer(cfg, reward_funcs=[("token_sum", reward)])


# --- which groups a step trains on -----------------------------------------------------------------
def _select_reference(zero_std: list[bool], target: int) -> list[int]:
    """By hand: walk the candidates in order, take signal groups until `target`; then, if short,
    walk again taking zero-signal ones until `target`."""
    out = []
    for c, z in enumerate(zero_std):
        if not z and len(out) < target:
            out.append(c)
    for c, z in enumerate(zero_std):
        if z and len(out) < target:
            out.append(c)
    return sorted(out)


def test_select_groups_first_with_signal_then_fill():
    # Candidates (T = zero std): T F T F F | F F: target 3 -> 1, 3, 4 (the surplus 5, 6 dropped).
    z = torch.tensor([True, False, True, False, False, False, False])
    assert select_groups(z, 3) == [1, 3, 4]
    # Only 1 with signal among 4: it, then the earliest zero-std ones (0, 1) fill: 0, 1, 2.
    assert select_groups(torch.tensor([True, True, False, True]), 3) == [0, 1, 2]
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        target = int(torch.randint(1, n + 1, (1,), generator=gen))
        flags = torch.rand(n, generator=gen) < torch.rand(1, generator=gen)
        assert select_groups(flags, target) == _select_reference(flags.tolist(), target)
    with pytest.raises(ValueError):
        select_groups(torch.tensor([False]), 2)


def test_options_refused_at_start():
    with pytest.raises(ConfigError, match=r"--grpo.max_generation_rounds=0: must be >= 1"):
        parse_args(GRPOJobConfig, ["--grpo.dynamic_sampling", "true", "--grpo.max_generation_rounds", "0"])
    with pytest.raises(ConfigError, match=r"--grpo.max_generation_rounds=2: needs --grpo.dynamic_sampling true"):
        parse_args(GRPOJobConfig, ["--grpo.max_generation_rounds", "2"])


def _expected(trainer, start: int, cap: int, rule=_flat) -> tuple[list[int], int, list[int]]:
    """From the prompts alone, for a step starting at data position `start`: the prompts it trains
    on (in order), the rounds it needs, and their candidate indices."""
    n, flat = len(trainer.train_records), lambda i: rule(trainer.train_records[i]["problem"])  # noqa: E731
    for rounds in range(1, cap + 1):
        order = epoch_order(n, trainer.cfg.train.seed, start, rounds * P)
        if sum(not flat(i) for i in order) >= P:
            break
    chosen = [c for c, i in enumerate(order) if not flat(i)][:P]
    chosen += [c for c, i in enumerate(order) if flat(i)][:P - len(chosen)]
    return [order[c] for c in sorted(chosen)], rounds, sorted(chosen)


def _problems(trainer, batch=None, indices=None) -> list[str]:
    if batch is not None:
        return [r["problem"] for r in batch.records[::G]]
    return [trainer.train_records[i]["problem"] for i in indices]


def test_step_trains_on_the_first_groups_with_signal(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, dynamic_sampling=True, max_generation_rounds=8)
    for step in (1, 2, 3):
        trainer.step = step
        start = trainer.data_position
        want, rounds, candidates = _expected(trainer, start, 8)
        batch, stats = trainer.rollout()
        assert len(batch) == P * G and _problems(trainer, batch) == _problems(trainer, indices=want)
        assert not zero_std_groups(batch.rewards, G).any()
        assert stats["dynamic/rounds"] == rounds
        assert stats["dynamic/groups_per_kept"] == pytest.approx(rounds)  # rounds * P generated for P kept
        assert trainer.next_position == start + rounds * P
        trainer.data_position = trainer.next_position  # as train_step does once the step is done
        # Each row is what the engine samples for its prompt with the seeds of its candidate index
        # c (round k, place s: c = k * P + s), whichever round it came from.
        for g, (i, c) in enumerate(zip(want, candidates)):
            seeds = [row_seed(trainer.cfg.train.seed, step, c * G + j) for j in range(G)]
            out = trainer.engine.generate([trainer.train_ids[i]] * G, seeds, max_new_tokens=12)
            rows = slice(g * G, (g + 1) * G)
            assert batch.texts[rows] == out.texts
            width = out.completion_ids.shape[1]
            assert torch.equal(batch.completion_ids[rows, :width], out.completion_ids)
    assert trainer.data_position > 3 * P, "no step needed a second round: the test would be vacuous"


def test_rounds_stop_at_the_cap_and_flat_groups_fill(tiny, tmp_path, capsys):
    """Most groups flat, two rounds at most: the first P with signal among 2P, then the earliest
    flat groups; the batch keeps its P groups, and the run says so once."""
    trainer = _trainer(tiny, tmp_path, reward=flat_if(_rare), dynamic_sampling=True, max_generation_rounds=2)
    filled = 0
    for step in (1, 2, 3):
        trainer.step = step
        start = trainer.data_position
        want, rounds, _ = _expected(trainer, start, 2, _rare)
        batch, stats = trainer.rollout()
        trainer.data_position = trainer.next_position
        assert stats["dynamic/rounds"] == rounds and trainer.data_position == start + rounds * P
        assert len(batch) == P * G and _problems(trainer, batch) == _problems(trainer, indices=want)
        flat = sum(_rare(trainer.train_records[i]["problem"]) for i in want)
        assert int(zero_std_groups(batch.rewards, G).sum()) == flat
        filled += flat
    assert filled, "no step ran out of rounds: the test would be vacuous"
    assert capsys.readouterr().out.count("groups whose rewards are all equal fill the batch") == 1


def test_batch_std_and_dropped_groups_are_of_the_trained_batch(tiny, tmp_path):
    """scale_rewards=batch divides by the std of the trained rewards (not of every group generated),
    and drop_zero_std_groups leaves out exactly the flat groups that filled the batch."""
    trainer = _trainer(tiny, tmp_path, reward=flat_if(_rare), dynamic_sampling=True, max_generation_rounds=2,
                       scale_rewards="batch", drop_zero_std_groups=True)
    for step in (1, 2, 3):
        trainer.step = step
        batch, stats = trainer.rollout()
        trainer.data_position = trainer.next_position
        r = batch.rewards.double().tolist()
        mean = sum(r) / len(r)
        std = (sum((x - mean) ** 2 for x in r) / (len(r) - 1)) ** 0.5  # unbiased, all P * G trained rows
        for g in range(P):
            group = r[g * G:(g + 1) * G]
            flat = max(group) == min(group)
            for j in range(G):
                want = 0.0 if flat else (group[j] - sum(group) / G) / (std + 1e-4)
                assert float(batch.advantages[g * G + j]) == pytest.approx(want, rel=1e-9, abs=1e-12)
                assert float(batch.loss_weight[g * G + j]) == (0.0 if flat else 1.0)
        if stats["dynamic/rounds"] == 2 and float(batch.loss_weight.sum()) < P * G:
            return
    pytest.fail("no step filled its batch with flat groups: the test would be vacuous")


def test_every_group_with_signal_is_the_plain_step(tiny, tmp_path):
    """Round 0 is the plain step row for row: same prompts, seeds, rewards, advantages."""
    plain = _trainer(tiny, tmp_path / "plain", reward=token_sum)
    dynamic = _trainer(tiny, tmp_path / "dynamic", reward=token_sum, dynamic_sampling=True)
    plain.step = dynamic.step = 1
    a, _ = plain.rollout()
    b, stats = dynamic.rollout()
    assert stats["dynamic/rounds"] == 1 and dynamic.next_position == P
    assert a.texts == b.texts and a.records == b.records
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.completion_mask, b.completion_mask) and torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.advantages, b.advantages) and torch.equal(a.loss_weight, b.loss_weight)
    assert len(set(a.advantages.tolist())) > 1
    # The sampler's log-probs travel with their groups (grpo.rollout_correction, mismatch_kl).
    assert a.sampler_logps is not None and torch.equal(a.sampler_logps, b.sampler_logps)


# --- end to end: train.py, 1 and 2 processes, resume ---------------------------------------------
RUN = ["--rollout.group_size", str(G), "--grpo.prompts_per_step", str(P), "--grpo.micro_batch_size", "4",
       "--rollout.max_new_tokens", "12", "--grpo.beta", "0.04", "--optim.lr", "1e-3", "--optim.warmup_steps", "0",
       "--data.num_train", "64", "--data.num_eval", "2", "--train.eval_every", "0", "--train.progress", "false",
       "--train.max_steps", "3", "--train.save_every", "1", "--train.export", "false",
       "--grpo.dynamic_sampling", "true", "--grpo.max_generation_rounds", "3",
       "--grpo.rollout_correction", "tis"]  # groups that change rank carry their sampler log-probs
COMPARED = ("reward", "loss", "kl", "grad_norm", "frac_reward_zero_std", "dynamic/rounds", "dynamic/groups_per_kept",
            "dynamic/frac_zero_std_generated", "mismatch_kl", "is_weight_mean")


def _run(args, nproc=1):
    if nproc == 1:
        res = train_py("grpo", *args, env=ENV, timeout=600)
    else:
        res = torchrun_py("grpo", *args, nproc=nproc, env=ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _metrics(out: Path) -> list[dict]:
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in m]


def _position(ckpt: Path) -> int:
    return torch.load(ckpt / "trainer_state.pt", weights_only=True)["data_position"]


def _assert_same_run(a: Path, b: Path, rel=1e-4):
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3]
    for x, y in zip(ma, mb):
        for k in COMPARED:
            assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-7), (x["step"], k)
    assert _position(a / "checkpoints" / "step-3") == _position(b / "checkpoints" / "step-3")


@pytest.fixture(scope="module")
def args(tiny, tmp_path_factory):
    rewards = tmp_path_factory.mktemp("rewards") / "flat_rewards.py"
    rewards.write_text(REWARD_FILE)
    return [*RUN, "--model.path", tiny, "--grpo.rewards", f"{rewards}:token_sum_or_flat"]


@pytest.fixture(scope="module")
def one_process(args, tmp_path_factory):
    """3 steps, one process, a checkpoint after each: the reference of the tests below."""
    out = tmp_path_factory.mktemp("one")
    _run([*args, "--train.output_dir", str(out)])
    m = _metrics(out)
    assert max(x["dynamic/rounds"] for x in m) > 1, "no step needed a second round: the tests would be vacuous"
    # The data position is every prompt generated: the rounds of each step times P.
    assert _position(out / "checkpoints" / "step-3") == P * sum(x["dynamic/rounds"] for x in m)
    assert all(x["frac_reward_zero_std"] == 0 for x in m if x["dynamic/rounds"] < 3)
    return out


def test_two_processes_match_one(args, one_process, tmp_path):
    """Rank 1 generates half of each round, and groups change ranks when a flat one is dropped."""
    _run([*args, "--train.output_dir", str(tmp_path)], nproc=2)
    _assert_same_run(one_process, tmp_path)


def test_resume_equals_uninterrupted(args, one_process, tmp_path):
    _run([*args, "--train.output_dir", str(tmp_path), "--train.stop_at_step", "2"])
    assert _position(tmp_path / "checkpoints" / "step-2") == _position(one_process / "checkpoints" / "step-2")
    res = _run([*args, "--train.output_dir", str(tmp_path)])
    assert "resumed from" in res.stdout
    _assert_same_run(one_process, tmp_path, rel=1e-5)


def test_checkpoint_without_data_position_resumes_where_it_was(tiny, tmp_path):
    """A checkpoint written before the position was kept (no dynamic sampling then): every step
    had taken prompts_per_step prompts, and the resume reads on from step * prompts_per_step."""
    out = tmp_path / "old"
    _run(["--rollout.group_size", str(G), "--grpo.prompts_per_step", str(P), "--grpo.micro_batch_size", "4",
          "--rollout.max_new_tokens", "4", "--data.num_train", "64", "--data.num_eval", "2",
          "--train.eval_every", "0", "--train.progress", "false", "--train.max_steps", "2",
          "--train.save_every", "2", "--train.export", "false", "--model.path", tiny, "--train.output_dir", str(out)])
    ckpt = out / "checkpoints" / "step-2"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state.pop("data_position") == 2 * P
    torch.save(state, ckpt / "trainer_state.pt")
    write_manifest(ckpt)
    cfg = parse_args(GRPOJobConfig, ["--model.path", tiny, "--train.output_dir", str(out), "--rollout.group_size",
                                     str(G), "--grpo.prompts_per_step", str(P), "--grpo.micro_batch_size", "4",
                                     "--rollout.max_new_tokens", "4", "--data.num_train", "64",
                                     "--data.num_eval", "2", "--train.progress", "false", "--train.max_steps", "3"])
    trainer = GRPOTrainer(cfg)
    trainer._resume()
    assert trainer.step == 2 and trainer.data_position == 2 * P
