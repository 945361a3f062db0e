"""Models built from rnnkit layers: one config dataclass per model, forward reads like the math."""

from rnnkit.models.classifier import SequenceClassifier, SequenceClassifierConfig
from rnnkit.models.forecaster import Forecaster, ForecasterConfig
from rnnkit.models.language_model import LanguageModel, LanguageModelConfig
from rnnkit.models.seq2seq import Seq2Seq, Seq2SeqConfig
from rnnkit.models.tagger import SequenceTagger, SequenceTaggerConfig

__all__ = [
    "SequenceClassifier",
    "SequenceClassifierConfig",
    "LanguageModel",
    "LanguageModelConfig",
    "Forecaster",
    "ForecasterConfig",
    "Seq2Seq",
    "Seq2SeqConfig",
    "SequenceTagger",
    "SequenceTaggerConfig",
]
