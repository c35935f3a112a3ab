"""Counting the calls of a library function during a test (and optionally failing after some),
the function patched on the module that defines it, where its callers look it up at call time,
so that moving those callers around does not bypass the count."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


class CallCounter:
    """Wraps ``module.name`` for the rest of the test and counts its calls in ``calls``; with
    ``fail_after`` set, the call after that many raises KeyboardInterrupt (a simulated kill)."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        module: ModuleType,
        name: str,
        fail_after: int | None = None,
    ) -> None:
        self.calls = 0
        self.fail_after = fail_after
        original: Callable[..., Any] = getattr(module, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise KeyboardInterrupt("simulated kill")
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
