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
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from fisher_fast import _library
from fisher_fast import distributed as dist_env
from fisher_fast._version import __version__
from fisher_fast.fim import plan_cache, triton_products
from fisher_fast.fim.broadcast_params import (
    BroadcastParams,
    broadcast_candidates,
    lookup_candidates,
    without_traced,
)
from fisher_fast.fim.capture import Capture, Owner
from fisher_fast.fim.conform import conforms, rule_calls
from fisher_fast.fim.coupled_samples import (
    CoupledGradientsWarning,
    CoupledSamplesError,
    WholeModelPerSample,
    coupled_gradients,
    coupled_samples,
)
from fisher_fast.fim.data import batch_size_of, batches, call_model, devices_of, take
from fisher_fast.fim.expansion import Expansion, expandable, validated, verify, with_expanded_ids
from fisher_fast.fim.fallback import make_fallback_rule
from fisher_fast.fim.finite_guard import FiniteGuard
from fisher_fast.fim.hook_watch import HookWatch
from fisher_fast.fim.layout import Layouts, recording, select_samples, variant_indices
from fisher_fast.fim.linear_calls import LinearCalls
from fisher_fast.fim.losses import LossSpec, objectives
from fisher_fast.fim.module_state import KeptHistoryError, refuse_kept_history
from fisher_fast.fim.one_sample_norms import OneSampleNorms
from fisher_fast.fim.options import FimOptions, OutputSpec, select_output
from fisher_fast.fim.plan import OwnerPlan, Plan, direct_owners, make_plan
from fisher_fast.fim.products import compute_dtype
from fisher_fast.fim.reduce import LocalSums, reduce_sums, should_reduce
from fisher_fast.fim.result import DiagFIM
from fisher_fast.fim.rules import Call, RuleContext, RuleSpec, find_rule
from fisher_fast.fim.rules.norm import BATCHNORM_TRAINING_ERROR
from fisher_fast.fim.rules.tied import SharedWeight
from fisher_fast.fim.run_context import model_as_written
from fisher_fast.fim.unused import any_reached, graph_nodes, reached_parameters


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
    output: OutputSpec = None,
    distributed: bool | None = None,
    triton_precision: str | None = None,
    reuse_plan: bool = True,
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
        backend: ``"kernels"`` (compiled ops), ``"torch"`` (the same math in PyTorch),
            ``"triton"`` (per-sample products and convolutions, without im2col, in Triton
            kernels on tensor cores: CUDA and float32 only, TF32 when torch allows it for
            matrix products, see ``triton_precision``) or ``"auto"`` (kernels when the compiled
            library is loaded, else torch).
        on_unsupported: for parameters without a per-layer rule: ``"fallback"`` (torch.func
            per-sample gradients of that module), ``"error"`` (list them) or ``"skip"`` (leave
            them out of the result).
        progress: show a progress bar over samples (on rank 0 only when reducing).
        output: which part of the model's output holds the logits (or regression outputs):
            ``None`` (a tensor as is; ``.logits`` of a Hugging Face ``ModelOutput``; the
            ``"logits"`` key of a dict; the first element of a tuple), a key or attribute
            name, a tuple index, or a callable ``output -> tensor``.
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
        triton_precision: the triton backend's matrix products: ``"tf32"`` (fastest),
            ``"tf32x3"`` (three TF32 products per float32 one: error near float32's, on tensor
            cores), ``"ieee"`` (exact float32, no tensor cores), ``"bf16"`` (inputs rounded
            to bfloat16, float32 accumulation: relative error up to about 2^-6 per entry), or
            ``None`` (default: ``"tf32"``
            when ``torch.backends.cuda.matmul.allow_tf32`` is set, as the model's own products
            then are, else ``"ieee"``). Only for ``backend="triton"``.
        reuse_plan: start from the plan the last call on this model object ended with, when
            nothing it was made from has changed (same modules, parameters, hooks, training
            flags and rules): its first batch is then checked against that plan as every later
            batch of a call is, and planned anew if it does not conform, which saves the
            planning passes (fisher_fast/fim/plan_cache.py). ``False``: plan afresh.

    Returns:
        A :class:`DiagFIM` over the handled parameters, in ``named_parameters()`` order, in
        ``dtype``, on the model's device. Units: squared loss per squared parameter unit.
    """
    options = FimOptions(
        loss=loss,
        fisher=fisher,
        mc_samples=mc_samples,
        generator=generator,
        max_samples=max_samples,
        dtype=dtype,
        backend=backend,
        on_unsupported=on_unsupported,
        progress=progress,
        batch_size=batch_size,
        mode=mode,
        output=output,
        triton_precision=triton_precision,
        reuse_plan=reuse_plan,
    )
    if options.triton_precision is not None and options.backend != "triton":
        raise ValueError(
            "triton_precision sets the precision of backend='triton'; pass backend='triton' "
            "with it, or leave it None"
        )
    if options.backend == "auto":
        # The compiled kernels measured faster than the PyTorch formulation on every benchmark
        # model (benchmarks/README.md); the PyTorch one is the fallback without the library.
        options = dataclasses.replace(
            options, backend="kernels" if _library.is_loaded() else "torch"
        )
    elif options.backend == "kernels":
        _library.require()
    if options.backend == "triton":
        first = next(model.parameters(), None)
        triton_products.require(first.device if first is not None else torch.device("cpu"), dtype)
    with model_as_written():  # compiled code off, autocast off (run_context.py)
        return _diag_fim(model, data, options, distributed)


def _diag_fim(
    model: nn.Module, data: Any, options: FimOptions, distributed: bool | None
) -> DiagFIM:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            "the model has no trainable parameters (requires_grad=True), so there is no FIM"
        )
    device = trainable[0][1].device
    reduce = should_reduce(distributed)
    if reduce and not dist_env.is_main():
        options = dataclasses.replace(options, progress=False)
    paths: dict[str, str] = {}

    def local() -> LocalSums | None:
        accumulation = _Accumulation(model, trainable, options)
        made_from = plan_cache.signature(model)  # the run leaves it as it is
        kept = plan_cache.recall(model, made_from) if options.reuse_plan else None
        sums = accumulation.run(data, kept)
        paths.update(accumulation.paths)
        if accumulation.final is not None:
            plan_cache.keep(model, plan_cache.detach(model, made_from, *accumulation.final))
        return sums

    with _model_mode(model, options.mode):
        _check_batchnorm(model)
        if reduce:
            sizes = {n: p.numel() for n, p in trainable}
            sums: LocalSums | None = reduce_sums(local, sizes, options.dtype, device)
        else:
            sums = local()
    if sums is None:
        raise ValueError("data is empty: it yielded no samples")
    names, acc, n_seen = sums
    acc /= n_seen
    params = dict(trainable)
    loss = options.loss
    meta = {
        "loss": loss if isinstance(loss, str) else getattr(loss, "__name__", "callable"),
        "mc_samples": options.mc_samples,
        "backend": options.backend,
        "fisher_fast_version": __version__,
        "paths": {n: paths[n] for n in names if n in paths},
    }
    return DiagFIM(
        acc,
        names,
        [tuple(params[n].shape) for n in names],
        n_samples=n_seen,
        fisher=options.fisher,
        meta=meta,
    )


@dataclasses.dataclass
class _Sums:
    """The accumulator of the parameters in the result, and a view of it per parameter."""

    names: list[str]
    acc: torch.Tensor
    views: dict[str, torch.Tensor]


class _Accumulation:
    """One process's pass over its data, in three phases.

    * **plan** (first batch, and any batch whose calls leave the planned layouts): the batch
      runs recording every module call, then once more as a small variant batch (no taps); the
      layouts of the calls decide which module handles which parameter (plan.py), and the
      accumulator is laid out (once); a plan that taps new modules runs the batch again. Both
      runs first give broadcast Embedding outputs and broadcast parameters the sample axis
      (expansion.py, broadcast_params.py); when that is not verified exact, the batch is
      planned again without;
    * **step** (every batch): one forward pass with taps, checked against the plan's layouts
      (conform.py) and, when the plan has parameters no call used, for a graph that still
      does not reach them (unused.py); one backward pass per objective; the tapped modules'
      rules add their sums of squares as gradients arrive;
    * **check** (every batch): the labels lie within the model's classes, the losses and the
      accumulator are still finite (one reduction; finite_guard.py reads the flags every few
      batches off the CPU, so no batch waits on them).
    """

    def __init__(
        self, model: nn.Module, trainable: list[tuple[str, nn.Parameter]], options: FimOptions
    ) -> None:
        self.model = model
        self.trainable = trainable
        self.options = options
        self.device = trainable[0][1].device
        self.capture = Capture()
        for name, module in direct_owners(model):
            spec = find_rule(module)
            instrument = spec.instrument if spec is not None else None
            self.capture.add_owner(Owner(name, module, instrument=instrument))
        self.processed: list[OwnerPlan] = []  # owners in the order their gradients arrived
        self.guard = FiniteGuard(self.device)
        self.sums: _Sums | None = None
        self.planned: list[OwnerPlan] = []  # the owners of the plan in use
        self.paths: dict[str, str] = {}
        self.unused: list[nn.Parameter] = []  # planned as zero: checked on every batch
        self.expansion = Expansion()
        self.broadcast = BroadcastParams(model, self.capture.tap_tensor)
        self.linear_calls = LinearCalls(model)
        self.one_sample_norms = OneSampleNorms(model)
        self.hooks = HookWatch(model)
        self.plan: Plan | None = None  # the plan in use
        # at the end of the data: the plan, expanded Embeddings and broadcast parameters in use
        self.final: tuple[Plan, set[nn.Module], dict[str, tuple[nn.Module, str]]] | None = None

    # -- plan ----------------------------------------------------------------------------------
    def _planning_forward(self, inputs: Any, n: int) -> Any:
        """The first batch's forward pass, which also decides the plan. Every module is tapped
        for it, so that the plan's owners already have their calls; it runs again only when an
        instrumented forward turns out not to be used (see ``Capture.set_process``), or when
        the sample axis given to broadcast embeddings and parameters is not verified exact or
        makes the model fail: then without the traced parameters, then without any."""
        index = variant_indices(n)
        for name, module in self.model.named_modules():  # any may be the plan's: tap them all
            if not self.capture.owns(module):
                self.capture.add_owner(Owner(name, module))
        embeddings, params = expandable(self.model), broadcast_candidates(self.model)
        output, plan = self._plan_attempts(inputs, n, index, embeddings, params)
        looked_up = lookup_candidates(self.model, plan)
        if looked_up:  # planned again with those traced too (kept only where verified)
            del output
            output, plan = self._plan_attempts(inputs, n, index, embeddings, params, looked_up)
        if self._adopt(plan):
            return output
        del output
        self.capture.forget_calls()
        self.broadcast.forget()
        with self._samples(n):
            return call_model(self.model, inputs)

    def _plan_attempts(
        self,
        inputs: Any,
        n: int,
        index: list[int],
        embeddings: list[nn.Module],
        params: dict[str, tuple[nn.Module, str]],
        looked_up: dict[str, tuple[nn.Module, str]] | None = None,
    ) -> tuple[Any, Plan]:
        """The first batch's forward pass and plan with ``embeddings`` expanded and ``params``
        given the sample axis at their use (first with ``looked_up`` as well, when given); each
        also with those of a leading axis of 1 traced rather than expanded whole (Swin V2's
        logit scale with one head, (1, 1, 1)); then without the traced parameters, then without
        any, while the sample axis given is not verified exact or makes the model fail."""

        def both_ways(candidates: dict[str, tuple[nn.Module, str]]) -> list[Any]:
            expanded = not without_traced(candidates)  # then the two are the same
            return [(embeddings, candidates, True), (embeddings, candidates, expanded)]

        attempts = both_ways(params | looked_up) if looked_up else []
        attempts += [*both_ways(params), (embeddings, without_traced(params), True), ([], {}, True)]
        attempts = [a for k, a in enumerate(attempts) if a not in attempts[:k]]
        planned = None
        for k, (modules, candidates, expands_whole) in enumerate(attempts):
            self.capture.forget_calls()
            self.expansion.arm(modules)
            self.broadcast.arm(candidates, expands_whole)
            try:
                planned = self._plan_batch(inputs, n, index)
            except (KeptHistoryError, CoupledSamplesError):
                raise
            except Exception:
                # a cache the failed pass filled (HF LeViT's attention biases, expanded with
                # one head) would fail every later attempt: refused by name instead
                refuse_kept_history(self.model)
                if k == len(attempts) - 1:
                    raise
            if planned is not None:
                return planned
        raise AssertionError("the last attempt expands nothing, so it is not refused")

    def _resume(self, kept: plan_cache.KeptPlan) -> None:
        """Start from the plan a previous call on this model ended with (plan_cache.py): the
        first batch is then checked against it as every later batch is, and planned anew when
        it does not conform."""
        plan, expanded, broadcast = kept.attach(self.model)
        self.linear_calls.arm(plan.linear_calls)
        for o in plan.owners:
            if not self.capture.owns(o.module):
                self.capture.add_owner(Owner(o.name, o.module))
        self.expansion.arm(expanded)
        self.broadcast.arm(broadcast, plan.expands_whole)
        self._adopt(plan)  # no forward has run yet, so an instrument it drops costs nothing
        self.capture.keep_only({o.module for o in self.planned})

    @contextlib.contextmanager
    def _samples(self, n: int) -> Iterator[None]:
        """The engine's own forward passes of a batch of n samples: broadcast Embedding outputs
        and broadcast parameters get the sample axis (when planned so), and a batch of one its
        norms' contiguous output gradients (one_sample_norms.py)."""
        with (
            self.expansion.samples(n),
            self.broadcast.samples(n),
            self.one_sample_norms.samples(n),
        ):
            yield

    def _plan_batch(self, inputs: Any, n: int, index: list[int]) -> tuple[Any, Plan] | None:
        """The batch's forward pass and its plan; None when an Embedding output or a parameter
        was expanded (expansion.py, broadcast_params.py) and that is not verified exact, or
        the samples' outputs or gradients depend on each other with it (the caller plans
        again without). Without any, a model whose samples' outputs depend on each other is
        refused, and one whose gradients alone do is planned whole per sample
        (coupled_samples.py)."""
        expansion, broadcast = self.expansion, self.broadcast
        expansion.take_seen()
        broadcast.forget()
        self.linear_calls.disarm()  # found again below
        with (
            recording(self.model, track_uses=True) as real,
            self._samples(n),
            self.linear_calls.finding(real.stack) as routes,
        ):
            output = call_model(self.model, inputs)
        refuse_kept_history(self.model)  # a cache its forward filled (module_state.py)
        self.linear_calls.arm(routes)  # the same calls routed in every later pass
        broadcast.end(output)
        real_seen = expansion.take_seen()
        real_params = broadcast.seen()
        if not expansion.used(real_seen):
            expansion.disarm()
        broadcast.forget()
        try:
            with (
                self.capture.paused(),
                recording(self.model) as variant,
                self._samples(len(index)),
            ):
                broadcast.end(call_model(self.model, select_samples(inputs, n, index)))
        except Exception as error:
            if expansion.modules or broadcast.names:
                raise
            raise RuntimeError(
                f"diag_fim runs {len(index)} of the first batch's samples as a batch of their "
                "own to find where each module call holds its samples, and the model failed on "
                f"it ({type(error).__name__}: {error}); every input tensor whose first axis has "
                "the batch's number of samples is split per sample, so give inputs shared by "
                "all samples another first axis (e.g. 1)"
            ) from error
        loss_input = select_output(output, self.options.output)
        coupled = coupled_samples(self.model, real, variant, loss_input, n, index)
        if coupled is not None:
            if expansion.modules or broadcast.names:  # perhaps by what diag_fim expanded
                return None
            raise coupled
        loss_graph = graph_nodes(loss_input)
        layouts = Layouts(real, variant, n, index, loss_graph)
        expanded: set[nn.Module] = set()
        if expansion.modules:
            chosen = validated(real_seen, expansion.take_seen(), layouts.__getitem__, n)
            if chosen is None:
                return None
            expanded = chosen
            expansion.keep_only(expanded)  # empty: only one sample's ids, expanded to themselves
        seen_params = frozenset(  # each use as many rows per sample in both batches
            name for name, blocks in broadcast.seen().items() if real_params.get(name) == blocks
        )
        reached = frozenset(reached_parameters(output))
        replaced = frozenset(self.hooks.changed)
        plan = make_plan(
            self.model, real, layouts, frozenset(expanded), seen_params, reached, replaced,
            contained=seen_params & frozenset(broadcast.contained()),
        )  # fmt: skip
        plan.linear_calls = routes
        plan.expands_whole = broadcast.expands_whole
        if n > 1:  # one sample alone cannot be credited with another's gradient
            owners = [(o.name, o.module) for o in plan.owners]
            leak = coupled_gradients(self.model, variant, layouts.__getitem__, owners)
            if leak is not None:
                if expansion.modules or broadcast.names:  # perhaps by what diag_fim expanded
                    return None
                warnings.warn(
                    f"{leak}, so every parameter's per-sample gradient is computed by re-running "
                    "the whole model one sample at a time (exact, slower)",
                    CoupledGradientsWarning,
                    stacklevel=2,
                )
                whole = WholeModelPerSample(layouts, self.model, leak)
                plan = make_plan(self.model, real, whole, reached=reached, replaced=replaced)
                plan.linear_calls = routes
                broadcast.forget()
                return output, plan
        why = None
        if expanded or plan.broadcast:
            params = [
                (*broadcast.checks(name), self.model.get_parameter(name)) for name in plan.broadcast
            ]
            why = verify(
                self.model,
                inputs,
                n,
                index,
                variant,
                layouts.__getitem__,
                [o.module for o in plan.owners],
                self.capture.paused,
                lambda: self.one_sample_norms.samples(1),
                params,
            )
        broadcast.forget()  # the checks' gradients reached the collectors too
        return None if why is not None else (output, plan)

    def _adopt(self, plan: Plan) -> bool:
        """Lay out the accumulator for ``plan`` and give each planned owner its process.

        Every module was tapped for the planning pass; returns False when a module's
        instrumented forward is not used by the plan, so the forward pass has to run again.
        """
        mode = self.options.on_unsupported
        if plan.impossible and mode != "skip":
            lines = "\n".join(f"  {name}: {why}" for name, why in plan.impossible.items())
            raise ValueError(
                "diag_fim cannot compute these parameters exactly:\n" + lines + "\n"
                "Pass on_unsupported='skip' to leave them out, or register a rule for the "
                "module that uses them (fisher_fast.register_rule)."
            )
        if plan.unsupported and mode == "error":
            raise ValueError(_unsupported_message(plan.unsupported))
        skipped: set[str] = set()
        if mode == "skip":
            skipped = set(plan.unsupported) | set(plan.impossible)
            if skipped:
                warnings.warn(
                    f"on_unsupported='skip' leaves {len(skipped)} trainable parameters out of "
                    f"the FIM: {', '.join(sorted(skipped)[:8])}{' ...' if len(skipped) > 8 else ''}",
                    stacklevel=5,
                )
        params = dict(self.trainable)
        names = [n for n, _ in self.trainable if n not in skipped]
        if not names:
            raise ValueError(
                "every trainable parameter was left out (on_unsupported='skip' and no rule "
                "applies), so the FIM would be empty; use on_unsupported='fallback'"
            )
        if self.sums is not None:  # a new plan for a batch of other layouts: same accumulator
            if names != self.sums.names:
                raise RuntimeError(
                    "this batch's layouts leave out other parameters than the first batch's "
                    f"({sorted(set(names) ^ set(self.sums.names))[:5]}); use "
                    "on_unsupported='fallback', or compute the FIM of each kind of batch apart"
                )
            acc, views = self.sums.acc, self.sums.views
        else:
            acc = torch.zeros(
                sum(params[n].numel() for n in names), dtype=self.options.dtype, device=self.device
            )
            views = dict(zip(names, _split(acc, [params[n] for n in names]), strict=True))
        self.capture.reset_processes()
        self.planned = []
        missing = set(names) - set(plan.paths)
        if missing:
            raise AssertionError(f"the plan leaves out {sorted(missing)}")  # plan.py's contract
        self.paths = {n: plan.paths[n] for n in names}
        self.unused = [params[n] for n in plan.unused if n in params]
        work = compute_dtype(self.options.dtype)
        shared: dict[nn.Module, SharedWeight] = {}
        for tie in plan.ties:
            group = SharedWeight(views[tie.name], work, tie.embeddings, tie.head)
            shared |= {m: group for m in (*tie.embeddings, tie.head) if m is not None}
        covered = True
        for o in plan.owners:
            process = self._processor(o, views, skipped, shared.get(o.module))
            self.planned.append(o)
            instrument = o.rule.instrument if o.rule is not None else None
            covered &= self.capture.set_process(o.module, process, instrument)
        covered &= self.capture.ignore_unplanned()
        acc_dtype = self.options.dtype

        def add_squares(name: str, grad: torch.Tensor) -> None:
            """A broadcast parameter's per-sample gradients (N, ...): their squares' sum."""
            views[name] += grad.to(work).square().sum(0, dtype=acc_dtype).reshape(views[name].shape)

        self.broadcast.keep_only(set(plan.broadcast) & set(names), add_squares)
        self.sums = _Sums(names, acc, views)
        self.plan = plan
        return covered

    def _processor(
        self,
        plan: OwnerPlan,
        views: dict[str, torch.Tensor],
        skipped: set[str],
        shared: SharedWeight | None,
    ) -> Any:
        """The function that turns one module's calls into accumulator updates (``shared``: the
        collector of the modules sharing its weight, see rules/tied.py)."""
        fallback_params = [p for p in plan.fallback_params if plan.global_name(p) not in skipped]
        fallback = (
            make_fallback_rule(plan.name, fallback_params, plan.layouts, self.capture.paused)
            if fallback_params
            else None
        )
        used = any(plan.global_name(p) not in skipped for p in plan.rule_params)
        rule = plan.rule if used else None
        passes = self.capture.passes

        owned = {*plan.rule_params, *plan.fallback_params}

        def add(local: str, value: torch.Tensor) -> None:
            name = plan.global_name(local)
            if local not in owned:  # another path fills it (a parameter also used elsewhere)
                plan.module.get_parameter(local)  # a name that is no parameter is still an error
                return
            if name in views:
                views[name] += value.reshape(views[name].shape)
            elif name not in skipped and plan.module.get_parameter(local).requires_grad:
                raise KeyError(
                    f"the rule for {type(plan.module).__name__} added {local!r}, which is not a "
                    "parameter to fill"
                )

        def target(local: str) -> torch.Tensor | None:
            return views.get(plan.global_name(local)) if local in owned else None

        o = self.options
        ctx = RuleContext(
            acc_dtype=o.dtype,
            backend=o.backend,
            add=add,
            target=target,
            passes=passes,
            triton_precision=o.triton_precision,
        )

        @torch.no_grad()
        def process(module: nn.Module, calls: list[Call]) -> None:
            if rule is not None:
                given = with_expanded_ids(calls, passes.n_samples) if plan.expanded else calls
                as_rule = rule_calls(rule, given, plan.layouts, passes.n_samples)
                if shared is None:
                    rule.compute(module, as_rule, ctx)
                else:
                    shared.arrive(module, as_rule, passes.n_samples, _applied(rule, module, ctx))
            if fallback is not None:
                fallback(module, calls, ctx)
            self.processed.append(plan)

        return process

    # -- step and check ------------------------------------------------------------------------
    def run(self, data: Any, kept: plan_cache.KeptPlan | None = None) -> LocalSums | None:
        """Accumulate over all batches; None when the data holds no sample. ``kept``: a plan
        of an earlier call on this model to start from (plan_cache.py)."""
        o = self.options
        n_seen = 0
        total = _expected_samples(data, o.max_samples)
        with (
            self.hooks.installed(),  # first: its hooks go around the user's, before the taps
            self.capture.installed(),
            self.expansion.installed(),
            self.broadcast.installed(),
            self.linear_calls.installed(),
            self.one_sample_norms.installed(),
            tqdm(total=total, unit="sample", desc="diag_fim", disable=not o.progress) as bar,
        ):
            refuse_kept_history(self.model)  # kept by an earlier call of the user's
            if kept is not None:
                self._resume(kept)
            for inputs, targets in batches(data, o.batch_size):
                n = batch_size_of(inputs)
                if o.max_samples is not None:
                    if n_seen >= o.max_samples:
                        break
                    if n_seen + n > o.max_samples:
                        n = o.max_samples - n_seen
                        inputs, targets = take(inputs, targets, n)
                if n == 0:
                    continue
                _check_devices((inputs, targets), self.device)
                samples = f"{n_seen}..{n_seen + n - 1}"
                self._step(inputs, targets, n, samples)
                assert self.sums is not None
                self.guard.batch(self.sums.acc, self.sums.views, self.processed, samples)
                n_seen += n
                bar.update(n)
            if n_seen and self.plan is not None:
                self.final = (self.plan, self.expansion.modules, dict(self.broadcast.armed))
        if not n_seen:
            return None
        assert self.sums is not None
        self.guard.flush(self.sums.views)
        return LocalSums(self.sums.names, self.sums.acc, n_seen)

    def _step(self, inputs: Any, targets: torch.Tensor | None, n: int, samples: str) -> None:
        o = self.options
        capture = self.capture
        capture.passes.n_samples = n
        with capture.batch():
            self.processed.clear()
            with torch.enable_grad(), _explained_dtype_errors(inputs, self.trainable):
                planning = self.sums is None
                if planning:
                    raw = self._planning_forward(inputs, n)
                else:
                    self.broadcast.forget()
                    with self._samples(n):
                        raw = call_model(self.model, inputs)
                    self.broadcast.end(raw)
                    if (
                        not self._conforms(n)
                        or not self.broadcast.complete()
                        or any_reached(raw, self.unused)
                    ):
                        del raw
                        capture.forget_calls()
                        raw = self._planning_forward(inputs, n)
                        planning = True
                output = select_output(raw, o.output)
                zeros = capture.zero_leaves()
                objs = list(
                    objectives(
                        output,
                        targets,
                        o.loss,
                        o.fisher,
                        o.mc_samples,
                        o.generator,
                        labels_to=lambda check: self.guard.labels(check, samples),
                    )
                )
                for j, objective in enumerate(objs):
                    self.guard.loss(objective, samples)
                    capture.begin_pass(j, len(objs))
                    torch.autograd.grad(
                        objective, zeros, retain_graph=j < len(objs) - 1, allow_unused=True
                    )
                    capture.end_pass()
                    self.broadcast.end_pass()
            del raw, output, objs
        if planning:
            capture.keep_only({o.module for o in self.planned})

    def _conforms(self, n: int) -> bool:
        """Whether this batch's calls have the layouts the plan was made for, and no forward
        hook replaced an output the plan did not know of (else it gets a plan of its own:
        another sequence length changes the shape of shared inputs)."""
        assert self.plan is not None
        return self.hooks.changed <= self.plan.replaced and all(
            conforms(o.module, self.capture.calls.get(o.module, []), o.layouts, n)
            for o in self.planned
        )


def _applied(rule: RuleSpec, module: nn.Module, ctx: RuleContext) -> Callable[[list[Call]], None]:
    """``rule`` on ``module``'s behalf, given its calls."""
    return lambda calls: rule.compute(module, calls, ctx)


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
def _explained_dtype_errors(
    inputs: Any, trainable: list[tuple[str, nn.Parameter]]
) -> Iterator[None]:
    """Turn torch's dtype mismatch error on a forward pass into one that names both dtypes and
    the fix, when the inputs' floating dtype differs from the parameters' (any other error, or
    a model that converts its inputs itself, passes through unchanged)."""
    try:
        yield
    except RuntimeError as error:
        params = sorted({str(p.dtype) for _, p in trainable if p.is_floating_point()})
        found = sorted(
            {
                str(v.dtype)
                for v in tree_leaves(inputs)
                if isinstance(v, torch.Tensor) and v.is_floating_point()
            }
        )
        if "dtype" not in str(error) or not params or not found or found == params:
            raise
        names = " and ".join(p.removeprefix("torch.") for p in params)
        given = " and ".join(f.removeprefix("torch.") for f in found)
        raise TypeError(
            f"the model's parameters are {names} but the inputs are {given}; convert one, e.g. "
            "model.float() or x.double() (torch: "
            f"{str(error).splitlines()[0]})"
        ) from error


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
