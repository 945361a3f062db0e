"""Two gloo processes (started as torchrun starts them) train like one process on the same
global batch: each takes half of every batch and DDP averages the gradients."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from ddp_worker import train_toy

from rnnkit.train.io import load_tensors

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_matches_single_process_on_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp.safetensors"
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = dict(os.environ, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        processes.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=180)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0, 0], outputs
    distributed = load_tensors(out)

    single = train_toy()
    assert set(distributed) == set(single)
    for name, value in single.items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    from trainer_toys import ToyRecurrentModel

    untrained = ToyRecurrentModel(dropout=0.0)
    assert not torch.allclose(distributed["head.weight"], untrained.head.weight)
