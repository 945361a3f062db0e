"""Initialisation schemes that train well (torch's uniform default stays the default)."""

from __future__ import annotations

import torch
from torch import nn

from rnnkit.cells.base import CellBase
from rnnkit.layers import RNNBase


@torch.no_grad()
def orthogonal_(module: nn.Module, forget_bias: float = 1.0) -> nn.Module:
    """Orthogonal recurrent weights (per gate block), Xavier-uniform input and projection
    weights, zero biases and, for LSTMs, the forget-gate bias set to `forget_bias`.

    Works on rnnkit layers and cells, and on any module containing them. Returns the module.
    """
    targets = [m for m in module.modules() if isinstance(m, (RNNBase, CellBase))]
    if not targets:
        raise TypeError(
            f"orthogonal_: module must be or contain an rnnkit layer or cell, "
            f"got {type(module).__name__}"
        )
    for target in targets:
        hidden = target.hidden_size
        is_lstm = getattr(target, "mode", None) == "LSTM" or getattr(target, "gates", 0) == 4
        for name, param in target.named_parameters(recurse=False):
            if name.startswith("weight_hh"):
                for block in param.split(hidden, dim=0):
                    nn.init.orthogonal_(block)
            elif name.startswith(("weight_ih", "weight_hr")):
                nn.init.xavier_uniform_(param)
            elif name.startswith("bias"):
                nn.init.zeros_(param)
                if is_lstm and name.startswith("bias_ih"):
                    # i, f, g, o: the forget gate is the second block; b_ih + b_hh is what counts.
                    param[hidden : 2 * hidden] = forget_bias
    return module
