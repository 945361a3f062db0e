import sys
from pathlib import Path

import pytest
import torch

# The helper modules here (trainer_toys, ddp_worker) are imported by name by the tests and by
# the DDP worker processes, which run ddp_worker.py as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny recurrent steps run fastest (and steadiest on a busy machine) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
