from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Pass tests run tiny models: a second intra-op thread only adds contention (on a loaded
    2-core machine a 15 us batch_norm took 1.3 ms with two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
