"""nn.LSTM and nn.GRU: per-sample products over time from the gate gradients.

One direction of one layer computes, at every step t, input pre-activations ``a_t = W_ih x_t +
b_ih`` and recurrent ones ``r_t = W_hh h_{t-1} + b_hh``. A sample's gradient of each weight is a
sum over its steps of outer products, the Linear math with time as the sequence axis:

    dL/dW_ih = sum_t da_t x_t^T,   dL/db_ih = sum_t da_t,
    dL/dW_hh = sum_t dr_t h_{t-1}^T,   dL/db_hh = sum_t dr_t,

squared and summed over samples by ``ctx.square_sum``. The LSTM adds ``a_t + r_t`` before its
gates, so ``dr_t = da_t``. The GRU applies its reset gate ``z_r`` to the recurrent part of the
new gate only (``n = tanh(a_n + z_r * r_n)``), so ``dr_t = [da_r, da_z, z_r * da_n]``, with
``z_r = sigmoid(a_r + r_r)`` recomputed from the saved states (one product).

The gradients ``da`` come from an instrumented forward: in diag_fim's passes the module runs as
its recurrence written out (rnn_replica.py, equal to the fused op to rounding) with a tap on
each layer's ``a``, so the model's own backward pass delivers them; the layer inputs ``x`` and
states ``h`` are kept from that pass. No vmap, no per-sample re-run.

Covered: what the replica covers (layers, directions, biases, either layout, an initial
state). Projections (``proj_size``) and dropout between layers in training mode take the
generic path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fisher_fast.fim.layout import CallLayout, Sampled
from fisher_fast.fim.rnn_replica import LayerTrace, replica
from fisher_fast.fim.rules import Call, RuleContext, joined, register_rule

_ONE_PER_SAMPLE_ON_AXIS_1 = Sampled(1, 1)


def supports(module: nn.Module) -> bool:
    """Configurations the instrumented forward reproduces exactly."""
    assert isinstance(module, nn.RNNBase)
    return not module.proj_size and not (module.training and module.dropout)


def _positional(module: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple:
    """The call's (input[, hx]) as positional arguments, as the replica takes them."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    given = [bound.arguments.get(name) for name in ("input", "hx")]
    return (given[0],) if given[1] is None else (given[0], given[1])


def instrument(
    module: nn.RNNBase,
    call: Call,
    tap: Callable[[torch.Tensor], torch.Tensor],
    *args: Any,
    **kwargs: Any,
) -> Any:
    """The module's forward as its recurrence unrolled, with a tap on each layer's input
    pre-activations (tap k: the k-th layer and direction); None for a call the replica does not
    cover (the module's own forward runs). ``call.saved["trace"]`` keeps each layer's inputs
    and states."""
    positional = _positional(module, args, kwargs)
    forward = replica(module, positional, {})
    if forward is None:
        return None
    trace: list[LayerTrace] = []
    output = forward(dict(module.named_parameters()), positional, {}, tap=tap, trace=trace)
    call.saved = {"trace": trace}
    return output


def accepts(module: nn.RNNBase, layout: CallLayout) -> bool:
    """The sequence with its samples on its batch axis, one entry each; initial states and
    final states with theirs on axis 1, as torch lays them out."""
    seq = Sampled(0 if module.batch_first else 1, 1)
    states_ok = all(v == _ONE_PER_SAMPLE_ON_AXIS_1 for v in layout.outputs[1:])
    rest_ok = all(v is None or v == _ONE_PER_SAMPLE_ON_AXIS_1 for v in layout.inputs[1:])
    return (
        layout.primary == seq
        and bool(layout.outputs)
        and layout.outputs[0] == seq
        and states_ok
        and rest_ok
    )


def _recurrent_grad(
    module: nn.RNNBase, suffix: str, trace: LayerTrace, da: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """(N, T, G) the gradient at the recurrent pre-activations ``r_t``."""
    if isinstance(module, nn.LSTM):
        return da
    hidden = module.hidden_size
    w_r = getattr(module, f"weight_hh{suffix}")[:hidden].to(da.dtype)
    r_r = h @ w_r.T
    b_hh = getattr(module, f"bias_hh{suffix}", None)
    if b_hh is not None:
        r_r = r_r + b_hh[:hidden].to(da.dtype)
    reset = torch.sigmoid(trace.pre.detach()[..., :hidden].to(da.dtype) + r_r)
    return torch.cat([da[..., : 2 * hidden], reset * da[..., 2 * hidden :]], dim=-1)


@register_rule(nn.LSTM, nn.GRU, layout=accepts, supports=supports, instrument=instrument)
def recurrent_rule(module: nn.RNNBase, calls: list[Call], ctx: RuleContext) -> None:
    for call in calls:
        if "trace" not in call.saved:
            raise RuntimeError(
                f"{type(module).__name__} was called in a way its rule does not cover (packed "
                "or unbatched input); report it, and pass on_unsupported='fallback' with a "
                "register_rule override meanwhile"
            )
    dirs = 2 if module.bidirectional else 1
    work = ctx.work_dtype
    for layer in range(module.num_layers):
        for d in range(dirs):
            k = layer * dirs + d
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            xs, hs, das, drs = [], [], [], []
            for call in calls:
                trace: LayerTrace = call.saved["trace"][k]
                da = call.grad(k).to(work)
                h = trace.previous().detach().to(work)
                xs.append(trace.inputs.detach().to(work))
                hs.append(h)
                das.append(da)
                drs.append(_recurrent_grad(module, suffix, trace, da, h))
            x, h, da, dr = (joined(parts, dim=1) for parts in (xs, hs, das, drs))
            ctx.add(f"weight_ih{suffix}", ctx.square_sum(da.unsqueeze(1), x.unsqueeze(1))[0])
            ctx.add(f"weight_hh{suffix}", ctx.square_sum(dr.unsqueeze(1), h.unsqueeze(1))[0])
            if module.bias:
                ctx.add_bias(f"bias_ih{suffix}", da.sum(1))
                ctx.add_bias(f"bias_hh{suffix}", dr.sum(1))
