"""LoRA: low-rank adapters on the linear layers of a Hugging Face causal LM, written out here.

LoRA Eq. (3) (Hu et al. 2021): a frozen W0 plus a trained low-rank update ΔW = B A,

    h = W0 x + ΔW x = W0 x + B A x,        B: [out, r], A: [r, in], r << min(in, out)

with ΔW x scaled by alpha / r (Sec. 4.1), so that changing r needs no new learning rate. Here:

    y = W x + b + scaling * B A dropout(x),    scaling = alpha / r      (LoRA, Sec. 4.1)
                                               scaling = alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023)

rsLoRA shows that alpha / r makes the update vanish as r grows (the adapter learns slower at larger
ranks) and that alpha / sqrt(r) keeps it stable in r; it is an option, off by default.

Where this departs from the paper, said out loud:
- A's init is Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), the init of
  nn.Linear, as in Microsoft's loralib and PEFT's default; the paper (Sec. 4.1) says "a random
  Gaussian initialization for A". B = 0 as in the paper, so step 0 is the base model exactly.
- Dropout on the adapter's input is not in Eq. (3); it is loralib's and PEFT's (default 0).
- The bias is not adapted (PEFT's bias "none"); A and B take the base weight's dtype and device.

Why a module swap that subclasses nn.Linear, and not a parametrization (minLoRA) of the weight:
- `LoRALinear` adopts the base layer's own `weight` and `bias` Parameters (no copy), so the base
  keys of the state dict stay `...q_proj.weight` (Hugging Face loading, checkpoints and export see
  the same names) and `isinstance(layer, nn.Linear)` still holds;
- with the adapter off or merged, its forward is the very call of `nn.Linear.forward`,
  `F.linear(x, W, b)` (`base_forward`), so "adapter off == base model" holds bit for bit by construction; a
  parametrization renames the weight (`parametrizations.weight.original`) and computes
  W + s B A, an [out, in] tensor, at every forward, where B (A x) costs r (in + out) per token.
- merge adds s B A to W in place and keeps the original W (a buffer, not saved): W + s B A - s B A
  does not round back to W in floating point, so unmerge copies the kept bits back. The copy costs
  one weight per wrapped layer, only while merged.

A second, frozen adapter slot (`add_reference_adapters`: `lora_ref_A`, `lora_ref_B`) holds a copy
of A and B taken at some step (`refresh_reference_adapters`); inside `reference_adapters(model)`
the layers compute W x + b + s B_ref A_ref x, the merged policy of that step, on the same frozen
base. That is GRPO's refreshed reference (--grpo.ref_refresh_steps) without a second model: it
costs one more adapter, not one more copy of the weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Every attention and MLP projection of Qwen2, Llama and SmolLM2.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_lora_arguments(rank: int, alpha: float, dropout: float) -> None:
    """Refuse, naming the argument, a rank < 1, an alpha <= 0 or not finite, a dropout outside [0, 1)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class LoRALinear(nn.Linear):
    """An nn.Linear with the base layer's own weight and bias (frozen) plus scaling * B A dropout(x)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        check_lora_arguments(rank, alpha, dropout)
        w = base.weight
        # On "meta": nothing is allocated for the weight and bias that the base's replace below.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.dropout, self.rslora = rank, alpha, dropout, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=w.device, dtype=w.dtype)  # A: [r, in]
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=w.device, dtype=w.dtype)  # B: [out, r]
        self.adapter_enabled = True
        self.use_reference = False  # compute with the reference slot (lora_ref_A, lora_ref_B) instead
        self.register_buffer("unmerged_weight", None, persistent=False)  # W's bits while merged
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in))
        nn.init.zeros_(self.lora_B.weight)  # B = 0: ΔW = 0 at step 0

    @property
    def merged(self) -> bool:
        return self.unmerged_weight is not None

    @torch.no_grad()
    def add_reference_slot(self) -> None:
        """A frozen second adapter, lora_ref_A / lora_ref_B, shaped as A and B, zero until refreshed."""
        w = self.lora_A.weight
        self.lora_ref_A = nn.Linear(self.in_features, self.rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_ref_B = nn.Linear(self.rank, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        for m in (self.lora_ref_A, self.lora_ref_B):
            m.weight.zero_()
            m.weight.requires_grad_(False)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W x + b, the call of nn.Linear.forward. The engine's decode steps on a CPU swap in the
        few-row form of the product, as for a plain nn.Linear (model/engine.py `few_row_linears`)."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)  # W x + b
        if self.merged or not self.adapter_enabled:
            return y
        a, b = (self.lora_ref_A, self.lora_ref_B) if self.use_reference else (self.lora_A, self.lora_B)
        h = a(self.lora_dropout(x))  # [..., r]
        if self.scaling != 1:
            h = h * self.scaling  # s B (A x) = B (s A x): scaled at width r, not out (forward and backward)
        # In place: no backward reads y = W x + b (a product saves its inputs, not its output),
        # so the sum needs no [..., out] buffer of its own, and its backward passes the gradient on.
        return y.add_(b(h))

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling * B A in place (in float32 at least: a bf16 W is rounded once), W kept."""
        if self.merged:
            raise RuntimeError("LoRA: this layer is already merged")
        if not self.adapter_enabled or self.use_reference:
            raise RuntimeError("LoRA: cannot merge inside adapters_disabled or reference_adapters")
        self.unmerged_weight = self.weight.detach().clone()
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        delta = self.scaling * (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc))  # [out, in]
        self.weight.copy_((self.weight.to(acc) + delta).to(self.weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- the W kept by `merge`, bit for bit."""
        if not self.merged:
            raise RuntimeError("LoRA: this layer is not merged")
        self.weight.copy_(self.unmerged_weight)
        self.unmerged_weight = None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, "
                f"rslora={self.rslora}, merged={self.merged}")


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of targets: the module's full name, or its name ends with "." + target."""
    return name == target or name.endswith("." + target)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, layer) of every LoRALinear of `model`, in module order; refused when there is none."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    return layers


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the model's linear layers, the adapters' own A and B left out."""
    adapters = {id(m) for layer in model.modules() if isinstance(layer, LoRALinear)
                for m in layer.children() if isinstance(m, nn.Linear)}
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in adapters]


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS,
               dropout: float = 0.0, rslora: bool = False) -> list[str]:
    """Swap each nn.Linear that a target names (its full name, or a suffix after a ".") for a
    LoRALinear on the same weight, freeze every base parameter, and return the wrapped names.

    Everything is checked before the model is touched: a refusal leaves it as it was."""
    check_lora_arguments(rank, alpha, dropout)
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"LoRA targets must be a non-empty list of module names, got {targets!r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    linears = _linear_names(model)
    missing = [t for t in targets if not any(_matches(n, t) for n in linears)]
    if missing:
        suffixes = sorted({n.rpartition(".")[2] for n in linears})
        raise ValueError(f"LoRA target(s) {', '.join(map(repr, missing))} match no linear layer of the model; "
                         f"its linear layers are named: {', '.join(suffixes) or '(none)'}")
    names = [n for n in linears if any(_matches(n, t) for t in targets)]
    model.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha, dropout, rslora))
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters (each layer's A and B), for the optimizer."""
    return [p for _, layer in lora_layers(model) for p in (layer.lora_A.weight, layer.lora_B.weight)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, the model computes the base model's forward bit for bit (GRPO's reference policy)."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("adapters_disabled: the adapters are merged into the weights; unmerge_lora first")
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.adapter_enabled = enabled


def add_reference_adapters(model: nn.Module) -> None:
    """Give every adapted layer its reference slot (zero; `refresh_reference_adapters` fills it).
    Before sharding: FSDP2 shards the slot with its layer, and checkpoints hold it (`is_lora_key`)."""
    for _, layer in lora_layers(model):
        layer.add_reference_slot()


@torch.no_grad()
def refresh_reference_adapters(model: nn.Module) -> None:
    """Reference slot <- the adapters as they are now: A_ref = A, B_ref = B, bit for bit (under
    FSDP2 each rank copies its own shard, laid out as the adapter's)."""
    for _, layer in lora_layers(model):
        layer.lora_ref_A.weight.copy_(layer.lora_A.weight)
        layer.lora_ref_B.weight.copy_(layer.lora_B.weight)


@contextlib.contextmanager
def reference_adapters(model: nn.Module):
    """Inside, the model computes W x + b + s B_ref A_ref x: the merged policy of the step whose
    adapters `refresh_reference_adapters` copied (GRPO's refreshed reference)."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("reference_adapters: the adapters are merged into the weights; unmerge_lora first")
    if not all(hasattr(layer, "lora_ref_A") for layer in layers):
        raise RuntimeError("reference_adapters: the model has no reference slot (add_reference_adapters first)")
    for layer in layers:
        layer.use_reference = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.use_reference = False


def merge_lora(model: nn.Module) -> None:
    """W <- W + scaling * B A in every adapted layer (for export or faster generation)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Every adapted layer's W back to its bits before `merge_lora`."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def is_adapter_key(key: str) -> bool:
    """A state-dict key of an adapter's A or B (not of a base weight)."""
    return ".lora_A." in key or ".lora_B." in key


def is_lora_key(key: str) -> bool:
    """A state-dict key of anything LoRA adds to the base (the adapters, and the reference
    adapters of `add_reference_adapters`): what an adapter-only checkpoint holds."""
    return is_adapter_key(key) or ".lora_ref_A." in key or ".lora_ref_B." in key


def base_sha256(model: nn.Module) -> str:
    """SHA-256 of the base weights, the identity of the model the adapters were trained on.

    Over the state dict's entries that LoRA did not add, in sorted key order, each as its key,
    dtype and shape, then its bytes: a pure function of the weights as loaded (the same model
    converted to other files hashes the same; loaded in another dtype, not). Reads every base
    byte once on the CPU: about a second per GB. Call it on the whole model, before sharding."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        if is_lora_key(key):
            continue
        h.update(f"{key}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def merged_weight_names(model: nn.Module) -> set[str]:
    """State-dict keys of the weights that `merge_lora` changes."""
    return {f"{name}.weight" for name, _ in lora_layers(model)}


@contextlib.contextmanager
def merged(model: nn.Module):
    """Inside, the adapters (if any) are merged into the weights: the state dict's base keys hold
    the trained model as one plain set of weights (the export). Unmerged on the way out, bit for bit."""
    if not has_lora(model):
        yield model
        return
    merge_lora(model)
    try:
        yield model
    finally:
        unmerge_lora(model)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A and B under PEFT's key names: `base_model.model.<module path>.lora_A.weight` (and lora_B),
    the module path as in the Hugging Face model given (pass the causal LM, not a wrapper)."""
    out = {}
    for name, layer in lora_layers(model):
        out[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.weight.detach()  # [r, in]
        out[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.weight.detach()  # [out, r]
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """A and B from PEFT-named tensors (`lora_state_dict`'s keys): the keys must be exactly those
    of the model's adapters and each shape its own, else ValueError naming the first difference."""
    want = lora_state_dict(model)
    missing, extra = sorted(want.keys() - tensors.keys()), sorted(tensors.keys() - want.keys())
    if missing or extra:
        raise ValueError(f"the adapter's layers are not the ones wrapped here: "
                         f"{f'no tensor for {missing[0]}' if missing else f'{extra[0]} wraps no layer'}"
                         f" ({len(missing)} missing, {len(extra)} extra of {len(want)})")
    for key, p in want.items():
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise ValueError(f"{key} has shape {list(tensors[key].shape)}, the layer's is {list(p.shape)}")
        p.copy_(tensors[key])


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> None:
    """W <- W + scaling * B A for good, and each LoRALinear back to a plain nn.Linear on that W
    (PEFT's name for it): the model is a plain model, as the merged export loads. The merge is
    `LoRALinear.merge`'s, in float32 at least, one layer at a time."""
    for name, layer in lora_layers(model):
        layer.merge()
        layer.unmerged_weight = None
        parent, _, child = name.rpartition(".")
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        setattr(model.get_submodule(parent), child, plain)


def peft_adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """PEFT's `adapter_config.json` for the adapters of `model`, as a dict (PEFT is not imported).

    target_modules lists the wrapped layers' last names when PEFT's suffix rule matches exactly
    the wrapped layers with them, and their full names otherwise."""
    layers = lora_layers(model)
    settings = {(layer.rank, layer.alpha, layer.dropout, layer.rslora) for _, layer in layers}
    if len(settings) > 1:
        raise ValueError(f"peft_adapter_config: the layers' LoRA settings differ: {sorted(settings)}")
    (rank, alpha, dropout, rslora), = settings
    names = [name for name, _ in layers]
    suffixes = sorted({n.rpartition(".")[2] for n in names})
    by_suffix = [n for n in _linear_names(model) if n.rpartition(".")[2] in suffixes]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora, "bias": "none",
            "target_modules": suffixes if by_suffix == names else names}
