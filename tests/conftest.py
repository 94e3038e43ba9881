"""Fixtures shared by test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny batches gain little from a second OpenMP thread, and when other processes share two cores its
    barriers stall (a batch-2 SFT step measured 16 s with two threads, 0.1 s with one). Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sprite_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty folder per test module; the sprite DataModule writes its shards there on first use."""
    return tmp_path_factory.mktemp("sprites")
