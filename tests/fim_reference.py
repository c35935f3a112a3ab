"""Independent references for diag_fim tests: per-sample autograd loops in float64."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def to_float64(model: nn.Module) -> nn.Module:
    """A float64 deep copy of the model, in eval mode, fit for batches of one sample."""
    return one_sample_safe(copy.deepcopy(model).double().eval())


def one_sample_safe(model: nn.Module) -> nn.Module:
    """The model (changed in place) with the gradient at every BatchNorm and InstanceNorm output
    made contiguous: PyTorch's CPU backward of these norms in eval mode returns a wrong input
    gradient for a batch of one sample when that gradient has some strides (a transpose after
    the norm, as in XCiT and lambda layers), and the loops below run batches of one."""

    def contiguous(grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(contiguous)

    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    for m in model.modules():
        if isinstance(m, norms):
            m.register_forward_hook(hook)
    return model


def _as64(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.is_floating_point() else x


def reference_fim(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    loss: str = "cross_entropy",
    fisher: str = "empirical",
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat float64 diagonal FIM by a loop over samples (and classes / draws) with autograd.

    ``labels`` (N, k) are the draws of the "mc" kind, made by the caller with the same generator.
    """
    m = to_float64(model)
    n = inputs.shape[0]
    total = None
    for i in range(n):
        out = m(_as64(inputs[i : i + 1]))
        terms = []
        if loss == "cross_entropy":
            log_p = torch.log_softmax(out, dim=1)[0]
            if fisher == "empirical":
                terms.append((1.0, -log_p[targets[i]]))
            elif fisher == "mc":
                k = labels.shape[1]
                terms += [(1.0 / k, -log_p[labels[i, j]]) for j in range(k)]
            else:
                p = log_p.detach().exp()
                terms += [(float(p[c]), log_p[c]) for c in range(out.shape[1])]
        else:  # mse, empirical: 0.5 * ||f - y||^2
            terms.append((1.0, 0.5 * (out - _as64(targets[i : i + 1])).square().sum()))
        for j, (w, obj) in enumerate(terms):
            retain = j < len(terms) - 1
            params = [p for p in m.parameters() if p.requires_grad]
            grads = torch.autograd.grad(obj, params, allow_unused=True, retain_graph=retain)
            sq = torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1) ** 2
                    for p, g in zip(params, grads, strict=True)
                ]
            )
            total = w * sq if total is None else total + w * sq
    return total / n


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference| (reference must not be all zeros)."""
    scale = reference.abs().max()
    assert scale > 0, "the reference FIM is all zeros: the test problem is degenerate"
    return float((value.double() - reference).abs().max() / scale)


def batchnorm_stats_randomised(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics (fresh ones are mean 0, var 1)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
        affine = (
            nn.modules.batchnorm._BatchNorm,
            nn.GroupNorm,
            nn.LayerNorm,
            nn.modules.instancenorm._InstanceNorm,
        )
        if isinstance(m, affine) and getattr(m, "weight", None) is not None:
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator))
                if m.bias is not None:  # a norm with a weight and no bias (MetaFormer's)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=generator))
    return model


def _sample_of(inputs: object, i: int, n: int, in_float64: bool = True) -> object:
    """Sample i of a batch: tensors whose axis 0 has the n samples are sliced, others kept;
    floating-point ones in float64 unless ``in_float64`` is False."""
    from torch.utils._pytree import tree_map

    def pick(v: object) -> object:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            v = v[i : i + 1]
        return _as64(v) if isinstance(v, torch.Tensor) and in_float64 else v

    return tree_map(pick, inputs)


def _call(model: nn.Module, inputs: object) -> object:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def reference_fim_batches(
    model: nn.Module,
    batches: list[tuple[object, torch.Tensor]],
    logits: object = None,
    *,
    loss: str = "cross_entropy",
    in_float64: bool = True,
) -> dict[str, torch.Tensor]:
    """{parameter name: float64 empirical diagonal FIM} by a loop over samples, for inputs that
    are tensors, tuples or dicts (tensors with the batch's samples on axis 0 are split, others
    shared) and outputs picked by ``logits(output)`` (default: the output, or its ``.logits``).
    Classification targets may be (N,) or (N, T) (a token per position; loss summed over T).
    With ``in_float64=False`` the model runs in its own dtype (the squares are still summed in
    float64): what a plain per-sample autograd loop in that precision gives."""
    m = to_float64(model) if in_float64 else one_sample_safe(copy.deepcopy(model).eval())
    params = dict((n, p) for n, p in m.named_parameters() if p.requires_grad)
    total = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    count = 0
    for inputs, targets in batches:
        n = targets.shape[0]
        for i in range(n):
            out = _call(m, _sample_of(inputs, i, n, in_float64))
            if logits is not None:
                out = logits(out)  # type: ignore[operator]
            elif not isinstance(out, torch.Tensor):
                out = out["logits"] if isinstance(out, dict) else out.logits  # type: ignore[union-attr]
            if loss == "mse":
                obj = 0.5 * (out - _as64(targets[i : i + 1])).square().sum()
            else:
                flat = out.reshape(-1, out.shape[-1])
                obj = nn.functional.cross_entropy(flat, targets[i].reshape(-1), reduction="sum")
            grads = torch.autograd.grad(obj, list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads, strict=True):
                if g is not None:
                    total[name] += g.double().square()
            count += 1
    return {name: t / count for name, t in total.items()}


def float32_bound(
    model: nn.Module,
    batches: list[tuple[object, torch.Tensor]],
    reference: dict[str, torch.Tensor],
    **kwargs: Any,
) -> float:
    """The error a float32 FIM may have against the float64 ``reference``: 1e-5, or, for a
    random draw whose float32 forward and backward passes are themselves further off (an
    ill-conditioned network), twice the error of a plain float32 per-sample autograd loop on the
    same model and batches, which shares that rounding and no other. ``kwargs`` go to
    :func:`reference_fim_batches`."""
    loop = reference_fim_batches(model, batches, in_float64=False, **kwargs)
    return max(1e-5, 2 * max(max_relative_error(loop, reference).values()))


def max_relative_error(fim: object, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter, max |fim - reference| / max |reference over all parameters|."""
    scale = max(float(r.abs().max()) for r in reference.values())
    assert scale > 0, "the reference FIM is all zeros: the test problem is degenerate"
    return {
        name: float((fim[name].double() - ref).abs().max()) / scale  # type: ignore[index]
        for name, ref in reference.items()
    }
