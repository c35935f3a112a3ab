"""Fusion search, FUSE (paper §3.2, Algorithm 1 lines 1-7), over a :class:`SearchSpace`.

Each round mixes ``K`` candidate networks by softmax(α) (:class:`~fisher_fast.nas.mixture.Mixture`)
and alternates one weight step (Adam, cross-entropy of the mixed logits on a batch of the
training part) with one α step (Adam, the same loss on a batch of the validation part, with the candidates'
BatchNorm running statistics left untouched: :func:`batch_statistics_only`). Both
parts are carved from the training split given to :func:`fuse_search`; the test split is not
an argument, so the search cannot see it.

Convergence of α (line 4): every ``check_every`` steps, softmax(α) is compared with its value
at the previous check; the round stops when no weight moved by ``tol`` or more, or after
``max_steps`` steps. The candidate with the largest α becomes the incumbent (the paper's line 7
prints ``argmin``; the largest mixing weight is the candidate the relaxation prefers, as in
FUSE and DARTS). Ties go to the incumbent, which is listed first.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fisher_fast.devices import resolve_device
from fisher_fast.distributed import is_main
from fisher_fast.mixed_precision import MixedPrecision, check_precision, without_default_precision
from fisher_fast.nas.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, search_key
from fisher_fast.nas.mixture import Mixture
from fisher_fast.nas.parallel import average_gradients, data_parallel, shard_loss, sync_buffers
from fisher_fast.nas.search_result import Round, SearchResult
from fisher_fast.nas.space import SearchSpace
from fisher_fast.nas.training import (
    NetworkBuilder,
    Skeleton,
    batches,
    build_seeded,
    carve_validation,
    draw_seed,
)
from fisher_fast.part import Part
from fisher_fast.training import evaluate


@dataclass(frozen=True)
class FuseConfig:
    """Hyper-parameters of FUSE, also used by :func:`~fisher_fast.nas.random_search.random_search`
    for its training (``batch_size``, ``weight_lr``, ``val_fraction``, ``skeleton``) so both
    searches train networks alike. Defaults are small: a digits (8x8) search takes seconds.

    Args:
        candidates: ``C``, cells sampled per round; the mixture holds them plus the incumbent
            (the first round samples ``C + 1``, so every round mixes ``K = C + 1`` networks).
            A round's cells are pairwise non-equivalent and differ from the incumbent; a cell
            that lost an earlier round may be drawn again.
        rounds: number of rounds (the search budget).
        max_steps: cap on the alternating weight/α steps of one round.
        check_every: steps between two convergence checks of softmax(α).
        tol: the round has converged when no softmax(α) entry changed by ``tol`` or more
            between two checks.
        batch_size: samples per weight step and per α step.
        weight_lr: Adam step size of the candidates' weights.
        alpha_lr: Adam step size of α.
        val_fraction: share of the training split carved out (per class) for the α steps.
        time_budget_s: optional wall-time budget in seconds, checked before each round (at
            least one round runs); results then depend on the machine's speed.
        skeleton: the network built around each cell.
        precision: the training steps' precision, ``"fp32"``, ``"bf16"`` or ``"fp16"``
            (automatic mixed precision, see :mod:`fisher_fast.mixed_precision`).
    """

    candidates: int = 3
    rounds: int = 2
    max_steps: int = 60
    check_every: int = 10
    tol: float = 0.01
    batch_size: int = 64
    weight_lr: float = 3e-3
    alpha_lr: float = 0.05
    val_fraction: float = 0.2
    time_budget_s: float | None = None
    skeleton: Skeleton = field(default_factory=Skeleton)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        for name in ("candidates", "rounds", "max_steps", "check_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("tol", "weight_lr", "alpha_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be positive or None, got {self.time_budget_s}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the skeleton as a nested object); ``precision`` only when it is
        not the default fp32, so that settings written before it existed still compare equal.
        Inverse: :meth:`from_dict`."""
        return without_default_precision(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FuseConfig:
        """The setting :meth:`to_dict` wrote (in a task dictionary's settings)."""
        return cls(**{**data, "skeleton": Skeleton(**data["skeleton"])})


def fuse_search(
    space: SearchSpace,
    train_data: Part,
    *,
    num_classes: int,
    generator: torch.Generator,
    config: FuseConfig | None = None,
    build: NetworkBuilder | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    on_round: Callable[[Round], None] | None = None,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> SearchResult:
    """Search ``space`` with FUSE on the training split ``train_data`` (inputs ``(N, C, H, W)``,
    labels ``0..num_classes-1``).

    ``generator`` seeds everything (the validation split, the sampled cells, each candidate's
    initialisation, each round's batches): the same seed gives the same result on CPU. ``build``
    turns a genotype into a network (default: ``config.skeleton``'s
    :class:`~fisher_fast.nas.network.Network`); it runs under a seed drawn per candidate.
    ``result.steps`` counts candidate-steps (``K`` per mixture step), the budget unit of
    :func:`~fisher_fast.nas.random_search.random_search`. Raises what
    :meth:`SearchSpace.sample` raises when the space has fewer than ``K`` distinct cells.

    ``checkpoint``: a JSON file written (atomically) after every finished round; when it
    exists, the search resumes after its last round and ends exactly as an uninterrupted run
    (same ``generator`` seed, data, space and settings; a mismatch is an error, see
    :mod:`~fisher_fast.nas.checkpoint`). A custom ``build`` must be the same on resume.
    ``on_round`` is called with each finished round, after its checkpoint is written.

    ``device``: where the candidates train and are scored (the data is moved there once; the
    random choices stay on the CPU, so a checkpoint resumes on any device).
    """
    device = resolve_device(device, "fuse_search(device=...)")
    config = config or FuseConfig()
    build = build or config.skeleton.builder(tuple(train_data.x.shape[1:]), num_classes)
    start = time.perf_counter()
    initial_state = generator.get_state()
    weights_part, val_part = carve_validation(train_data, config.val_fraction, generator)
    weights_part, val_part = weights_part.to(device), val_part.to(device)
    # (file, key): the key hashes the training data, so it is only computed for a checkpoint.
    saving = None
    resumed = None
    if checkpoint is not None:
        saving = Path(checkpoint), search_key(space, train_data, num_classes, config, initial_state)
        resumed = load_checkpoint(*saving)
    history: list[Round] = []
    spent = 0.0
    if resumed is not None:
        history, spent = list(resumed.rounds), resumed.seconds
        generator.set_state(resumed.generator_state)
    bar = tqdm(
        total=config.rounds,
        initial=len(history),
        desc="FUSE rounds",
        disable=not progress or not is_main(),
    )
    while len(history) < config.rounds:
        if history and _out_of_time(config, spent + time.perf_counter() - start):
            break
        incumbent = [] if not history else [history[-1].candidates[history[-1].winner]]
        cells = incumbent + space.sample(
            config.candidates + 1 - len(incumbent), generator, exclude=incumbent
        )
        mixture = Mixture([build_seeded(build, g, draw_seed(generator)) for g in cells]).to(device)
        round_batches = torch.Generator().manual_seed(draw_seed(generator))
        steps, converged = _optimise(
            mixture,
            batches(weights_part, config.batch_size, round_batches),
            batches(val_part, config.batch_size, round_batches),
            config,
        )
        weights = mixture.probabilities()
        history.append(
            Round(
                candidates=tuple(cells),
                alphas=tuple(weights.tolist()),
                winner=int(weights.argmax()),
                steps=steps,
                converged=converged,
                val_accuracy=evaluate(mixture, val_part, device)[0],
            )
        )
        if saving is not None and is_main():
            path, key = saving
            state = Checkpoint(
                key, tuple(history), generator.get_state(), spent + time.perf_counter() - start
            )
            save_checkpoint(path, state)
        bar.update()
        if on_round is not None:
            on_round(history[-1])
    bar.close()
    last = history[-1]
    return SearchResult(
        genotype=last.candidates[last.winner],
        history=tuple(history),
        alphas=last.alphas,
        steps=sum(len(r.candidates) * r.steps for r in history),
        seconds=spent + time.perf_counter() - start,
    )


def _out_of_time(config: FuseConfig, elapsed: float) -> bool:
    budget = config.time_budget_s
    return budget is not None and elapsed >= budget


@contextmanager
def batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """Inside, every BatchNorm of ``model`` in training mode normalises with the statistics of
    the batch, as in a weight step, but leaves its running mean, variance and batch count as
    they are.

    FUSE's α step minimises the validation loss of the mixture as a function of α at fixed
    candidate weights w: it evaluates the very function the weight steps train (training mode,
    batch statistics), and must not change any part of the candidates' state. The running
    statistics are such state: they are what the chosen network normalises with at test time,
    and they must be estimated from the training split only, so validation batches must not
    leak into them (``torch.no_grad`` alone does not stop a BatchNorm's buffer updates).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False  # training mode then passes no running buffers
    try:
        yield
    finally:
        for m, flag in zip(norms, tracked, strict=True):
            m.track_running_stats = flag


def _optimise(
    mixture: Mixture,
    train_batches: Iterator[Part],
    val_batches: Iterator[Part],
    config: FuseConfig,
) -> tuple[int, bool]:
    """Alternate weight and α steps until α converges or ``config.max_steps``; returns the
    number of steps taken and whether α converged. Data-parallel in a process group
    (:mod:`~fisher_fast.nas.parallel`)."""
    weight_opt = torch.optim.Adam(mixture.weights(), lr=config.weight_lr)
    alpha_opt = torch.optim.Adam([mixture.alpha], lr=config.alpha_lr)
    device = mixture.alpha.device
    weight_amp = MixedPrecision(config.precision, device)
    alpha_amp = MixedPrecision(config.precision, device)
    model = data_parallel(mixture)
    mixture.train()

    def mix_frozen(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), batch_statistics_only(mixture):
            outputs = mixture.outputs(x)
        return mixture.mix(outputs)

    previous = mixture.probabilities()
    for step in range(1, config.max_steps + 1):
        weight_opt.zero_grad(set_to_none=True)
        with weight_amp.forward():
            loss = shard_loss(model, next(train_batches))
        weight_amp.backward(loss)
        weight_amp.step(weight_opt)

        alpha_opt.zero_grad(set_to_none=True)
        with alpha_amp.forward():
            loss = shard_loss(mix_frozen, next(val_batches))
        alpha_amp.backward(loss)
        average_gradients([mixture.alpha])
        alpha_amp.step(alpha_opt)

        if step % config.check_every == 0:
            current = mixture.probabilities()
            if float((current - previous).abs().max()) < config.tol:
                sync_buffers(mixture)
                return step, True
            previous = current
    sync_buffers(mixture)
    return config.max_steps, False
