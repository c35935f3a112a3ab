"""RMSNorm: torch's nn.RMSNorm and the look-alikes of other libraries (Llama-style decoders).

y = x̂ ∘ weight with x̂ = x / sqrt(mean(x², normalised axes) + eps), so the per-sample weight
gradient is the sum over positions of g ∘ x̂, as for LayerNorm without a bias. Other libraries'
RMSNorm classes (``LlamaRMSNorm``, ``T5LayerNorm`` and the like) are recognised by name and then
*verified* (lookalike.py): its forward is run once on a random input and must reproduce that
formula to rounding (x̂ is then the module's own output with a weight of ones, to keep its
numerics), so a variant with other math (Gemma's ``1 + weight``, a bias, an offset) is not
mistaken for it and goes to the exact generic path instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fisher_fast.fim.rules import Call, RuleContext, RuleSpec, register_matched_rule, register_rule
from fisher_fast.fim.rules.lookalike import reproduces
from fisher_fast.fim.rules.norm import affine_rule, layer_example, layer_positions


def _eps(module: nn.Module) -> float | None:
    for attr in ("eps", "variance_epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm formula over the last axis, to check look-alikes against."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _rms_rule(module: nn.RMSNorm, calls: list[Call], ctx: RuleContext) -> None:
    """x̂ from the layer's own functional form without the weight, as the other norm rules."""
    shape = tuple(module.normalized_shape)
    affine_rule(
        lambda m, x: F.rms_norm(x, shape, None, module.eps),
        lambda x: layer_positions(x, len(shape)),
    )(module, calls, ctx)


register_rule(
    nn.RMSNorm,
    layout="positionwise",
    supports=lambda m: m.weight is not None,
    example=layer_example,
)(_rms_rule)


def _looks_like_rms_norm(module: nn.Module) -> bool:
    """A module named like an RMSNorm, with one 1-d weight, that computes weight ∘ x̂."""
    name = type(module).__name__
    if not (name.endswith("RMSNorm") or name == "T5LayerNorm") or isinstance(module, nn.RMSNorm):
        return False
    params = dict(module.named_parameters())
    weight = params.get("weight")
    eps = _eps(module)
    if set(params) != {"weight"} or weight is None or weight.dim() != 1 or eps is None:
        return False

    def reference(x: torch.Tensor) -> torch.Tensor:
        return weight.double() * _normalise(x.double(), eps)

    return reproduces(module, "rms norm", reference, (3, weight.numel()))


def _matched_rms_rule(module: nn.Module, calls: list[Call], ctx: RuleContext) -> None:
    """x̂ is the module's own output with a weight of ones, so its numerics (a variance taken
    in float32, casts back to the input dtype) are the model's, not a re-derivation's."""
    ones = {"weight": torch.ones_like(module.get_parameter("weight"))}

    def normalise(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return functional_call(m, ones, (x,)).to(ctx.work_dtype)

    affine_rule(normalise, lambda x: layer_positions(x, 1), cast_input=False)(module, calls, ctx)


register_matched_rule(_looks_like_rms_norm, RuleSpec(_matched_rms_rule, layout="positionwise"))
