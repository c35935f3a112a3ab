"""Diagonal Fisher baselines: pure PyTorch, BackPACK, Opacus, nngeometry and fisher_fast.

Every method has the signature ``method(model, inputs, targets) -> Tensor`` and returns the diagonal
as one flat float32 tensor over the trainable parameters in ``model.named_parameters()`` order, so
the outputs of all methods can be compared element by element. The loss is cross-entropy on
logits; N is the number of samples. ``METHODS`` records which quantity each method computes:

* ``empirical``: ``(1/N) Σ_i (∇θ L_i)²`` with the given targets (paper eq. 2).
* ``exact``: the exact true Fisher ``(1/N) Σ_i Σ_c p_ic (∇θ log p_ic)²`` (labels from the model).
* ``batch-grad²``: the square of the mean mini-batch gradient; ``floor`` only, a timing reference
  (one forward and one backward pass), not a Fisher.

A method that cannot handle a model raises `Unsupported` with a short reason; one whose library is
not importable raises `NotAvailable`. Methods undo what they attach to the model (hooks, wrapper
attributes, ``.grad``), so one model can be passed to several methods in a row.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

VMAP_CHUNK = 32  # samples per torch.func.vmap call: bounds the N × P per-sample gradient tensor


class Unsupported(RuntimeError):
    """The method cannot compute the diagonal Fisher of this model (e.g. an unsupported layer)."""


class NotAvailable(RuntimeError):
    """The library behind the method is not installed or does not provide the needed function."""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters in ``named_parameters`` order: the layout of every returned diagonal."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).float() for t in tensors])


def _ordered(model: nn.Module, by_name: dict[str, torch.Tensor]) -> torch.Tensor:
    """Flatten a name → diagonal mapping in ``trainable`` order; missing names are unsupported."""
    missing = [name for name, _ in trainable(model) if name not in by_name]
    if missing:
        raise Unsupported(f"no diagonal for {_owner_types(model, missing)} parameters")
    return _flat([by_name[name] for name, _ in trainable(model)])


def _owner_types(model: nn.Module, names: list[str]) -> str:
    """Class names of the modules owning the named parameters, e.g. ``LayerNorm, Linear``."""
    owners = [type(model.get_submodule(name.rpartition(".")[0])).__name__ for name in names]
    return ", ".join(dict.fromkeys(owners))


def _require(module_name: str) -> ModuleType:
    """Import a peer library, turning an import failure into `NotAvailable`."""
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise NotAvailable(f"{module_name} not importable: {err}") from err


def _clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _squares_of_per_sample_grads(
    model: nn.Module, per_sample_grads: Callable[[nn.Parameter], torch.Tensor | None], n: int
) -> torch.Tensor:
    """``(1/n) Σ_i g_i²`` from per-sample gradients shaped ``(n, *param.shape)``, per parameter."""
    by_name = {}
    for name, p in trainable(model):
        grads = per_sample_grads(p)
        if grads is not None:
            by_name[name] = grads.square().sum(dim=0) / n
    return _ordered(model, by_name)


# ---------------------------------------------------------------------------------------------
# Pure PyTorch
# ---------------------------------------------------------------------------------------------
def floor(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One forward and one backward pass of the mean loss: the cost floor of every method.

    Returns the squared batch gradient, which is *not* the Fisher; it exists for timing only.
    """
    params = [p for _, p in trainable(model)]
    grads = torch.autograd.grad(F.cross_entropy(model(inputs), targets), params)
    return _flat([g.square() for g in grads])


def per_sample_loop(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Empirical Fisher by a Python loop: one forward and backward pass per sample."""
    params = [p for _, p in trainable(model)]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for i in range(len(inputs)):
        loss = F.cross_entropy(model(inputs[i : i + 1]), targets[i : i + 1])
        for total, grad in zip(sums, torch.autograd.grad(loss, params), strict=True):
            total.add_(grad.square())
    return _flat(sums) / len(inputs)


def vmap_grad(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Empirical Fisher from ``torch.func.vmap(grad(...))`` over chunks of `VMAP_CHUNK` samples."""
    params = {name: p.detach() for name, p in trainable(model)}
    buffers = dict(model.named_buffers())

    def sample_loss(
        values: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        logits = torch.func.functional_call(model, (values, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_sample_grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    for x, y in zip(inputs.split(VMAP_CHUNK), targets.split(VMAP_CHUNK), strict=True):
        for name, grads in per_sample_grads(params, x, y).items():
            sums[name].add_(grads.square().sum(dim=0))
    return _flat(list(sums.values())) / len(inputs)


# ---------------------------------------------------------------------------------------------
# BackPACK
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _backpack_extended(model: nn.Module, use_converter: bool) -> Iterator[nn.Module]:
    """``backpack.extend(model)``, undone on exit: hooks, extension flags, saved fields, grads.

    ``extend`` marks every module it touches and never re-hooks a marked module, so the marks
    must go too, or a second call on the same model would silently compute nothing.
    """
    backpack = _require("backpack")
    try:
        with warnings.catch_warnings():
            # BackPACK warns about containers (ResNet18, BasicBlock) "having parameters";
            # really unsupported parameters are detected by `_ordered` instead.
            warnings.simplefilter("ignore", UserWarning)
            yield backpack.extend(model, use_converter=use_converter)
    finally:
        backpack.CTX.remove_hooks()
        for module in model.modules():
            backpack.memory_cleanup(module)
            with contextlib.suppress(AttributeError):
                delattr(module, "_backpack_extend")
        _clear_grads(model)


def _backpack_fields(model: nn.Module, field: str) -> dict[str, torch.Tensor]:
    """The quantity BackPACK saved as ``param.<field>``, by parameter name (removed from params)."""
    found = {}
    for name, p in trainable(model):
        if hasattr(p, field):
            found[name] = getattr(p, field)
            delattr(p, field)
    return found


def backpack_sum_grad_squared(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Empirical Fisher with BackPACK's ``SumGradSquared``.

    With ``reduction='mean'`` BackPACK squares the gradients of ``L_i / N``, i.e. returns
    ``(1/N²) Σ_i g_i²``; multiplying by N gives ``(1/N) Σ_i g_i²``. It has no first-order rule for
    MultiheadAttention or LayerNorm, which `_ordered` reports as unsupported.
    """
    backpack = _require("backpack")
    with _backpack_extended(model, use_converter=False) as extended:
        with backpack.backpack(backpack.extensions.SumGradSquared()):
            F.cross_entropy(extended(inputs), targets).backward()
        found = _backpack_fields(model, "sum_grad_squared")
    return _ordered(model, found) * len(inputs)


def backpack_diag_ggn_exact(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Exact true Fisher with BackPACK's ``DiagGGNExact`` (the GGN of cross-entropy on logits).

    ``reduction='mean'`` already gives ``(1/N) Σ_i``. Second-order extensions backpropagate
    through every module, so models with residual additions need BackPACK's torch.fx converter;
    LayerNorm and MultiheadAttention have no rule and raise.
    """
    backpack = _require("backpack")
    loss_fn = backpack.extend(nn.CrossEntropyLoss())
    names = {id(p): name for name, p in trainable(model)}
    with _backpack_extended(model, use_converter=True) as extended:
        try:
            with backpack.backpack(backpack.extensions.DiagGGNExact()):
                loss_fn(extended(inputs), targets).backward()
        except NotImplementedError as err:
            layer = re.search(r"\.(\w+)'>", str(err))
            raise Unsupported(f"no DiagGGNExact rule for {layer[1] if layer else err}") from err
        # The converter may rename parameters, so map the saved fields back by identity.
        found = {names[id(p)]: p.diag_ggn_exact for p in extended.parameters() if id(p) in names}
        for p in extended.parameters():
            with contextlib.suppress(AttributeError):
                del p.diag_ggn_exact
    return _ordered(model, found)


# ---------------------------------------------------------------------------------------------
# Opacus
# ---------------------------------------------------------------------------------------------
def opacus_grad_sample(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Empirical Fisher from Opacus per-sample gradients (``p.grad_sample``), squared and summed.

    With ``loss_reduction='mean'`` Opacus rescales by N, so ``grad_sample[i]`` is ``∇θ L_i``.
    Its strict validation refuses any module with buffers (BatchNorm, even in eval mode); layers
    without a registered sampler (e.g. MultiheadAttention) go to its functorch fallback. Its hooks
    record activations only in training mode, so the forward runs in training mode; that is only
    the same function as eval mode without active dropout, which `_train_mode` checks.
    """
    opacus = _require("opacus")
    refused = opacus.GradSampleModule.validate(model, strict=False)
    if refused:
        layers = sorted(set(re.findall(r":(\w+)\(", str(refused))))
        raise Unsupported(f"trainable layer with buffers: {', '.join(layers)}")
    wrapped = opacus.GradSampleModule(model, loss_reduction="mean")
    try:
        with _train_mode(model):
            F.cross_entropy(wrapped(inputs), targets).backward()
        return _squares_of_per_sample_grads(
            model, lambda p: getattr(p, "grad_sample", None), len(inputs)
        )
    finally:
        wrapped._close()
        _clear_grads(model)


@contextlib.contextmanager
def _train_mode(model: nn.Module) -> Iterator[None]:
    """Switch every module to training mode and restore each module's own mode on exit."""
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if any(m.p > 0 for m in dropouts):
        raise Unsupported("active dropout: training mode would change the model")
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, mode in modes:
            module.train(mode)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# ---------------------------------------------------------------------------------------------
# nngeometry
# ---------------------------------------------------------------------------------------------
def _nngeometry_diag(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    variant: str,
    function: Callable[..., torch.Tensor] | None,
) -> torch.Tensor:
    """Run ``nngeometry.FIM(..., representation=PMatDiag)`` and reorder its diagonal.

    nngeometry lays out parameters per layer of its ``LayerCollection`` (weight, then bias);
    the layer ids are module names, so the result maps back to parameter names. Only the layer
    classes of ``LayerCollection._known_modules`` are supported, and it differentiates with
    respect to the input (``inputs.requires_grad = True``), which integer tokens cannot have.
    """
    nngeometry = _require("nngeometry")
    pspace = _require("nngeometry.object.pspace")
    vector = _require("nngeometry.object.vector")
    try:
        layers = _require("nngeometry.layercollection").LayerCollection.from_model(model)
    except Exception as err:  # nngeometry raises a bare Exception for unknown layers
        raise Unsupported(_first_line(err)) from err
    fim = nngeometry.FIM(
        model=model,
        loader=(inputs, targets),
        representation=pspace.PMatDiag,
        variant=variant,
        function=function,
        layer_collection=layers,
    )
    blocks = vector.PVector(layers, vector_repr=fim.get_diag()).to_dict()
    by_name = {}
    for layer_id, tensors in blocks.items():
        for suffix, tensor in zip(("weight", "bias"), tensors, strict=False):
            by_name[f"{layer_id}.{suffix}" if layer_id else suffix] = tensor
    return _ordered(model, by_name)


def nngeometry_diag(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """nngeometry's default diagonal FIM for classification: the exact true Fisher.

    ``variant='classif_logits'`` backpropagates C − 1 outputs per sample (a factorization of
    the softmax covariance), so its cost grows with the number of classes; targets are unused.
    """
    return _nngeometry_diag(model, inputs, targets, "classif_logits", None)


def nngeometry_diag_empirical(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Empirical Fisher with nngeometry: its diagonal of ``J Jᵀ`` with ``f(x_i, y_i) = L_i``.

    ``variant='regression'`` uses the function output as is, so returning the per-sample loss
    as the only output gives ``(1/N) Σ_i (∇θ L_i)²``.
    """

    def per_sample_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y, reduction="none").unsqueeze(1)

    return _nngeometry_diag(model, inputs, targets, "regression", per_sample_loss)


# ---------------------------------------------------------------------------------------------
# fisher_fast
# ---------------------------------------------------------------------------------------------
def _fisher_fast(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, backend: str, fisher: str
) -> torch.Tensor:
    """``fisher_fast.diag_fim`` with one backend and Fisher kind; `NotAvailable` until it exists."""
    diag_fim = getattr(_require("fisher_fast"), "diag_fim", None)
    if diag_fim is None:
        raise NotAvailable("fisher_fast.diag_fim not implemented yet")
    result = diag_fim(
        model,
        (inputs, targets),
        loss="cross_entropy",
        fisher=fisher,
        backend=backend,
        progress=False,
        batch_size=len(inputs),  # one pass over the whole batch, like the other methods
    )
    return result.flat.float()


fisher_fast_torch = partial(_fisher_fast, backend="torch", fisher="empirical")
fisher_fast_kernels = partial(_fisher_fast, backend="kernels", fisher="empirical")
fisher_fast_torch_exact = partial(_fisher_fast, backend="torch", fisher="exact")
fisher_fast_kernels_exact = partial(_fisher_fast, backend="kernels", fisher="exact")


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
class Method(NamedTuple):
    """A baseline, the quantity it computes and the library it needs (None: torch only)."""

    fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    kind: str
    library: str | None


METHODS: dict[str, Method] = {
    "floor": Method(floor, "batch-grad²", None),
    "per_sample_loop": Method(per_sample_loop, "empirical", None),
    "vmap_grad": Method(vmap_grad, "empirical", None),
    "backpack_sum_grad_squared": Method(backpack_sum_grad_squared, "empirical", "backpack"),
    "opacus_grad_sample": Method(opacus_grad_sample, "empirical", "opacus"),
    "nngeometry_diag_empirical": Method(nngeometry_diag_empirical, "empirical", "nngeometry"),
    "fisher_fast_torch": Method(fisher_fast_torch, "empirical", "fisher_fast"),
    "fisher_fast_kernels": Method(fisher_fast_kernels, "empirical", "fisher_fast"),
    "nngeometry_diag": Method(nngeometry_diag, "exact", "nngeometry"),
    "backpack_diag_ggn_exact": Method(backpack_diag_ggn_exact, "exact", "backpack"),
    "fisher_fast_torch_exact": Method(fisher_fast_torch_exact, "exact", "fisher_fast"),
    "fisher_fast_kernels_exact": Method(fisher_fast_kernels_exact, "exact", "fisher_fast"),
}
