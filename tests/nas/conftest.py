"""Every test here runs torch single-threaded (the ``one_thread`` fixture of tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _single_threaded(one_thread: None) -> None:
    """Applies ``one_thread`` to every test of this folder."""
