"""nn.LSTM and nn.GRU written out in elementary tensor ops, for the generic per-sample path.

torch's recurrent layers run as one fused op (oneDNN or cuDNN) that ``torch.func.vmap`` has no
batching rule for: vmap then loops over the samples inside, or fails where the layer is given
its initial state, and the per-sample path (fallback.py) drops to one sample at a time. The
same recurrence unrolled over time from matrix products and pointwise ops is batched by vmap
like any other function, so the per-sample gradients of all samples of a chunk come from one
vectorised pass. Its outputs equal the fused op's to rounding (the tests compare both paths
with a float64 per-sample loop).

The recurrent rule (rules/recurrent.py) runs the same replica as the module's forward in
diag_fim's own passes, with a tap on every layer's input pre-activations and a record of each
layer's inputs and hidden states, from which the per-sample gradients follow without vmap.

Covered: single- and multi-layer, uni- and bidirectional, with or without biases, batch-first
or sequence-first, with or without an initial state, on batched input. Not covered, and left to
the module's own forward: ``proj_size``, packed sequences, unbatched input, dropout in training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Forward = Callable[..., Any]
Tap = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LayerTrace:
    """One direction of one layer, in its own time order (reversed for a reverse direction).

    ``inputs`` (N, T, F): the sequence it reads; ``pre`` (N, T, G): its input pre-activations
    ``inputs @ weight_ih.T + bias_ih`` (G = 4H for LSTM, 3H for GRU), as tapped; ``h0`` (N, H):
    its initial hidden state; ``outputs`` (N, T, H): its hidden state after each step.
    """

    inputs: torch.Tensor
    pre: torch.Tensor
    h0: torch.Tensor
    outputs: torch.Tensor

    def previous(self) -> torch.Tensor:
        """(N, T, H) the hidden state each step starts from."""
        return torch.cat([self.h0.unsqueeze(1), self.outputs[:, :-1]], dim=1)


def replica(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Forward | None:
    """A function (parameters, args, kwargs) -> the module's output, computed unrolled, when the
    module is an nn.LSTM or nn.GRU called in a way the replica covers; else None.

    The function also takes ``tap`` (applied to each layer's input pre-activations before
    they are used) and ``trace`` (a list that gets one :class:`LayerTrace` per layer and
    direction, in torch's order of their parameters)."""
    if type(module) not in (nn.LSTM, nn.GRU) or kwargs:
        return None
    rnn: nn.RNNBase = module  # type: ignore[assignment]
    if rnn.proj_size or (rnn.training and rnn.dropout) or not args or len(args) > 2:
        return None
    if not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
        return None
    lstm = isinstance(rnn, nn.LSTM)
    step = _lstm_step if lstm else _gru_step

    def forward(
        params: dict[str, torch.Tensor],
        a: tuple[Any, ...],
        _: dict[str, Any],
        tap: Tap | None = None,
        trace: list[LayerTrace] | None = None,
    ) -> Any:
        x = a[0] if rnn.batch_first else a[0].transpose(0, 1)  # (N, T, features)
        dirs = 2 if rnn.bidirectional else 1
        n, hidden = x.shape[0], rnn.hidden_size
        state = a[1] if len(a) > 1 else None
        if state is None:
            zeros = x.new_zeros(rnn.num_layers * dirs, n, hidden)
            state = (zeros, zeros) if lstm else zeros
        h0, c0 = state if lstm else (state, None)
        finals_h, finals_c = [], []
        for layer in range(rnn.num_layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh = params[f"weight_ih{suffix}"], params[f"weight_hh{suffix}"]
                b_ih, b_hh = params.get(f"bias_ih{suffix}"), params.get(f"bias_hh{suffix}")
                seq = x.flip(1) if d else x
                pre = seq @ w_ih.T  # (N, T, gates): every step's input product at once
                if b_ih is not None:
                    pre = pre + b_ih
                if tap is not None:
                    pre = tap(pre)
                c_k = c0[k] if c0 is not None else None
                out, h, c = _unroll(step, pre, w_hh, b_hh, h0[k], c_k)
                if trace is not None:
                    trace.append(LayerTrace(seq, pre, h0[k], out))
                outs.append(out.flip(1) if d else out)
                finals_h.append(h)
                finals_c.append(c)
            x = torch.cat(outs, dim=2) if dirs == 2 else outs[0]
        out = x if rnn.batch_first else x.transpose(0, 1)
        h_n = torch.stack(finals_h)
        if not lstm:
            return out, h_n
        return out, (h_n, torch.stack([c for c in finals_c if c is not None]))

    return forward


def _unroll(
    step: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    inputs: torch.Tensor,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
    h: torch.Tensor,
    c: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run one direction of one layer from its input pre-activations (N, T, gates): its
    outputs (N, T, H) and final states."""
    outs = []
    for step_inputs in inputs.unbind(1):  # one gradient for all steps (slices: one each)
        recurrent = h @ w_hh.T
        if b_hh is not None:
            recurrent = recurrent + b_hh
        h, c = step(step_inputs, recurrent, h, c)
        outs.append(h)
    return torch.stack(outs, dim=1), h, c


def _lstm_step(
    inputs: torch.Tensor, recurrent: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step: gates i, f, g, o in torch's order."""
    assert c is not None
    i, f, g, o = (inputs + recurrent).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_step(
    inputs: torch.Tensor, recurrent: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
) -> tuple[torch.Tensor, None]:
    """One GRU step: gates r, z, n in torch's order, the reset gate applied to the recurrent
    part of n (bias included), as torch computes it."""
    x_r, x_z, x_n = inputs.chunk(3, dim=-1)
    h_r, h_z, h_n = recurrent.chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h, None
