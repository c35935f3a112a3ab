"""diag_fim: the diagonal Fisher information of any nn.Module over a data set.

One forward pass per batch records every module call (capture.py); one backward pass per
objective (losses.py) delivers the gradient at each module output, and the module's rule turns
its inputs and output gradients into sum_n (dL_n/dθ)^2 without forming per-sample gradients
of the whole model. Memory holds one batch's activations plus one accumulator the size of the
model, whatever the number of samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fisher_fast import _library
from fisher_fast import distributed as dist_env
from fisher_fast._version import __version__
from fisher_fast.fim.capture import Capture, Owner
from fisher_fast.fim.data import batch_size_of, batches, call_model, devices_of, take
from fisher_fast.fim.distributed import LocalSums, reduce_sums, should_reduce
from fisher_fast.fim.fallback import make_fallback_rule
from fisher_fast.fim.losses import FISHER_KINDS, LossSpec, objectives
from fisher_fast.fim.plan import OwnerPlan, Plan, direct_owners, plan_from_calls, recording_calls
from fisher_fast.fim.result import DiagFIM
from fisher_fast.fim.rules import Call, Instrument, Rule, RuleContext, find_rule
from fisher_fast.fim.rules.norm import BATCHNORM_TRAINING_ERROR

BACKENDS = ("auto", "kernels", "torch")
ON_UNSUPPORTED = ("fallback", "error", "skip")


def diag_fim(
    model: nn.Module,
    data: Any,
    *,
    loss: LossSpec = "cross_entropy",
    fisher: str = "empirical",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    max_samples: int | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    on_unsupported: str = "fallback",
    progress: bool = True,
    batch_size: int = 256,
    mode: str = "eval",
    distributed: bool | None = None,
) -> DiagFIM:
    """Diagonal Fisher information ``F = (1/N) sum_n (dL_n/dθ)^2`` of ``model``'s trainable parameters.

    Args:
        model: any module; run in eval mode (``mode="eval"``, restored afterwards) or as it is
            (``mode="keep"``). BatchNorm must use running statistics either way.
        data: a DataLoader or any iterable of ``(inputs, targets)`` batches, or a pair of tensors
            ``(X, y)`` cut into ``batch_size`` batches. Inputs may be a tensor, tuple or dict.
        loss: ``"cross_entropy"`` (logits (N, C), integer labels), ``"mse"`` (per-sample
            0.5 ||f - y||^2), or a callable ``(outputs, targets) -> (N,)`` per-sample losses.
        fisher: ``"empirical"`` (given labels, paper eq. 2), ``"mc"`` (``mc_samples`` labels
            drawn from the model, seeded by ``generator``, which must live on the model's
            device) or ``"exact"`` (expectation over all classes; cost proportional to C).
        max_samples: stop after this many samples.
        dtype: accumulator dtype, float32 or float64 (products use float64 for float64).
        backend: ``"kernels"`` (compiled ops), ``"torch"`` (the same math in PyTorch) or
            ``"auto"`` (kernels when the compiled library is loaded, else torch).
        on_unsupported: for parameters without a per-layer rule: ``"fallback"`` (torch.func
            per-sample gradients of that module), ``"error"`` (list them) or ``"skip"`` (leave
            them out of the result).
        progress: show a progress bar over samples (on rank 0 only when reducing).
        distributed: inside an initialised torch.distributed process group, each rank passes
            its own shard of the data (``fisher_fast.distributed.shard(X, y)``, or a sampler
            that does not pad: ``DistributedSampler`` repeats samples to even out the shards),
            and the sums of squared gradients and the sample counts are all-reduced, so every
            rank returns the FIM over all shards (equal to the single-process one up to float
            summation order). Shards may be uneven or empty. ``None`` (default): reduce when a
            group with more than one rank is initialised; ``True``: require one; ``False``:
            this process's data only. Every rank must call diag_fim the same number of times;
            ``max_samples`` applies per rank; for ``fisher="mc"`` give each rank its own
            ``generator`` seed. Initialise the group with a timeout
            (``init_process_group(..., timeout=datetime.timedelta(minutes=30))``); an error on
            one rank is raised on every rank as a ``fisher_fast.distributed.RankError``.

    Returns:
        A :class:`DiagFIM` over the handled parameters, in ``named_parameters()`` order, in
        ``dtype``, on the model's device. Units: squared loss per squared parameter unit.
    """
    _check_choice("fisher", fisher, FISHER_KINDS)
    _check_choice("backend", backend, BACKENDS)
    _check_choice("on_unsupported", on_unsupported, ON_UNSUPPORTED)
    _check_choice("mode", mode, ("eval", "keep"))
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be at least 1, got {mc_samples}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}")
    if backend == "auto":
        # The compiled kernels measured faster than the PyTorch formulation on every benchmark
        # model (benchmarks/README.md); the PyTorch one is the fallback without the library.
        backend = "kernels" if _library.is_loaded() else "torch"
    elif backend == "kernels":
        _library.require()

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            "the model has no trainable parameters (requires_grad=True), so there is no FIM"
        )
    device = trainable[0][1].device

    reduce = should_reduce(distributed)
    with _model_mode(model, mode):
        _check_batchnorm(model)
        local = functools.partial(
            _local_sums,
            model,
            data,
            trainable,
            loss=loss,
            fisher=fisher,
            mc_samples=mc_samples,
            generator=generator,
            max_samples=max_samples,
            dtype=dtype,
            backend=backend,
            on_unsupported=on_unsupported,
            progress=progress and (not reduce or dist_env.is_main()),
            batch_size=batch_size,
        )
        if reduce:
            sizes = {n: p.numel() for n, p in trainable}
            sums: LocalSums | None = reduce_sums(local, sizes, dtype, device)
        else:
            sums = local()
    if sums is None:
        raise ValueError("data is empty: it yielded no samples")
    names, acc, n_seen = sums
    acc /= n_seen
    params = dict(trainable)
    meta = {
        "loss": loss if isinstance(loss, str) else getattr(loss, "__name__", "callable"),
        "mc_samples": mc_samples,
        "backend": backend,
        "fisher_fast_version": __version__,
    }
    return DiagFIM(
        acc,
        names,
        [tuple(params[n].shape) for n in names],
        n_samples=n_seen,
        fisher=fisher,
        meta=meta,
    )


def _local_sums(
    model: nn.Module,
    data: Any,
    trainable: list[tuple[str, nn.Parameter]],
    *,
    loss: LossSpec,
    fisher: str,
    mc_samples: int,
    generator: torch.Generator | None,
    max_samples: int | None,
    dtype: torch.dtype,
    backend: str,
    on_unsupported: str,
    progress: bool,
    batch_size: int,
) -> LocalSums | None:
    """The un-normalised accumulator over this process's data; None when it holds no sample."""
    device = trainable[0][1].device
    stream = iter(batches(data, batch_size))
    first = next(stream, None)
    if first is None:
        return None
    capture = Capture()
    for name, module in direct_owners(model):
        capture.add_owner(Owner(name, module, instrument=_instrument_of(find_rule(module))))
    processed: list[OwnerPlan] = []  # owners in the order their gradients arrived
    sums: list[_Sums] = []  # laid out once the first forward pass has shown what runs

    def adopt(called: set[nn.Module]) -> bool:
        laid_out, covered = _adopt_plan(
            plan_from_calls(model, called),
            trainable,
            capture,
            processed,
            dtype=dtype,
            backend=backend,
            on_unsupported=on_unsupported,
        )
        sums.append(laid_out)
        return covered

    n_seen = _accumulate(
        model,
        itertools.chain([first], stream),
        capture,
        device,
        adopt=adopt,
        check=lambda samples: _check_finite(sums[0].acc, sums[0].views, processed, samples),
        processed=processed,
        loss=loss,
        fisher=fisher,
        mc_samples=mc_samples,
        generator=generator,
        max_samples=max_samples,
        progress=progress,
        total=_expected_samples(data, max_samples),
    )
    return LocalSums(sums[0].names, sums[0].acc, n_seen) if n_seen else None


@dataclasses.dataclass
class _Sums:
    """The accumulator of the parameters in the result, and a view of it per parameter."""

    names: list[str]
    acc: torch.Tensor
    views: dict[str, torch.Tensor]


def _adopt_plan(
    plan: Plan,
    trainable: list[tuple[str, nn.Parameter]],
    capture: Capture,
    processed: list[OwnerPlan],
    *,
    dtype: torch.dtype,
    backend: str,
    on_unsupported: str,
) -> tuple[_Sums, bool]:
    """Lay out the accumulator for ``plan`` and give each planned owner its process.

    Returns the sums and whether the taps already in place cover the plan; when a parameter is
    handled through an ancestor that was not tapped, that ancestor is tapped now and the forward
    pass that led to the plan has to run again.
    """
    if plan.unsupported and on_unsupported == "error":
        raise ValueError(_unsupported_message(plan.unsupported))
    skipped = set(plan.unsupported) if on_unsupported == "skip" else set()
    params = dict(trainable)
    names = [n for n, _ in trainable if n not in skipped]
    device = trainable[0][1].device
    acc = torch.zeros(sum(params[n].numel() for n in names), dtype=dtype, device=device)
    views = dict(zip(names, _split(acc, [params[n] for n in names]), strict=True))
    missing = set(names) - _covered(plan.owners, skipped)
    if missing:
        raise ValueError(f"no module call handles the parameters {sorted(missing)}")
    covered = True
    for o in plan.owners:
        process = _processor(o, views, skipped, dtype, backend, capture, processed)
        if capture.owns(o.module):
            capture.set_process(o.module, process)
        else:
            capture.add_owner(Owner(o.name, o.module, process, _instrument_of(o.rule)))
            covered = False
    capture.ignore_unplanned()
    return _Sums(names, acc, views), covered


def _instrument_of(rule: Rule | None) -> Instrument | None:
    return getattr(rule, "instrument", None)


def _accumulate(
    model: nn.Module,
    stream: Iterator[tuple[Any, torch.Tensor | None]],
    capture: Capture,
    device: torch.device,
    *,
    adopt: Callable[[set[nn.Module]], bool],
    check: Callable[[str], None],
    processed: list[OwnerPlan],
    loss: LossSpec,
    fisher: str,
    mc_samples: int,
    generator: torch.Generator | None,
    max_samples: int | None,
    progress: bool,
    total: int | None,
) -> int:
    """Run the forward and backward passes over all batches; return the number of samples.

    The first batch's forward pass also records which modules run, and ``adopt`` makes the plan
    from them (returning False when that forward pass has to be repeated with more taps).
    """
    n_seen = 0
    planned = False
    with (
        capture.installed(),
        tqdm(total=total, unit="sample", desc="diag_fim", disable=not progress) as bar,
    ):
        for inputs, targets in stream:
            n = batch_size_of(inputs)
            if max_samples is not None:
                if n_seen >= max_samples:
                    break
                if n_seen + n > max_samples:
                    n = max_samples - n_seen
                    inputs, targets = take(inputs, targets, n)
            _check_devices((inputs, targets), device)
            with capture.batch():
                processed.clear()
                with torch.enable_grad():
                    if planned:
                        output = call_model(model, inputs)
                    else:
                        output = _planning_forward(model, inputs, capture, adopt)
                        planned = True
                    zeros = capture.zero_leaves()
                    objs = list(objectives(output, targets, loss, fisher, mc_samples, generator))
                    for j, objective in enumerate(objs):
                        if not torch.isfinite(objective):
                            raise FloatingPointError(
                                f"the loss is not finite ({objective.item()}) on the batch of samples "
                                f"{n_seen}..{n_seen + n - 1}; check the inputs and the model"
                            )
                        capture.begin_pass(j, len(objs))
                        torch.autograd.grad(
                            objective, zeros, retain_graph=j < len(objs) - 1, allow_unused=True
                        )
                        capture.end_pass()
                del output, objs
            check(f"{n_seen}..{n_seen + n - 1}")
            n_seen += n
            bar.update(n)
    return n_seen


def _planning_forward(
    model: nn.Module, inputs: Any, capture: Capture, adopt: Callable[[set[nn.Module]], bool]
) -> Any:
    """The first forward pass, which also decides the plan; run again if the plan needs taps
    that were not in place (a parameter used by an ancestor that owns none of its own)."""
    with recording_calls(model) as called:
        output = call_model(model, inputs)
    if adopt(called):
        return output
    del output
    capture.forget_calls()
    return call_model(model, inputs)


def _processor(
    plan: OwnerPlan,
    views: dict[str, torch.Tensor],
    skipped: set[str],
    dtype: torch.dtype,
    backend: str,
    capture: Capture,
    processed: list[OwnerPlan],
) -> Any:
    """The function that turns one module's calls into accumulator updates."""
    fallback_params = [p for p in plan.fallback_params if plan.global_name(p) not in skipped]
    fallback = make_fallback_rule(fallback_params, capture.paused) if fallback_params else None
    rule = plan.rule if any(plan.global_name(p) not in skipped for p in plan.rule_params) else None

    def add(local: str, value: torch.Tensor) -> None:
        name = plan.global_name(local)
        if name in views:
            views[name] += value.reshape(views[name].shape)
        elif name not in skipped and plan.module.get_parameter(local).requires_grad:
            raise KeyError(
                f"the rule for {type(plan.module).__name__} added {local!r}, which is not a parameter to fill"
            )

    def target(local: str) -> torch.Tensor | None:
        return views.get(plan.global_name(local))

    ctx = RuleContext(
        acc_dtype=dtype, backend=backend, add=add, target=target, passes=capture.passes
    )

    @torch.no_grad()
    def process(module: nn.Module, calls: list[Call]) -> None:
        if rule is not None:
            rule(module, calls, ctx)
        if fallback is not None:
            fallback(module, calls, ctx)
        processed.append(plan)

    return process


def _check_finite(
    acc: torch.Tensor, views: dict[str, torch.Tensor], processed: list[OwnerPlan], samples: str
) -> None:
    """Raise if the accumulator went non-finite, naming the first module (in backward order,
    i.e. nearest the loss) whose contribution did: the layer where the problem appears.
    One reduction per batch instead of a check per layer; a sum of nonnegative terms is finite
    exactly when every term is."""
    if bool(torch.isfinite(acc.sum())):
        return
    for plan in processed:
        names = [plan.global_name(p) for p in plan.rule_params + plan.fallback_params]
        if any(n in views and not bool(torch.isfinite(views[n]).all()) for n in names):
            raise FloatingPointError(
                f"the gradient at the output of {plan.name or 'the model'} ({type(plan.module).__name__}) "
                f"is not finite on samples {samples}: it overflowed or divided by zero there or in a "
                "layer after it (check the loss, the inputs and that layer)"
            )
    raise FloatingPointError(f"the Fisher accumulator became non-finite on samples {samples}")


def _covered(owners: list[OwnerPlan], skipped: set[str]) -> set[str]:
    return {o.global_name(p) for o in owners for p in o.rule_params + o.fallback_params} | skipped


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    views, start = [], 0
    for p in like:
        views.append(flat[start : start + p.numel()].view(p.shape))
        start += p.numel()
    return views


def _unsupported_message(unsupported: dict[str, str]) -> str:
    lines = [f"  {name}: {why}" for name, why in unsupported.items()]
    return (
        "these trainable parameters have no per-layer rule:\n" + "\n".join(lines) + "\n"
        "Pass on_unsupported='fallback' to compute them with torch.func per-sample gradients, "
        "on_unsupported='skip' to leave them out, or register a rule with fisher_fast.register_rule."
    )


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_batchnorm(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        ):
            raise ValueError(
                BATCHNORM_TRAINING_ERROR.format(name=f"'{name}' ({type(module).__name__})")
            )


def _check_devices(batch: Any, device: torch.device) -> None:
    found = devices_of(batch)
    if found and found != {device}:
        raise ValueError(
            f"the batch is on {', '.join(sorted(map(str, found)))} but the model's parameters are on "
            f"{device}; move the data to {device} (e.g. in the DataLoader loop) or the model to the data"
        )


def _expected_samples(data: Any, max_samples: int | None) -> int | None:
    total: int | None = None
    if isinstance(data, torch.Tensor):
        total = data.shape[0]
    elif isinstance(data, tuple) and data and isinstance(data[0], torch.Tensor):
        total = data[0].shape[0]
    elif hasattr(data, "dataset") and hasattr(data.dataset, "__len__"):
        total = len(data.dataset)
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    return total


@contextlib.contextmanager
def _model_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Put the model in eval mode for the duration (mode="eval") and restore every submodule."""
    before = {m: m.training for m in model.modules()}
    if mode == "eval":
        model.eval()
    try:
        yield
    finally:
        for m, training in before.items():
            m.training = training
