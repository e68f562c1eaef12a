"""A LoRA adapter folder (PEFT's format, an earlier stage's final-adapter/) as --model.path, on the
tiny model: a stage with the adapter's LoRA options trains that adapter on (unmerged, its GRPO
reference the model it starts from), a full-weight stage or a frozen sampler gets it merged into
the weights (rejection sampling generates as from the merged export), mismatched options are
refused naming them, and a pipeline hands an SFT stage's adapter to a GRPO stage."""
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from r1train.model.load import load_model, load_tokenizer, lora_base
from r1train.model.lora import LoRALinear, apply_lora, has_lora, lora_layers
from r1train.run.checkpoint import export_adapter, export_hf
from r1train.run.config import ConfigError
from r1train.run.dist import DistInfo
from r1train.run.sections import ModelConfig

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
INFO = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def adapted(tiny, tmp_path_factory):
    """(the tiny model with rank-4 adapters, B random: a trained adapter; its adapter folder; its merged export)"""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    apply_lora(model, rank=4, alpha=8.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(0.05 * torch.randn(layer.lora_B.weight.shape, generator=gen))
    tokenizer = load_tokenizer(tiny)
    export_adapter(model, model.config, out / "final-adapter", INFO, tokenizer=tokenizer)
    export_hf(model, model.config, tokenizer, out / "final", INFO)
    return model.eval(), str(out / "final-adapter"), str(out / "final")


def _ids():
    return torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_a_stage_with_the_adapters_options_trains_it_on_unmerged(tiny, adapted, tmp_path):
    source, folder, _ = adapted
    _, tok, lm = load_model(ModelConfig(path=folder, lora_rank=4, lora_alpha=8.0), tmp_path, INFO)
    want = dict(lora_layers(source))
    assert [n for n, _ in lora_layers(lm)] == list(want)
    for name, layer in lora_layers(lm):
        assert torch.equal(layer.lora_A.weight, want[name].lora_A.weight)
        assert torch.equal(layer.lora_B.weight, want[name].lora_B.weight)
    assert {n for n, p in lm.named_parameters() if p.requires_grad} == \
        {n for n, _ in lm.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert torch.equal(lm.eval()(_ids()).logits, source(_ids()).logits)  # the same model, bit for bit
    assert "tokenizer_config.json" in os.listdir(folder) and tok.chat_template == load_tokenizer(tiny).chat_template
    # Its checkpoints record the base the adapter sits on, not the adapter folder.
    assert lora_base(folder, lm, INFO)["path"] == str(Path(tiny).resolve())


@torch.no_grad()
def test_a_full_weight_stage_or_a_frozen_model_gets_it_merged(tiny, adapted, tmp_path):
    from transformers import AutoModelForCausalLM

    source, folder, final = adapted
    # The float64 oracle: W + (alpha / r) B A for each wrapped layer of the base.
    oracle = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float64).eval()
    for name, layer in lora_layers(source):
        w = oracle.get_submodule(name).weight
        w.add_(8.0 / 4 * (layer.lora_B.weight.double() @ layer.lora_A.weight.double()))
    exported = load_file(Path(final) / "model.safetensors")
    for trainable in (True, False):
        _, _, lm = load_model(ModelConfig(path=folder), tmp_path, INFO, trainable=trainable)
        assert not has_lora(lm) and not any(isinstance(m, LoRALinear) for m in lm.modules())
        assert all(p.requires_grad == trainable for p in lm.parameters())
        torch.testing.assert_close(lm.eval()(_ids()).logits.double(), oracle(_ids()).logits, rtol=1e-5, atol=1e-5)
        sd = lm.state_dict()  # the merge of the export, bit for bit
        assert all(torch.equal(sd[k], v) for k, v in exported.items())


def test_rejection_sampling_from_an_adapter_folder_generates_as_the_merged_export(adapted, tmp_path):
    from r1train.sft.rejection import load_sampler

    _, folder, final = adapted
    prompts, seeds = [[5, 6, 7, 8], [9, 10]], [3, 4]
    rollouts = [load_sampler(ModelConfig(path=p), tmp_path, INFO)[1].generate(prompts, seeds, max_new_tokens=8)
                for p in (folder, final)]
    assert torch.equal(rollouts[0].completion_ids, rollouts[1].completion_ids)
    assert torch.equal(rollouts[0].logps, rollouts[1].logps)


@pytest.mark.parametrize("options, option, theirs", [
    (dict(lora_rank=8, lora_alpha=8.0), "--model.lora_rank=8", "lora_rank 4"),
    (dict(lora_rank=4, lora_alpha=16.0), "--model.lora_alpha=16.0", "lora_alpha 8.0"),
    (dict(lora_rank=4, lora_alpha=8.0, lora_rslora=True), "--model.lora_rslora=True", "lora_rslora False"),
    (dict(lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,v_proj"), "--model.path=", "--model.lora_targets"),
])
def test_options_other_than_the_adapters_are_refused_naming_them(adapted, tmp_path, options, option, theirs):
    _, folder, _ = adapted
    with pytest.raises(ConfigError) as e:
        load_model(ModelConfig(path=folder, **options), tmp_path, INFO)
    msg = str(e.value)
    assert msg.startswith(option) and theirs in msg and "\n" not in msg


def test_an_adapter_folder_this_project_cannot_apply_is_refused(adapted, tmp_path):
    import shutil

    _, folder, _ = adapted
    other = tmp_path / "dora"
    shutil.copytree(folder, other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True, "target_modules": ".*proj"}))
    with pytest.raises(ConfigError, match=r"apply: target_modules '\.\*proj' \(a list of names only\); use_dora"):
        load_model(ModelConfig(path=str(other)), tmp_path, INFO)


def test_grpo_on_an_adapter_starts_from_it_and_it_is_the_reference(adapted, tmp_path):
    """Step 0's reference log-probs are the policy's (base + the loaded adapter, copied to the
    reference slot), not the base's."""
    from r1train.grpo.config import GRPOJobConfig
    from r1train.grpo.trainer import GRPOTrainer
    from r1train.run.config import parse_args

    _, folder, _ = adapted
    trainer = GRPOTrainer(parse_args(GRPOJobConfig, [
        "--model.path", folder, "--model.lora_rank", "4", "--model.lora_alpha", "8", "--grpo.beta", "0.04",
        "--rollout.group_size", "2", "--grpo.prompts_per_step", "2", "--grpo.micro_batch_size", "4",
        "--rollout.max_new_tokens", "6", "--data.num_train", "8", "--data.num_eval", "2",
        "--train.output_dir", str(tmp_path / "run"), "--train.progress", "false"]))
    assert trainer.ref_in_policy and trainer.ref_from_start and trainer.ref is None
    trainer.step = 1
    batch, _ = trainer.rollout()
    trainer.logprobs(batch)
    whole = batch.micro(list(range(len(batch))))
    mask = whole.loss_mask.bool()
    from r1train.model.lora import adapters_disabled
    with torch.no_grad():
        policy = trainer._logps(trainer.policy, whole)
        with adapters_disabled(trainer.policy.lm):
            base = trainer._logps(trainer.policy, whole)
    assert torch.equal(batch.ref_logps[mask], policy[mask])
    assert (batch.ref_logps - base)[mask].abs().max() > 1e-3


def test_a_pipeline_hands_an_sft_adapter_to_grpo(tmp_path):
    """sft (LoRA) -> grpo with model.path {out}/sft/final-adapter: GRPO trains the SFT adapter on
    (a fresh adapter would have B = 0 and another A), on the SFT stage's base, and its first
    step's KL is 0: its reference is where it started."""
    out = tmp_path / "pipe"
    lora = {"lora_rank": 4, "lora_alpha": 8.0}
    data = {"source": "embedded", "num_train": 40, "num_eval": 2, "task": {"max_operands": 2, "max_value": 9}}
    recipe = {"output_dir": str(out), "model": "embedded", "stages": [
        {"name": "sft", "command": "sft", "options": {
            "model": lora, "data": data,
            "sft": {"max_seq_len": 256, "rows_per_step": 2, "rows_per_micro_batch": 1, "eval_max_new_tokens": 4},
            "optim": {"lr": 1.0e-2, "warmup_steps": 0}, "train": {
                "max_steps": 2, "eval_every": 0, "save_every": 0, "progress": False, "export_adapter": True}}},
        {"name": "grpo", "command": "grpo", "options": {
            "model": {"path": "{out}/sft/final-adapter", **lora}, "data": data,
            "rollout": {"group_size": 2, "max_new_tokens": 6}, "grpo": {
                "prompts_per_step": 2, "micro_batch_size": 4, "beta": 0.04,
                "rewards": ["accuracy", "repetition_penalty", "language_consistency"]},
            "optim": {"lr": 1.0e-3, "warmup_steps": 0}, "train": {
                "max_steps": 2, "eval_every": 0, "save_every": 0, "progress": False, "export_adapter": True}}}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    res = train_py("pipeline", "--recipe", tmp_path / "recipe.yaml", env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    sft = load_file(out / "sft" / "final-adapter" / "adapter_model.safetensors")
    grpo = load_file(out / "grpo" / "final-adapter" / "adapter_model.safetensors")
    assert sft.keys() == grpo.keys()
    for k in sft:
        assert (grpo[k] - sft[k]).norm() < 0.1 * sft[k].norm(), k  # moved a little from the SFT adapter
    config = json.loads((out / "grpo" / "final-adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "sft" / "tiny-model").resolve())
    metrics = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines() if '"kl"' in line]
    assert metrics[0]["kl"] == 0.0
