"""Parameters a batch's forward pass never uses: their gradient is zero for every sample.

A module that holds a parameter but does not run in the first batch (an optional branch, an
expert no token was routed to, a head defined and left out of ``forward``) used to send its
parameters to per-sample gradients of the whole model, which costs a vmap of the model per
batch to find zeros. Whether the loss can depend on a parameter is a fact of the autograd
graph: its gradient accumulator is reachable from the output, or it is not. A parameter no
holder runs and the output's graph does not reach is planned as zero (plan.py), and every later
batch's graph is checked the same way before its backward pass (engine.py): one that reaches
it gets a plan of its own, as a batch of other layouts does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fisher_fast.fim.layout import flat_leaves

PATH = "unused by the forward pass (zero)"


def graph_nodes(output: Any) -> set[Any]:
    """Every node of the autograd graph of ``output`` (a tensor, or nested tuples, lists and
    dicts of them): the functions its gradient would flow through."""
    roots = [t.grad_fn for t in flat_leaves(output) if isinstance(t, torch.Tensor)]
    stack = [node for node in roots if node is not None]
    seen = set(stack)
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def reached_parameters(output: Any) -> set[int]:
    """The ``id`` of every tensor whose gradient accumulator the autograd graph of ``output``
    reaches: the leaves its gradient would flow to."""
    variables = (getattr(node, "variable", None) for node in graph_nodes(output))
    return {id(v) for v in variables if v is not None}  # only accumulators have a variable


def any_reached(output: Any, params: Iterable[torch.Tensor]) -> bool:
    """Whether the graph of ``output`` reaches any of ``params``."""
    ids = {id(p) for p in params}
    return bool(ids) and not ids.isdisjoint(reached_parameters(output))
