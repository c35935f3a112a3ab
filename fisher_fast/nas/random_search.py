"""Random search, the paper's baseline (§4): sampled cells trained one by one for a share of the
same budget a FUSE run spent, the best on the validation split wins."""

from __future__ import annotations

import math
import time

import torch

from fisher_fast.devices import resolve_device
from fisher_fast.nas.fuse import FuseConfig
from fisher_fast.nas.search_result import Round, SearchResult
from fisher_fast.nas.space import SearchSpace
from fisher_fast.nas.training import (
    NetworkBuilder,
    batches,
    build_seeded,
    carve_validation,
    draw_seed,
    train_steps,
)
from fisher_fast.part import Part
from fisher_fast.training import KeepBest, evaluate


def random_search(
    space: SearchSpace,
    train_data: Part,
    *,
    num_classes: int,
    budget: int,
    generator: torch.Generator,
    steps_per_candidate: int | None = None,
    config: FuseConfig | None = None,
    build: NetworkBuilder | None = None,
    device: torch.device | str = "cpu",
) -> SearchResult:
    """Spend exactly ``budget`` candidate-steps (pass a FUSE run's ``result.steps``) training
    distinct cells of ``space`` on the training split ``train_data``.

    Each trial trains one freshly initialised network for ``steps_per_candidate`` weight steps
    (default ``config.max_steps``, a FUSE round's cap; the last trial gets what is left of the
    budget). A small space may hold fewer distinct cells than the ``ceil(budget / steps)``
    trials: then every cell is tried once and the budget is spread evenly over them (a trial
    trains longer, the total stays ``budget``). Each trained network is then scored on a validation split carved from ``train_data`` exactly as FUSE
    carves it (same ``config.val_fraction``, first draw of ``generator``); the best validation
    accuracy wins (ties: lower validation loss, then the earlier trial). Training uses
    ``config``'s ``batch_size``, ``weight_lr`` (Adam) and ``skeleton`` (or ``build``), so the
    comparison with FUSE differs only in how the budget is spent. ``result.alphas`` holds the
    trials' validation accuracies. The test split is not an argument. ``device``: where the
    networks train and are scored (random choices stay on the CPU, as in FUSE).
    """
    device = resolve_device(device, "random_search(device=...)")
    if budget < 1:
        raise ValueError(f"budget must be at least one candidate-step, got {budget}")
    config = config or FuseConfig()
    per_trial = config.max_steps if steps_per_candidate is None else steps_per_candidate
    if per_trial < 1:
        raise ValueError(f"steps_per_candidate must be at least 1, got {per_trial}")
    build = build or config.skeleton.builder(tuple(train_data.x.shape[1:]), num_classes)
    start = time.perf_counter()
    weights_part, val_part = carve_validation(train_data, config.val_fraction, generator)
    weights_part, val_part = weights_part.to(device), val_part.to(device)
    train_batches = batches(weights_part, config.batch_size, generator)
    cells = space.sample_up_to(math.ceil(budget / per_trial), generator)
    history: list[Round] = []
    best = KeepBest()
    for trial, (cell, steps) in enumerate(
        zip(cells, trial_steps(budget, per_trial, len(cells)), strict=True)
    ):
        network = build_seeded(build, cell, draw_seed(generator), device)
        optimizer = torch.optim.Adam(network.parameters(), lr=config.weight_lr)
        train_steps(network, train_batches, steps, optimizer, config.precision)
        accuracy, loss = evaluate(network, val_part, device)
        best.offer((accuracy, -loss), trial)
        history.append(
            Round(
                candidates=(cell,),
                alphas=(1.0,),
                winner=0,
                steps=steps,
                converged=False,
                val_accuracy=accuracy,
            )
        )
    return SearchResult(
        genotype=cells[best.index],
        history=tuple(history),
        alphas=tuple(r.val_accuracy for r in history),
        steps=sum(r.steps for r in history),
        seconds=time.perf_counter() - start,
    )


def trial_steps(budget: int, per_trial: int, trials: int) -> list[int]:
    """Weight steps of each of ``trials`` trials, summing to ``budget``: ``per_trial`` each and
    the rest for the last when ``trials`` of them cover the budget, else the budget split evenly
    (the first ``budget % trials`` trials one step more)."""
    if trials * per_trial >= budget:
        return [min(per_trial, budget - i * per_trial) for i in range(trials)]
    base, extra = divmod(budget, trials)
    return [base + int(i < extra) for i in range(trials)]
