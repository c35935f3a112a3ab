"""fisher_fast.check: diag_fim on a few samples against a float64 per-sample autograd loop.

Run it once on a new model: it prints, per parameter, the relative error of diag_fim against the
loop and the path that computed it (a per-layer rule, an enclosing module's per-sample
gradients), so a layer that the rules or the layout detection get wrong shows up at once.

Some models do not run in float64 (Hugging Face's mixture-of-experts layers multiply by
``torch._grouped_mm``, which takes float32, bfloat16 and float16 only). The loop then runs in
float32 instead, with a :class:`ReferencePrecisionWarning` and the precision in the report.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from fisher_fast.fim.data import batch_size_of, batches, call_model
from fisher_fast.fim.engine import diag_fim
from fisher_fast.fim.layout import select_samples
from fisher_fast.fim.losses import LossSpec, objectives
from fisher_fast.fim.options import OutputSpec, select_output
from fisher_fast.fim.run_context import model_as_written


class CheckFailedWarning(UserWarning):
    """fisher_fast.check found parameters whose diag_fim differs from the per-sample loop."""


class ReferencePrecisionWarning(UserWarning):
    """The model failed in float64, so fisher_fast.check's per-sample loop ran in float32."""


@dataclass(frozen=True)
class CheckRow:
    name: str
    path: str
    error: float  # max |diag_fim - loop| / max |loop| over all parameters
    ok: bool


@dataclass(frozen=True)
class CheckReport:
    rows: list[CheckRow]
    tolerance: float
    samples: int
    reference: torch.dtype = torch.float64  # the per-sample loop's precision

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def __str__(self) -> str:
        width = max([9] + [len(r.name) for r in self.rows])
        lines = [
            f"fisher_fast.check: {self.samples} samples, "
            f"{str(self.reference).removeprefix('torch.')} per-sample loop, "
            f"tolerance {self.tolerance:.0e}",
            f"{'parameter':<{width}}  {'rel. error':>10}  ok  path",
        ]
        lines += [
            f"{r.name:<{width}}  {r.error:>10.2e}  {'yes' if r.ok else 'NO ':<3} {r.path}"
            for r in self.rows
        ]
        bad = sum(not r.ok for r in self.rows)
        lines.append("all parameters agree" if not bad else f"{bad} parameters DISAGREE")
        return "\n".join(lines)


def check(
    model: nn.Module,
    data: Any,
    *,
    samples: int = 8,
    batch_size: int = 4,
    loss: LossSpec = "cross_entropy",
    fisher: str = "empirical",
    output: OutputSpec = None,
    tolerance: float | None = None,
    verbose: bool = True,
) -> CheckReport:
    """Compare ``diag_fim`` with a float64 per-sample loop on the first ``samples`` samples.

    diag_fim runs on the model as it is, in batches of ``batch_size`` (more than one batch, so
    that the plan made from the first is used on the others); the loop runs on a float64 copy,
    one sample (as a batch of two copies of itself) and one backward pass at a time (in float32
    when the model fails in float64, with a :class:`ReferencePrecisionWarning`). ``fisher``
    is "empirical" or "exact".
    ``tolerance`` (relative to the largest entry): default 1e-4 for a float32 or lower
    precision model, 1e-9 for float64 (with a float64 loop). Prints the report (``verbose``),
    warns with :class:`CheckFailedWarning` when a parameter disagrees, and returns it.
    """
    if fisher not in ("empirical", "exact"):
        raise ValueError(f"check supports fisher='empirical' or 'exact', got {fisher!r}")
    chunks = _first_samples(data, samples, batch_size)
    copied = _cpu_copy(model)  # before diag_fim's forward passes fill any cache of the model
    # both in the model's own code and dtype (a compiled copy would compile for every
    # sample's batch; autocast would change the loop's precision)
    with model_as_written():
        fim = diag_fim(  # a fresh plan, which the next diag_fim call on the model starts from
            model,
            chunks,
            loss=loss,
            fisher=fisher,
            output=output,
            dtype=torch.float64,
            progress=False,
            reuse_plan=False,
        )
        reference, precision = _reference(copied, chunks, loss, fisher, output)
    scale = max(float(r.abs().max()) for r in reference.values())
    if scale == 0:
        raise ValueError("the per-sample loop gives an all-zero FIM on these samples; use others")
    dtypes = {p.dtype for p in model.parameters()}
    exact = dtypes == {torch.float64} and precision == torch.float64
    tol = tolerance if tolerance is not None else (1e-9 if exact else 1e-4)
    rows = []
    for name in fim.names:
        error = float((fim[name].double().cpu() - reference[name]).abs().max()) / scale
        rows.append(CheckRow(name, fim.meta["paths"].get(name, "?"), error, error <= tol))
    report = CheckReport(rows, tol, fim.n_samples, precision)
    if verbose:
        print(report)
    if not report.ok:
        bad = [r.name for r in rows if not r.ok]
        warnings.warn(
            f"diag_fim disagrees with the per-sample loop on {len(bad)} parameters "
            f"({', '.join(bad[:5])}); please report the model, and register a rule or use "
            "on_unsupported='skip' for them meanwhile",
            CheckFailedWarning,
            stacklevel=2,
        )
    return report


def _first_samples(data: Any, samples: int, batch_size: int) -> list[tuple[Any, Any]]:
    """The first ``samples`` samples of ``data``, re-cut into batches of ``batch_size``."""
    out: list[tuple[Any, Any]] = []
    seen = 0
    for inputs, targets in batches(data, batch_size):
        n = batch_size_of(inputs)
        for start in range(0, n, batch_size):
            if seen >= samples:
                return out
            count = min(batch_size, n - start, samples - seen)
            index = list(range(start, start + count))
            part = select_samples(inputs, n, index)
            out.append((part, None if targets is None else targets[start : start + count]))
            seen += count
    if not out:
        raise ValueError("data is empty: it yielded no samples")
    return out


def _on_cpu(value: Any, dtype: torch.dtype) -> Any:
    """A tensor on the CPU, in ``dtype`` when floating point; anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to("cpu", dtype) if value.is_floating_point() else value.cpu()


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` in eval mode, for the reference loop."""
    try:
        copied = copy.deepcopy(model)
    except RuntimeError as error:
        raise ValueError(
            "fisher_fast.check needs a copy of the model, and copying failed: the model holds a "
            "tensor computed with autograd history (a cache filled by an earlier forward pass, "
            "e.g. an attention-bias cache of an eval-mode model) "
            f"({error}). Clear that cache, or run check before any forward pass"
        ) from error
    return copied.eval().cpu()


def _reference(
    m: nn.Module, chunks: list[tuple[Any, Any]], loss: LossSpec, fisher: str, output: OutputSpec
) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """The per-sample loop's FIM of ``m`` (_cpu_copy, changed in place) and its precision:
    float64, or float32 when the model fails in float64 (an op without float64 kernels). An
    error that float32 gives as well is the model's or the data's, and is raised."""
    try:
        reference = _per_sample_loop(m.double(), chunks, loss, fisher, output, torch.float64)
        return reference, torch.float64
    except (RuntimeError, NotImplementedError, TypeError) as error:
        failure = error
    reference = _per_sample_loop(m.float(), chunks, loss, fisher, output, torch.float32)
    warnings.warn(
        f"the model fails in float64 ({str(failure).splitlines()[0][:200]}), so the reference "
        "loop ran in float32: errors of about 1e-6 are its own rounding",
        ReferencePrecisionWarning,
        stacklevel=3,
    )
    return reference, torch.float32


def _per_sample_loop(
    m: nn.Module,
    chunks: list[tuple[Any, Any]],
    loss: LossSpec,
    fisher: str,
    output: OutputSpec,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The FIM of ``m`` (a copy of the model in ``dtype``), summed in float64, by a loop over
    samples, each run as a batch of two copies of itself whose loss is halved: one sample's
    gradient, without the batch of one in which PyTorch's CPU BatchNorm backward (eval mode)
    returns wrong gradients for some output-gradient strides (a transpose after the norm, as
    LeViT, XCiT or lambda layers have)."""
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    total = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    count = 0
    for inputs, targets in chunks:
        n = batch_size_of(inputs)
        for i in range(n):
            twice = tree_map(lambda v: _on_cpu(v, dtype), select_samples(inputs, n, [i, i]))
            y = None if targets is None else _on_cpu(targets[[i, i]], dtype)
            with torch.enable_grad():
                out = select_output(call_model(m, twice), output)
                objs = list(objectives(out, y, loss, fisher, 1, None))
                for j, obj in enumerate(objs):
                    grads = torch.autograd.grad(
                        obj / 2,
                        list(params.values()),
                        allow_unused=True,
                        retain_graph=j < len(objs) - 1,
                    )
                    for name, g in zip(params, grads, strict=True):
                        if g is not None:
                            total[name] += g.double().square()
            count += 1
    return {name: t / count for name, t in total.items()}
