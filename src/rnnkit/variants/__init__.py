"""Recurrent layers beyond torch.nn: layer-normalised cells, recurrent regularisers, minGRU/minLSTM, IndRNN."""

from rnnkit.cells.layer_norm import LayerNormGRUCell, LayerNormLSTMCell
from rnnkit.variants.indrnn import IndRNN
from rnnkit.variants.layer_norm import LayerNormGRU, LayerNormLSTM
from rnnkit.variants.minimal import MinGRU, MinLSTM

__all__ = [
    "LayerNormLSTM",
    "LayerNormGRU",
    "LayerNormLSTMCell",
    "LayerNormGRUCell",
    "MinGRU",
    "MinLSTM",
    "IndRNN",
]
