"""LoRA wired into the stages (one process), end to end on the tiny model: only the adapters
train (the base weights keep their bytes), GRPO's reference is the policy with its adapters off
(no second model), the export is a plain Hugging Face model with the adapters merged in, the
checkpoints hold the adapters alone, a resumed run equals an uninterrupted one and one whose base
changed is refused, the adapters exported alone in PEFT's format load in
PEFT itself as the merged export, SFT trains adapters too, and bad options fail at start in one
line naming the option."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1train.grpo.config import GRPOJobConfig
from r1train.model.lora import DEFAULT_TARGETS, apply_lora
from r1train.run.config import ConfigError, parse_args
from r1train.run.sections import ModelConfig

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

LORA = ["--model.lora_rank", "4", "--model.lora_alpha", "8"]
# As tests/test_grpo_trainer.py: the repetition and language rewards vary between a random
# model's completions, so the advantages are not zero; lr 1e-2 moves the adapters visibly.
GRPO = [*LORA, "--rollout.group_size", "4", "--grpo.prompts_per_step", "4", "--grpo.micro_batch_size", "4",
        "--rollout.prompts_per_generation", "1", "--rollout.max_new_tokens", "12",
        "--grpo.rewards", "accuracy,repetition_penalty,language_consistency",
        "--grpo.beta", "0.04", "--optim.lr", "1e-2", "--optim.warmup_steps", "0",
        "--data.num_train", "64", "--data.num_eval", "2", "--train.eval_every", "0",
        "--train.progress", "false", "--train.max_steps", "4", "--train.save_every", "2"]


def _run(command, *args):
    res = train_py(command, *args, env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _model_tensors(ckpt, tmp_path) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint folder."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = tmp_path / f"{Path(ckpt).parent.parent.name}-{Path(ckpt).name}.pt"
    dcp_to_torch_save(ckpt, out)
    return torch.load(out, weights_only=False)["model"]


def _adapters_only_and_moved(tensors) -> int:
    """The checkpoint holds the adapters alone (the base is loaded from its path), and every B
    moved off 0. Returns the count of adapter parameters."""
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), sorted(tensors)[:3]
    assert all(v.abs().max() > 0 for k, v in tensors.items() if ".lora_B." in k)
    return sum(v.numel() for v in tensors.values())


def _base_unchanged(lm, tiny) -> None:
    """Every base weight of `lm` (a trained LoRA model, unsharded) has the tiny model's bytes."""
    start = load_file(Path(tiny) / "model.safetensors")
    base = {k: v for k, v in lm.state_dict().items() if ".lora_" not in k}
    tied = {"lm_head.weight": "model.embed_tokens.weight"}  # the tiny model's head is its embedding
    assert base.keys() - start.keys() <= tied.keys() and start.keys() <= base.keys()
    for k, v in base.items():
        assert torch.equal(v, start[tied.get(k, k)] if k not in start else start[k]), k


@pytest.fixture(scope="module")
def four_steps(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-four")
    _run("grpo", *GRPO, "--model.path", tiny, "--train.output_dir", str(out), "--train.export_adapter", "true")
    return out


def test_grpo_lora_trains_adapters_only_and_exports_a_merged_plain_model(tiny, four_steps, tmp_path):
    from transformers import AutoModelForCausalLM

    tensors = _model_tensors(four_steps / "checkpoints" / "step-4", tmp_path)
    n_adapter = _adapters_only_and_moved(tensors)
    # every projection of every layer, r (in + out) parameters each: 38,912 of the 854,144 at rank 4
    policy = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    total = sum(p.numel() for p in policy.parameters())
    names = apply_lora(policy, 4, 8.0)
    assert n_adapter == sum(p.numel() for p in policy.parameters() if p.requires_grad) < total / 5
    assert len(names) == len(DEFAULT_TARGETS) * policy.config.num_hidden_layers
    missing, unexpected = policy.load_state_dict({k[len("lm."):]: v for k, v in tensors.items()}, strict=False)
    assert not unexpected and missing and not [k for k in missing if "lora" in k]  # the base, from its path

    # The export: base keys only, loads with plain transformers, computes the LoRA policy's logits.
    exported = load_file(four_steps / "final" / "model.safetensors")
    assert not [k for k in exported if "lora" in k]
    plain = AutoModelForCausalLM.from_pretrained(four_steps / "final", dtype=torch.float32)
    ids = torch.randint(0, plain.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = policy(ids).logits, plain(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-3  # not vacuous: the adapters changed the model


def test_grpo_lora_adapter_export_loads_in_peft_as_the_merged_export(tiny, four_steps):
    """final-adapter/ on the base model through PEFT itself computes the logits of final/ (the same
    adapters merged), and not the base model's."""
    peft = pytest.importorskip("peft", reason="peft (setup.py's test extra) checks the PEFT-format export")
    from transformers import AutoModelForCausalLM

    folder = four_steps / "final-adapter"
    names = {p.name for p in folder.iterdir()}  # and the run's tokenizer, for a later stage (test_lora_handoff.py)
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith(".safetensors") and n != "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny).resolve())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, sorted(DEFAULT_TARGETS))
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    tensors = load_file(folder / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(DEFAULT_TARGETS) * base.config.num_hidden_layers  # A and B of each projection
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)

    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                                             folder).eval()
    merged = AutoModelForCausalLM.from_pretrained(four_steps / "final", dtype=torch.float32)
    ids = torch.randint(0, base.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, plain = adapted(input_ids=ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # not vacuous: the adapters PEFT loaded change the model


def test_adapter_folder_is_guarded_like_final(four_steps, tmp_path):
    """final-adapter/ is replaced by the next export: a file its manifest does not list is refused
    at a resumed start; its scratch is removed, and a new run moves it aside with the rest."""
    import shutil

    from r1train.run.checkpoint import CheckpointManager
    from r1train.run.dist import DistInfo
    from r1train.run.loop import open_run

    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    ckpt = CheckpointManager(out / "checkpoints", DistInfo(0, 1, 0, torch.device("cpu")))
    (out / "final-adapter" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"final-adapter holds notes\.txt, which this project did not write"):
        open_run(ckpt, out, True, "test")
    (out / "final-adapter" / "notes.txt").unlink()
    (out / "final-adapter.tmp").mkdir()
    assert open_run(ckpt, out, True, "test") == out / "checkpoints" / "step-4"
    assert not (out / "final-adapter.tmp").exists()
    assert open_run(ckpt, out, False, "test") is None
    old, = out.glob("old-*")
    assert (old / "final-adapter" / "adapter_model.safetensors").is_file() and not (out / "final-adapter").exists()


def test_grpo_lora_resume_equals_uninterrupted(tiny, four_steps, tmp_path):
    part = tmp_path / "part"
    args = [*GRPO, "--model.path", tiny, "--train.output_dir", str(part)]
    assert "stopped" in _run("grpo", *args, "--train.stop_at_step", "2").stdout
    assert "resumed from" in _run("grpo", *args).stdout
    a = _model_tensors(four_steps / "checkpoints" / "step-4", tmp_path)
    b = _model_tensors(part / "checkpoints" / "step-4", tmp_path)
    assert a.keys() == b.keys()
    for k in a:  # the adapters of steps 3-4 match only if A, B and their AdamW moments came back
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    fa, fb = load_file(four_steps / "final" / "model.safetensors"), load_file(part / "final" / "model.safetensors")
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=1e-5, atol=1e-7, msg=k)
    # The adapters' shape and scaling define the run: another rank cannot resume it.
    res = train_py("grpo", *args, "--model.lora_rank", "8", env=ENV, timeout=300)
    assert res.returncode != 0 and "--model.lora_rank was 4, now 8" in res.stdout + res.stderr


def test_grpo_lora_resume_refuses_a_changed_base(tiny, tmp_path):
    """The checkpoint records the base's path and SHA-256; the same path holding other weights at
    resume is refused before anything loads, naming both hashes."""
    import shutil

    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(tiny, base)
    args = [*GRPO, "--model.path", str(base), "--train.output_dir", str(tmp_path / "run"), "--train.export", "false"]
    _run("grpo", *args, "--train.max_steps", "1", "--train.save_every", "1")
    tensors = load_file(base / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.001
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    res = train_py("grpo", *args, "--train.max_steps", "2", env=ENV, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "the base changed since the checkpoint was written" in out
    assert out.count(str(base.resolve())) >= 2 and len(set(re.findall(r"SHA-256 ([0-9a-f]{64})", out))) == 2


def test_grpo_lora_reference_is_the_base_model_without_a_second_copy(tiny, tmp_path):
    from r1train.grpo.trainer import GRPOTrainer
    from r1train.model.load import load_model
    from r1train.model.policy import PolicyModel

    args = [*GRPO, "--model.path", tiny, "--train.output_dir", str(tmp_path / "run"), "--train.max_steps", "2",
            "--train.export", "false", "--train.save_every", "0"]
    trainer = GRPOTrainer(parse_args(GRPOJobConfig, args))
    assert trainer.ref is None and trainer.ref_in_policy
    trainer.train()
    batch, _ = trainer.rollout()
    trainer.logprobs(batch)
    _, _, lm = load_model(ModelConfig(path=tiny), tmp_path, trainer.info, trainable=False)
    whole = batch.micro(list(range(len(batch))))
    with torch.no_grad():
        base = trainer._logps(PolicyModel(lm), whole)
        policy = trainer._logps(trainer.policy, whole)
    mask = whole.loss_mask.bool()  # [N, T]
    assert torch.equal(batch.ref_logps[mask], base[mask])  # adapters off: the base model bit for bit
    _base_unchanged(trainer.policy.lm, tiny)  # two steps trained the adapters only
    assert (policy - base)[mask].abs().max() > 1e-4  # step 2 (step 1 has no advantage) moved the policy


def test_grpo_lora_refreshed_reference_is_the_merged_policy_of_that_step(tiny, tmp_path):
    """After a refresh (--grpo.ref_refresh_steps 2, ref_mix_alpha 1, at step 2, after its update)
    phase 5's reference log-probs are the policy's own at that step, and those of a plain model
    whose weights are W + s B A, merged here in float64 from the policy's A and B."""
    from transformers import AutoModelForCausalLM

    from r1train.grpo.trainer import GRPOTrainer
    from r1train.model.lora import lora_layers
    from r1train.model.policy import PolicyModel

    args = [*GRPO, "--model.path", tiny, "--train.output_dir", str(tmp_path / "run"), "--train.max_steps", "2",
            "--train.export", "false", "--train.save_every", "0", "--grpo.ref_refresh_steps", "2",
            "--grpo.ref_mix_alpha", "1"]
    trainer = GRPOTrainer(parse_args(GRPOJobConfig, args))
    assert trainer.ref is None and trainer.ref_in_policy
    trainer.train()
    assert trainer.ref_refreshes == 1
    batch, _ = trainer.rollout()
    trainer.logprobs(batch)
    whole = batch.micro(list(range(len(batch))))
    mask = whole.loss_mask.bool()  # [N, T]
    plain = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    base_logps = trainer._logps(PolicyModel(plain), whole)
    with torch.no_grad():
        policy = trainer._logps(trainer.policy, whole)
        for name, layer in lora_layers(trainer.policy.lm):  # W + (alpha / r) B A, in float64
            w = plain.get_submodule(name).weight
            delta = 8 / 4 * (layer.lora_B.weight.double() @ layer.lora_A.weight.double())  # [out, in]
            w.copy_((w.double() + delta).float())
        merged = trainer._logps(PolicyModel(plain), whole)
    torch.testing.assert_close(batch.ref_logps[mask], policy[mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(batch.ref_logps[mask], merged[mask], rtol=1e-5, atol=1e-5)
    assert (batch.ref_logps - base_logps)[mask].abs().max() > 1e-4  # not the base any more


def test_grpo_lora_resume_with_ref_refresh_equals_uninterrupted(tiny, tmp_path):
    """The reference slot, refreshed at step 2, is in the step-2 checkpoint: the resumed run's
    KL at steps 3-4 is the uninterrupted run's."""
    args = [*GRPO, "--model.path", tiny, "--grpo.ref_refresh_steps", "2", "--grpo.ref_mix_alpha", "1",
            "--train.export", "false"]
    _run("grpo", *args, "--train.output_dir", str(tmp_path / "full"))
    _run("grpo", *args, "--train.output_dir", str(tmp_path / "part"), "--train.stop_at_step", "2")
    assert "reference refreshed 1 times" in _run("grpo", *args, "--train.output_dir", str(tmp_path / "part")).stdout
    metrics = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
                if '"kl"' in line] for d in ("full", "part")]
    assert len(metrics[0]) == len(metrics[1]) == 4 and metrics[0][3]["kl"] > 1e-6
    for a, b in zip(*metrics):
        assert (b["kl"], b["loss"]) == pytest.approx((a["kl"], a["loss"]), rel=1e-5, abs=1e-9)
    a = _model_tensors(tmp_path / "full" / "checkpoints" / "step-4", tmp_path)
    b = _model_tensors(tmp_path / "part" / "checkpoints" / "step-4", tmp_path)
    assert any(".lora_ref_B." in k for k in a) and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


def test_sft_lora_packed_trains_adapters_only(tiny, tmp_path):
    out = tmp_path / "sft"
    _run("sft", *LORA, "--model.path", tiny, "--data.num_train", "40", "--data.num_eval", "2",
         "--data.task.max_operands", "3", "--sft.max_seq_len", "256", "--sft.packing", "true",
         "--sft.rows_per_step", "2", "--sft.rows_per_micro_batch", "1", "--sft.eval_max_new_tokens", "4",
         "--optim.lr", "1e-2", "--optim.warmup_steps", "0", "--train.eval_every", "0", "--train.max_steps", "2",
         "--train.save_every", "0", "--train.progress", "false", "--train.export", "false",
         "--train.output_dir", str(out))
    _adapters_only_and_moved(_model_tensors(out / "checkpoints" / "step-2", tmp_path))


@pytest.mark.parametrize("args, option", [
    (["--model.lora_rank", "-1"], "--model.lora_rank"),
    (["--model.lora_rank", "4", "--model.lora_alpha", "0"], "--model.lora_alpha"),
    (["--model.lora_rank", "4", "--model.lora_alpha", "nan"], "--model.lora_alpha"),
    (["--model.lora_rank", "4", "--model.lora_dropout", "1"], "--model.lora_dropout"),
    (["--model.lora_rank", "4", "--model.lora_targets", ","], "--model.lora_targets"),
    (["--model.lora_rank", "4", "--grpo.beta", "0.04", "--grpo.ref_refresh_steps", "2"], "--grpo.ref_mix_alpha"),
])
def test_bad_lora_options_fail_at_start_in_one_line(args, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")) as e:
        parse_args(GRPOJobConfig, args)
    assert "\n" not in str(e.value)


def test_export_adapter_without_lora_is_refused_in_one_line():
    from r1train.sft.rejection import RejectionJobConfig
    from r1train.sft.trainer import SFTJobConfig

    for cls in (GRPOJobConfig, SFTJobConfig, RejectionJobConfig):
        with pytest.raises(ConfigError) as e:
            parse_args(cls, ["--train.export_adapter", "true"])
        msg = str(e.value)
        assert msg.startswith("--train.export_adapter=True: ") and "--model.lora_rank" in msg and "\n" not in msg
    parse_args(GRPOJobConfig, ["--train.export_adapter", "true", "--model.lora_rank", "4"])  # with LoRA: fine


def test_lora_is_accepted_with_several_processes_and_refused_in_rejection_sampling():
    from r1train.sft.rejection import RejectionJobConfig
    from r1train.sft.trainer import SFTJobConfig

    for cls in (GRPOJobConfig, SFTJobConfig):  # FSDP2 over a frozen base: tests/test_lora_dist.py
        parse_args(cls, ["--model.lora_rank", "4", "--train.fsdp", "always"]).validate(world_size=2)
    with pytest.raises(ConfigError, match=r"--model\.lora_rank=4: rejection sampling trains no model"):
        parse_args(RejectionJobConfig, ["--model.lora_rank", "4"])


def test_lora_target_matching_no_layer_names_the_option_and_the_layers(tiny, tmp_path):
    from r1train.model.load import load_model
    from r1train.run.dist import DistInfo

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    with pytest.raises(ConfigError) as e:
        load_model(ModelConfig(path=tiny, lora_rank=4, lora_targets="q_proj,qkv"), tmp_path, info)
    msg = str(e.value)
    assert msg.startswith("--model.lora_targets='q_proj,qkv': ") and "'qkv'" in msg and "down_proj" in msg
    assert "\n" not in msg
    # A frozen model (a reference, a sampler) gets no adapter whatever the options say.
    _, _, lm = load_model(ModelConfig(path=tiny, lora_rank=4), tmp_path, info, trainable=False)
    assert not [n for n, _ in lm.named_parameters() if "lora" in n]
