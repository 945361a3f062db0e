"""rnnkit: recurrent networks from their equations, drop-in compatible with torch.nn."""

from rnnkit import init
from rnnkit.cells import GRUCell, LSTMCell, RNNCell
from rnnkit.convert import from_torch, to_torch
from rnnkit.dispatch import explain_backend
from rnnkit.export import export_onnx
from rnnkit.layers import GRU, LSTM, RNN
from rnnkit.stream import Stream
from rnnkit.variants import IndRNN, LayerNormGRU, LayerNormLSTM, MinGRU, MinLSTM

__version__ = "0.1.0"

__all__ = [
    "RNN",
    "LSTM",
    "GRU",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "LayerNormLSTM",
    "LayerNormGRU",
    "MinGRU",
    "MinLSTM",
    "IndRNN",
    "from_torch",
    "to_torch",
    "explain_backend",
    "export_onnx",
    "Stream",
    "init",
]
