"""Shared test fixtures. Tests are seeded and deterministic; sizes shrink in CI
unless NOISEPROP_FULL=1."""
import os

import pytest
import torch

FULL = os.environ.get("NOISEPROP_FULL") == "1"


@pytest.fixture(autouse=True)
def _one_thread_per_worker():
    # pytest-xdist runs two workers on two cores: one intra-op thread each.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def full_size():
    return FULL
