"""Shared test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Run the suite single-threaded.

    Test models see a few samples of at most 32x32: intra-op threading only adds
    hand-off cost, which on a busy 2-core machine multiplies step times by ~50.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
