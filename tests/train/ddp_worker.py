"""One process of the DDP parity test, started the way torchrun starts a worker (env vars)."""

import os
import sys

import torch
from trainer_toys import ToyRecurrentModel, ToyStreamTask

from rnnkit.train import Trainer, TrainerConfig
from rnnkit.train.distributed import setup_distributed, teardown_distributed
from rnnkit.train.io import atomic_save_tensors

CONFIG = {"epochs": 2, "warmup_steps": 1, "progress": False, "patience": None}


def train_toy(context=None) -> dict[str, torch.Tensor]:
    """Final weights and per-epoch training losses of the toy run (global batch 4)."""
    torch.manual_seed(0)
    model = ToyRecurrentModel(dropout=0.0)
    kwargs = {"context": context} if context is not None else {}
    trainer = Trainer(model, ToyStreamTask(batch_size=4), TrainerConfig(**CONFIG), **kwargs)
    state = trainer.fit()
    tensors = dict(model.state_dict())
    tensors["train_loss"] = torch.tensor([r["train_loss"] for r in state.history])
    return tensors


if __name__ == "__main__":
    torch.set_num_threads(1)
    context = setup_distributed(use_cuda=False)
    try:
        result = train_toy(context)
        if context.is_main:
            atomic_save_tensors(sys.argv[1], result)
    finally:
        teardown_distributed(context)
    # Once in several full-suite runs a worker aborted after finishing ("terminate called
    # without an active exception", from a native thread destroyed at interpreter exit);
    # the result is already written and the group torn down, so skip the native exit path.
    sys.stdout.flush()
    os._exit(0)
