"""Per-layer rules: how to get the sum of squared per-sample gradients of one module's parameters.

A rule is called once per backward pass with every call of its module in the forward pass (a
module used twice has two calls; its per-sample gradient is the *sum* over calls, squared after
summing). It adds ``sum_n (dL_n/dθ)^2`` for each parameter to the context's accumulator.

Register a rule for your own layer with::

    @fisher_fast.register_rule(MyLayer)
    def my_rule(module: MyLayer, calls: list[Call], ctx: RuleContext) -> None:
        ctx.add("weight", ...)  # (shape of module.weight), sum over samples of squares
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fisher_fast.fim.layout import Broadcast, CallLayout, Sampled, Unknown
from fisher_fast.fim.products import compute_dtype, square_sum
from fisher_fast.fim.rules.lookalike import reproduces


@dataclass
class Call:
    """One call of a module in the forward pass: its inputs and the gradients at its outputs.

    ``grads[k]`` is dL/d(output tensor k) for the k-th floating-point tensor in the flattened
    output (None until the backward pass delivers it; ``output_meta`` gives shape and dtype).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output_meta: list[tuple[torch.Size, torch.dtype, torch.device]] = field(default_factory=list)
    grads: list[torch.Tensor | None] = field(default_factory=list)
    # Intermediate tensors kept by an instrumented forward (see ``Instrument``), or by a rule
    # between the backward passes of one batch; dropped with the call at the end of the batch.
    saved: dict[str, Any] = field(default_factory=dict)

    def grad(self, k: int = 0) -> torch.Tensor:
        """Gradient at output k; zeros when that output did not reach the loss."""
        g = self.grads[k]
        if g is None:
            shape, dtype, device = self.output_meta[k]
            return torch.zeros(shape, dtype=dtype, device=device)
        return g

    def release_inputs(self) -> None:
        """Drop the inputs and saved tensors (no rule needs them again in this batch); the
        gradients still arrive."""
        self.args, self.kwargs, self.saved = (), {}, {}

    def forget(self) -> None:
        """Drop every tensor this call holds (the batch's graph may still refer to the Call)."""
        self.release_inputs()
        self.grads = []

    @property
    def input(self) -> torch.Tensor:
        """The first positional input (the layer input for every built-in layer)."""
        return self.args[0]


@dataclass
class Passes:
    """Where the current backward pass stands among the batch's passes: one per objective (one
    for the empirical kind, ``mc_samples`` for "mc", one per class for "exact"). Rules are called
    once per pass; all passes share the batch's forward pass, hence every module's inputs."""

    count: int = 1
    index: int = 0
    n_samples: int = 0  # samples in the current batch

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


@dataclass
class RuleContext:
    """What a rule needs besides its module and calls."""

    acc_dtype: torch.dtype
    backend: str
    add: Callable[[str, torch.Tensor], None]  # (local parameter name, sum of squares)
    # (local parameter name) -> the accumulator's view for that parameter, to add to in place
    # (saves a temporary the size of the parameter), or None when it is not accumulated.
    target: Callable[[str], torch.Tensor | None]
    passes: Passes = field(default_factory=Passes)  # shared by every rule, set by diag_fim
    triton_precision: str | None = None  # the triton backend's products (triton_products.py)

    @property
    def n_samples(self) -> int:
        """Number of samples in the current batch."""
        return self.passes.n_samples

    @property
    def work_dtype(self) -> torch.dtype:
        """dtype for per-sample arithmetic (float32, or float64 when accumulating in float64)."""
        return compute_dtype(self.acc_dtype)

    def square_sum(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, O, I) sum over samples of (g[n,b]^T x[n,b])^2 for g (N,B,T,O), x (N,B,T,I)."""
        return square_sum(
            g, x, self.acc_dtype, self.backend, triton_precision=self.triton_precision
        )

    def add_bias(self, name: str, per_sample: torch.Tensor) -> None:
        """Add sum over samples of squares of a (N, *shape) per-sample gradient."""
        self.add(name, per_sample.to(self.work_dtype).square().sum(0, dtype=self.acc_dtype))


Rule = Callable[[Any, list[Call], RuleContext], None]

# An instrumented forward: ``instrument(module, call, tap, *args, **kwargs)`` computes the
# module's output itself, passing intermediate tensors through ``tap`` (which returns the tensor
# to use and makes its gradient arrive in ``call.grads`` in tap order), and returns the output;
# or returns None to let the module's own forward run (its outputs are then tapped as usual).
# A rule that carries one gets those gradients without recomputing.
Instrument = Callable[..., Any]

# Which call layouts (fisher_fast/fim/layout.py) a rule computes exactly:
# * "sample_first": every tensor the call sees or returns has its samples on axis 0, one entry
#   per sample, or no sample axis at all (the default: safe for any rule);
# * "positionwise": the layer treats every position alike (Linear, Embedding, LayerNorm), so the
#   input and output may hold the samples on any one axis, k entries per sample (sequence-first,
#   samples flattened with windows or tokens); the rule then gets them moved to (N, k, ...);
# * a callable ``accepts(module, layout) -> bool`` for anything more specific.
LayoutRequirement = str | Callable[[Any, CallLayout], bool]


@dataclass(frozen=True)
class RuleSpec:
    """A registered rule: what it computes and what it needs.

    ``supports(module)``: configurations it handles (others get the generic path);
    ``extra_params``: dotted names of descendants' parameters the module uses without calling
    their owner (nn.MultiheadAttention's ``out_proj``), which the rule also fills;
    ``instrument``: an optional instrumented forward (see ``Instrument``);
    ``example(module)``: the shape of an input on which a subclass with a forward of its own is
    checked against the registered class's forward (lookalike.py); without it such subclasses
    get the generic path.
    """

    compute: Rule
    layout: LayoutRequirement = "sample_first"
    supports: Callable[[Any], bool] | None = None
    extra_params: tuple[str, ...] = ()
    instrument: Instrument | None = None
    example: Callable[[Any], tuple[int, ...]] | None = None

    @property
    def name(self) -> str:
        return getattr(self.compute, "__name__", "rule").strip("_")

    def accepts(self, module: nn.Module, layout: CallLayout | Unknown) -> bool:
        """Whether this rule is exact on a call with this layout."""
        if isinstance(layout, Unknown):
            return False
        if callable(self.layout):
            return bool(self.layout(module, layout))
        if self.layout == "positionwise":
            common = layout.uniform()
            return common is not None and all(
                v is None or isinstance(v, Broadcast) or v == common for v in layout.inputs
            )
        return sample_first(layout)


def sample_first(layout: CallLayout) -> bool:
    """Every tensor with samples on axis 0 (one entry each) or none; input and outputs sampled."""
    first = Sampled(0, 1)
    leaves = layout.inputs + layout.outputs
    return (
        layout.primary == first
        and bool(layout.outputs)
        and all(v == first for v in layout.outputs)
        and all(v is None or isinstance(v, Broadcast) or v == first for v in leaves)
    )


_RULES: dict[type[nn.Module], RuleSpec] = {}
_generation = 0  # counts registrations, so that a plan made before one is not reused


def registry_generation() -> int:
    """How many rules have been registered so far (plan_cache.py compares it)."""
    return _generation


def register_rule(
    *module_types: type[nn.Module],
    layout: LayoutRequirement = "sample_first",
    supports: Callable[[Any], bool] | None = None,
    extra_params: tuple[str, ...] = (),
    instrument: Instrument | None = None,
    example: Callable[[Any], tuple[int, ...]] | None = None,
) -> Callable[[Rule], Rule]:
    """Decorator registering a rule for exact module classes (subclasses with their own forward
    must register too, unless ``example`` lets them be verified). The keyword arguments are
    those of :class:`RuleSpec`; the default ``layout="sample_first"`` means the rule is only
    used on calls whose samples are on axis 0."""
    if layout not in ("sample_first", "positionwise") and not callable(layout):
        raise ValueError(
            f"layout must be 'sample_first', 'positionwise' or a callable, got {layout!r}"
        )

    def decorate(rule: Rule) -> Rule:
        global _generation
        spec = RuleSpec(rule, layout, supports, tuple(extra_params), instrument, example)
        for cls in module_types:
            _RULES[cls] = spec
        _generation += 1
        return rule

    return decorate


_MATCHED: list[tuple[Callable[[nn.Module], bool], RuleSpec]] = []


def register_matched_rule(matches: Callable[[nn.Module], bool], spec: RuleSpec) -> None:
    """A rule for modules of other libraries, recognised by ``matches(module)`` instead of by
    class (so that fisher_fast does not import those libraries); ``matches`` must establish
    that the module computes what the rule assumes."""
    global _generation
    _MATCHED.append((matches, spec))
    _generation += 1


def rule_of_class(cls: type[nn.Module]) -> RuleSpec | None:
    """The rule registered for ``cls`` itself (None when none is)."""
    return _RULES.get(cls)


def find_rule(module: nn.Module) -> RuleSpec | None:
    """The rule for this module's class; a subclass inherits it if it keeps forward(), or if its
    own forward is verified to compute the same (``RuleSpec.example``, eval mode only: a check
    in training mode could change running statistics); else the first matched rule that
    recognises the module."""
    cls = type(module)
    spec = _RULES.get(cls)
    if spec is None:
        for base in cls.__mro__[1:]:
            if base in _RULES:
                if cls.forward is base.forward or _same_as(module, base, _RULES[base]):
                    spec = _RULES[base]
                break
    if spec is None:
        spec = next((s for matches, s in _MATCHED if matches(module)), None)
    if spec is not None and spec.supports is not None and not spec.supports(module):
        return None
    if spec is not None and not _instance_forward_agrees(module, spec):
        return None
    return spec


INSTRUMENTED = "_fisher_fast_instrumented"  # marks diag_fim's own instance forwards (capture.py)


def _instance_forward_agrees(module: nn.Module, spec: RuleSpec) -> bool:
    """True unless ``module.forward`` was replaced on the instance (monkeypatched, or wrapped
    by a library that moves inputs between devices) by something not verified to compute its
    class's forward: the rule models the class's forward, and the module's calls run the
    instance's. Without ``RuleSpec.example``, or in training mode, it cannot be verified."""
    own = module.__dict__.get("forward")
    if own is None or getattr(own, INSTRUMENTED, False):
        return True
    cls = type(module)
    return _verified(
        module, spec, f"instance forward {id(own)}", lambda x: cls.forward(module, x), own
    )


def _same_as(module: nn.Module, base: type[nn.Module], spec: RuleSpec) -> bool:
    """Whether ``module`` (a subclass of ``base`` with its own forward) computes base.forward."""
    return _verified(module, spec, f"as {base.__name__}", lambda x: base.forward(module, x))


def _verified(
    module: nn.Module,
    spec: RuleSpec,
    check: str,
    reference: Callable[[torch.Tensor], torch.Tensor],
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> bool:
    """Whether ``forward`` (by default the module's class's) reproduces ``reference`` on the
    rule's example input (lookalike.reproduces); False without ``RuleSpec.example`` or in
    training mode (a check could change running statistics)."""
    if spec.example is None or module.training:
        return False
    return reproduces(module, check, reference, spec.example(module), forward)


def joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(parts, dim)``, except that a single part (a module called once, the common
    case) is returned as it is instead of copied: a language model's head gradient is
    N × T × vocabulary, and copying it costs more than the rule's own products."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def sum_over_calls(calls: list[Call], per_call: Callable[[Call], torch.Tensor]) -> torch.Tensor:
    """Sum of a per-sample quantity over all calls of a module (weight sharing)."""
    total = per_call(calls[0])
    for call in calls[1:]:
        total = total + per_call(call)
    return total


# Importing the rule modules registers them.
from fisher_fast.fim.rules import (  # noqa: E402, F401
    attention,
    conv,
    embedding,
    experts,
    linear,
    norm,
    norm_variants,
    recurrent,
    rms_norm,
    router,
    scaled_embedding,
    standardised_conv,
    transposed_linear,
)
