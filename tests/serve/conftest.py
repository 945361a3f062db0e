"""Run directories to serve: tiny models with seeded random weights (served, not judged)."""

import sys
from pathlib import Path

import pytest
import torch

from rnnkit.data import CharVocab
from rnnkit.models import (
    Forecaster,
    ForecasterConfig,
    SequenceClassifier,
    SequenceClassifierConfig,
)
from rnnkit.train.classify import ClassifySettings
from rnnkit.train.forecast import ForecastSettings

# serve_helpers sits beside this file; the tests import it by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_helpers import lm_model, make_run  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "lm", "lm", *lm_model())


@pytest.fixture(scope="session")
def gru_lm_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "gru", "lm", *lm_model("gru", 12, 2))


@pytest.fixture(scope="session")
def classify_run(tmp_path_factory):
    vocab = CharVocab.build(["cat", "dog", "cow", "hen"])
    torch.manual_seed(1)
    config = SequenceClassifierConfig(
        3, vocab_size=len(vocab), embedding_dim=8, cell="gru", hidden_size=16, pooling="mean"
    )
    files = {
        "vocab.json": {"level": "char", "classes": ["bird", "cat", "dog"], "vocab": vocab.to_dict()}
    }
    model, settings = SequenceClassifier(config), ClassifySettings(pooling="mean", cell="gru")
    return make_run(
        tmp_path_factory.mktemp("runs") / "classify", "classify", model, settings, files
    )


@pytest.fixture(scope="session")
def forecast_run(tmp_path_factory):
    torch.manual_seed(2)
    model = Forecaster(ForecasterConfig(1, window=6, horizon=3, hidden_size=8))
    torch.nn.init.normal_(model.head.weight, std=0.3)
    files = {
        "preprocessing.json": {
            "series": "wave",
            "columns": ["value"],
            "period": 1,
            "mean": [0.0],
            "std": [1.0],
            "tail": [],
            "length": 0,
        }
    }
    settings = ForecastSettings()
    return make_run(
        tmp_path_factory.mktemp("runs") / "forecast", "forecast", model, settings, files
    )


@pytest.fixture(scope="session")
def tag_run(tmp_path_factory):
    from rnnkit.models import SequenceTagger, SequenceTaggerConfig
    from rnnkit.train.tag import TagSettings, TokenEncoder

    words = ["the", "cat", "sat", "on", "mat", "."]
    encoder = TokenEncoder(words, CharVocab.build(" ".join(words)), ["DET", "NOUN", "VERB"], 8)
    torch.manual_seed(3)
    config = SequenceTaggerConfig(
        3, len(words) + 2, len(encoder.chars), 8, 4, 6, 3, "lstm", 12, bidirectional=False
    )
    model, settings = SequenceTagger(config), TagSettings(bidirectional=False)
    torch.nn.init.normal_(model.head.weight, std=3.0)  # random weights that vary the tags
    files = {"vocab.json": encoder.to_dict()}
    return make_run(tmp_path_factory.mktemp("runs") / "tag", "tag", model, settings, files)
