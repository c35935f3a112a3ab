"""Bad input to the library (issue #12): each case is refused with an error that names the
problem and the fix, or, where the input is unambiguous, accepted."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import random_fim, reference_frechet

from fisher_fast import DiagFIM, frechet_distance, frechet_distances


def diag(names: list[str], shapes: list[tuple[int, ...]], flat: torch.Tensor) -> DiagFIM:
    return DiagFIM(flat, names, shapes, n_samples=1, fisher="empirical")


# -- Fréchet distance: DiagFIMs are matched by name ------------------------------------------


def test_diag_fims_with_other_names_are_refused(gen: torch.Generator) -> None:
    a = diag(["w", "b"], [(3,), (2,)], random_fim(5, gen))
    b = diag(["w", "c"], [(3,), (2,)], random_fim(5, gen))
    with pytest.raises(ValueError, match=r"F_b and F_a name different .*missing \['b'\].*\['c'\]"):
        frechet_distance(a, b)
    with pytest.raises(ValueError, match=r"FIM 1 and the reference FIM name different"):
        frechet_distances(a, [a, b])


def test_diag_fims_with_other_shapes_are_refused(gen: torch.Generator) -> None:
    a = diag(["w", "b"], [(2, 3), (2,)], random_fim(8, gen))
    b = diag(["w", "b"], [(3, 2), (2,)], random_fim(8, gen))
    with pytest.raises(
        ValueError, match=r"F_b 'w' has shape \(3, 2\) but the reference has \(2, 3\)"
    ):
        frechet_distance(a, b)


def test_diag_fims_in_another_order_are_matched_by_name(gen: torch.Generator) -> None:
    w, bias = random_fim(6, gen), random_fim(2, gen)
    a = diag(["w", "b"], [(6,), (2,)], torch.cat([w, bias]))
    b = diag(["b", "w"], [(2,), (6,)], torch.cat([bias, w]))
    assert float(frechet_distance(a, b)) == pytest.approx(0.0, abs=1e-7)
    other = {"w": random_fim(6, gen), "b": random_fim(2, gen)}
    expected = reference_frechet(a.flat, torch.cat([other["w"], other["b"]]))
    assert float(frechet_distance(a, other)) == pytest.approx(expected, abs=1e-7)
    assert float(frechet_distance(other, b)) == pytest.approx(expected, abs=1e-7)


def test_name_check_keeps_the_distance_cheap(gen: torch.Generator) -> None:
    n, params = 10**7, 2000
    sizes = [n // params] * params
    names = [f"layer{i}.weight" for i in range(params)]
    a = diag(names, [(s,) for s in sizes], random_fim(n, gen))
    b = diag(list(names), [(s,) for s in sizes], random_fim(n, gen))

    def best(f: object) -> float:
        times = []
        for _ in range(7):
            start = time.perf_counter()
            f()  # type: ignore[operator]
            times.append(time.perf_counter() - start)
        return min(times)

    dot = best(lambda: torch.dot(a.flat, b.flat))
    ours = best(lambda: frechet_distance(a, b))
    assert ours < 1.1 * dot + 2e-3, (ours, dot)
