"""Experiments tests run tiny models, where a second torch thread only adds contention."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def single_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
