import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny recurrent steps run fastest (and steadiest on a busy machine) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
