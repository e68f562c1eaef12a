"""The compiled decode path (r1train/model/static_decode.py) against the engine's eager decode: the same
completions, greedy and sampled, while rows finish, leave the batch and move to smaller buckets.
The model is the cold-start SFT checkpoint of tests/assets (its rows end at different steps), run
in float64 so that attending over the static capacity in another summation order cannot round a
logit differently. torch.compile runs with the "eager" and "aot_eager" backends here (tracing,
guards and the in-place cache writes, without code generation), and once with inductor's CPU
code generation; a GPU run compiles CUDA graphs (bench/gpu_suite.py)."""
import copy
import shutil
from pathlib import Path

import pytest
import torch

from r1train.data.prompts import make_conversation, render_prompt
from r1train.data.task import TaskConfig, generate_problems
from r1train.model.engine import Engine, generate, pad_prompts
from r1train.model.policy import PolicyModel
from r1train.model.static_decode import CAPACITY_STEP, StaticDecoder, bucket_size

ASSET = Path(__file__).resolve().parent / "assets" / "tiny-r1-sft"
PROBLEMS = [p["problem"] for p in generate_problems(TaskConfig(min_operands=2, max_operands=3, max_value=9), 4, seed=0)]


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSET)
    lm = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32).eval()
    return tok, PolicyModel(copy.deepcopy(lm).double())


def _prompts(tok) -> list[list[int]]:
    """Three groups of one prompt each; the first without the system prompt (left padding of
    ~80), its rows ending first (greedy: at 14 tokens, half the batch)."""
    def encode(i, system=True):
        msgs = make_conversation(PROBLEMS[i]) if system else make_conversation(PROBLEMS[i], system_prompt="")
        return tok(render_prompt(tok, msgs), add_special_tokens=False)["input_ids"]
    return [encode(0, system=False)] * 4 + [encode(1)] * 2 + [encode(2)] * 2


def _rows(r) -> list[list[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(r.completion_ids, r.completion_mask)]


def _counting_backend(graphs: list):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def test_bucket_sizes_are_powers_of_two():
    assert [bucket_size(n) for n in (1, 2, 3, 4, 5, 8, 9, 64, 65)] == [1, 2, 4, 4, 8, 8, 16, 64, 128]


@pytest.mark.parametrize("temperature,backend,direct,top", [
    (0.0, "eager", True, {}), (1.0, "eager", True, {}), (1.0, "aot_eager", True, {}),
    (1.0, "aot_eager", False, {}), (0.8, "aot_eager", True, dict(top_k=20, top_p=0.9))])
def test_same_completions_as_the_eager_decode(tiny, temperature, backend, direct, top):
    """`direct`: the decode-only forward (model/decode_forward.py, the default for this Qwen2
    model), or Hugging Face's forward over a masked capacity (the path of other families). The
    decoder draws each next token inside its step: the tokens and their log-probs (the
    sampler's side of GRPO's rollout correction) are the eager sampler's."""
    tok, policy = tiny
    ids, mask = pad_prompts(_prompts(tok), tok.pad_token_id, "cpu")
    kw = dict(seeds=[11, 12, 13, 21, 22, 23, 31, 32], max_new_tokens=32, temperature=temperature, **top)
    decoder = StaticDecoder(policy, backend=backend, direct=direct)
    assert (decoder.direct is not None) == direct
    fast = generate(policy, tok, ids, mask, decoder=decoder, **kw)
    eager = generate(policy, tok, ids, mask, **kw)
    lengths = fast.lengths.tolist()
    assert len(set(lengths)) > 1 and min(lengths) < 16, lengths  # rows end early: compaction ran
    assert _rows(fast) == _rows(eager)
    assert fast.texts == eager.texts and torch.equal(fast.truncated, eager.truncated)
    torch.testing.assert_close(fast.logps, eager.logps, rtol=1e-12, atol=1e-12)
    assert 8 in decoder.buckets and min(decoder.buckets) < 8  # the rows moved to a smaller bucket
    capacity = decoder.buckets[8].capacity
    assert capacity % CAPACITY_STEP == 0 and capacity >= ids.shape[1] + 32


def test_reading_the_finished_rows_every_k_steps(tiny):
    """The GPU engine's setting (sync_every 8): the same rows as the eager decode that checks
    every step, with the rows moving between buckets at the checks only."""
    tok, policy = tiny
    ids, mask = pad_prompts(_prompts(tok), tok.pad_token_id, "cpu")
    kw = dict(seeds=[11, 12, 13, 21, 22, 23, 31, 32], max_new_tokens=32, temperature=1.0)
    decoder = StaticDecoder(policy, backend="eager")
    fast = generate(policy, tok, ids, mask, decoder=decoder, sync_every=8, **kw)
    eager = generate(policy, tok, ids, mask, **kw)
    assert _rows(fast) == _rows(eager) and torch.equal(fast.completion_ids, eager.completion_ids)
    assert min(decoder.buckets) < 8


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="inductor's CPU code generation needs a C++ compiler (apt-get install g++)")
def test_inductor_generated_code_gives_the_same_completions(tiny):
    """What a GPU run compiles, on the CPU: inductor's generated code (C++ here, Triton on a GPU),
    with the cache's in-place writes as mutations of graph inputs, over two buckets (~20 s)."""
    tok, policy = tiny
    ids, mask = pad_prompts(_prompts(tok), tok.pad_token_id, "cpu")
    kw = dict(seeds=[11, 12, 13, 21, 22, 23, 31, 32], max_new_tokens=32, temperature=1.0)
    decoder = StaticDecoder(policy, backend="inductor")
    fast = generate(policy, tok, ids, mask, decoder=decoder, **kw)
    assert _rows(fast) == _rows(generate(policy, tok, ids, mask, **kw))
    assert len(decoder.buckets) >= 2


def test_under_autocast_as_the_trainer_runs_it_on_a_gpu():
    """A single-GPU trainer generates under bf16 autocast: the prefill's cache then holds float32
    keys (RoPE's float32 tables promote them) and bf16 values, and the buckets must take both
    dtypes (they once took the keys' for both, and the first step's in-place write failed).
    Here on the CPU's bf16 autocast, in float32 weights: greedy rows as the eager engine's under
    the same autocast (the attention sums in another precision than HF's bf16 SDPA: a near-tie
    could flip on another machine, so one row of 8 may differ)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSET)
    policy = PolicyModel(AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32).eval())
    ids, mask = pad_prompts(_prompts(tok), tok.pad_token_id, "cpu")
    kw = dict(seeds=list(range(8)), max_new_tokens=32, temperature=0.0)
    decoder = StaticDecoder(policy, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = generate(policy, tok, ids, mask, decoder=decoder, **kw)
        eager = generate(policy, tok, ids, mask, **kw)
    layer = decoder.buckets[8].cache.layers[0]
    assert (layer.keys.dtype, layer.values.dtype) == (torch.float32, torch.bfloat16)
    assert sum(a == b for a, b in zip(_rows(fast), _rows(eager))) >= 7


def test_a_step_between_two_checks_reads_nothing_back_to_the_host(tiny):
    """On a GPU a read of a device value (a boolean-mask index, `.item()`, `int(t)`) waits for
    every queued kernel: with `sync_every` 8 only the checks may do it. Counted on the CPU, where
    the same operators run (aten::nonzero, aten::_local_scalar_dense): 16 more steps of rows that
    never end add their two checks' reads, not one a step. (The eager engine's steps read one
    value each inside Hugging Face's mask construction; the decoder builds no mask.)"""
    from torch.profiler import profile

    tok, policy = tiny
    ids, mask = pad_prompts(_prompts(tok)[:2], tok.pad_token_id, "cpu")
    decoder = StaticDecoder(policy, backend="eager")

    def reads(max_new):
        kw = dict(seeds=[1, 2], max_new_tokens=max_new, temperature=1.0, eos_token_ids=[-1], sync_every=8)
        generate(policy, tok, ids, mask, decoder=decoder, **kw)  # traced outside the count
        with profile() as prof:
            generate(policy, tok, ids, mask, decoder=decoder, **kw)
        return sum(e.name in ("aten::nonzero", "aten::_local_scalar_dense") for e in prof.events())

    extra = reads(32) - reads(16)
    assert 1 <= extra <= 2 * 2, extra  # the checks after steps 24 and 32: int(going.sum()) each


def test_the_same_shapes_compile_once(tiny):
    """A second call with the same buckets reuses their graphs, and so does a call with shorter
    prompts (the capacity only grows); a longer one reallocates the buckets at a larger one."""
    tok, policy = tiny
    graphs = []
    decoder = StaticDecoder(policy, backend=_counting_backend(graphs))
    prompts = _prompts(tok)
    ids, mask = pad_prompts(prompts, tok.pad_token_id, "cpu")
    kw = dict(max_new_tokens=24, temperature=1.0)
    generate(policy, tok, ids, mask, seeds=list(range(8)), decoder=decoder, **kw)
    first, seen = len(graphs), set(decoder.buckets)
    capacity = decoder.buckets[8].capacity
    assert first == len(seen) >= 2  # one graph per bucket (the step traces without a break)
    generate(policy, tok, ids, mask, seeds=list(range(100, 108)), decoder=decoder, **kw)
    ids2, mask2 = pad_prompts([p[CAPACITY_STEP // 2:] for p in prompts], tok.pad_token_id, "cpu")
    generate(policy, tok, ids2, mask2, seeds=list(range(8)), decoder=decoder, **kw)
    assert len(graphs) == first + len(set(decoder.buckets) - seen)  # only a bucket not seen before compiles
    assert decoder.buckets[8].capacity == capacity
    ids3, mask3 = pad_prompts([p + p[:CAPACITY_STEP] for p in prompts], tok.pad_token_id, "cpu")
    before = len(graphs)
    generate(policy, tok, ids3, mask3, seeds=list(range(8)), decoder=decoder, **kw)
    assert decoder.buckets[8].capacity > capacity and len(graphs) > before


def test_the_engine_refuses_it_under_fsdp(tiny):
    from r1train.run.dist import DistInfo

    tok, policy = tiny
    info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), fsdp=True)
    with pytest.raises(ValueError, match="rollout.compile_decode needs an unsharded model"):
        Engine(policy, tok, info, compile_decode=True)
    assert Engine(policy, tok, compile_decode=True).decoder is not None
    assert Engine(policy, tok).decoder is None


def test_what_a_previous_call_left_in_the_buckets_is_never_read(tiny):
    """Buckets persist between calls; the eager attention (and HF's forward, for other families)
    reads the whole capacity with the unwritten positions masked. A masked NaN would still poison
    a row (0 x NaN), so the buckets a call starts in or moves to are cleared first: here every
    buffer holds NaN before the second call."""
    tok, policy = tiny
    ids, mask = pad_prompts(_prompts(tok), tok.pad_token_id, "cpu")
    kw = dict(seeds=list(range(8)), max_new_tokens=32, temperature=1.0)
    decoder = StaticDecoder(policy, backend="eager")
    generate(policy, tok, ids, mask, decoder=decoder, **kw)
    assert min(decoder.buckets) < 8
    for b in decoder.buckets.values():
        for layer in b.cache.layers:
            layer.keys.fill_(float("nan"))
            layer.values.fill_(float("nan"))
    fast = generate(policy, tok, ids, mask, decoder=decoder, **kw)
    assert _rows(fast) == _rows(generate(policy, tok, ids, mask, **kw))


def test_the_sampling_stages_take_the_option(tmp_path, monkeypatch):
    """rejection-sample and distill build their engines with --sampling.compile_decode; under
    FSDP the error names that option."""
    import r1train.sft.rejection as rejection
    from r1train.data.tiny import build_tiny_model
    from r1train.run.dist import DistInfo, init_distributed
    from r1train.run.sections import ModelConfig
    from r1train.sft.rejection import load_sampler

    path = str(build_tiny_model(tmp_path / "tiny", seed=0))
    info = init_distributed("cpu")
    seen, real = {}, rejection.Engine
    monkeypatch.setattr(rejection, "Engine", lambda *a, **k: seen.update(k) or real(*a, **k))
    _, engine = load_sampler(ModelConfig(path=path), tmp_path, info, compile_decode=True)
    assert isinstance(engine.decoder, StaticDecoder) and seen["compile_option"] == "sampling.compile_decode"
    assert load_sampler(ModelConfig(path=path), tmp_path, info)[1].decoder is None
    sharded = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), fsdp=True)
    with pytest.raises(ValueError, match="sampling.compile_decode needs an unsharded model"):
        Engine(engine.model, engine.tokenizer, sharded, compile_decode=True, compile_option="sampling.compile_decode")
