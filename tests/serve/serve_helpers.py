"""What the serve tests share: run directories built by hand, clients, a free port."""

import dataclasses
import socket
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from rnnkit.data import CharVocab
from rnnkit.models import LanguageModel, LanguageModelConfig
from rnnkit.serve import Limits, ServeOptions, create_app
from rnnkit.train.io import atomic_write_json
from rnnkit.train.lm import LanguageModelSettings
from rnnkit.train.rundir import save_model, write_config
from rnnkit.train.runs import load_run

TEXT = "to be or not to be, that is the question.\n"


def make_run(run_dir: Path, task: str, model, settings, files: dict) -> Path:
    """A run directory as the trainer writes it, for a model with seeded random weights."""
    run_dir.mkdir(parents=True)
    config = {
        "task": task,
        "settings": dataclasses.asdict(settings),
        "model": {"class": type(model).__name__, "config": dataclasses.asdict(model.config)},
    }
    write_config(run_dir, config)
    save_model(run_dir, model)
    for name, value in files.items():
        atomic_write_json(run_dir / name, value)
    return run_dir


def lm_model(cell: str = "lstm", hidden: int = 16, layers: int = 1):
    vocab = CharVocab.build(TEXT)
    torch.manual_seed(0)
    config = LanguageModelConfig(len(vocab), 8, cell, hidden, layers)
    files = {"vocab.json": {"level": "char", "vocab": vocab.to_dict()}}
    return LanguageModel(config), LanguageModelSettings(hidden=hidden, cell=cell), files


def client_for(run_dir, **settings) -> TestClient:
    """A TestClient over a server of `run_dir`; `settings` are ServeOptions or Limits fields."""
    limit_names = set(Limits.__dataclass_fields__)
    limits = Limits(**{k: v for k, v in settings.items() if k in limit_names})
    options = ServeOptions(
        limits=limits, **{k: v for k, v in settings.items() if k not in limit_names}
    )
    return TestClient(create_app(load_run(run_dir), options))


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
