"""Conversions between rnnkit modules and their torch.nn counterparts (same weights)."""

from __future__ import annotations

from torch import nn

from rnnkit.cells import GRUCell, LSTMCell, RNNCell
from rnnkit.layers import GRU, LSTM, RNN, RNNBase


def _factory(module: nn.Module) -> dict:
    weight = next(module.parameters())
    return {"device": weight.device, "dtype": weight.dtype}


def _layer_args(module) -> dict:
    args = {
        "input_size": module.input_size,
        "hidden_size": module.hidden_size,
        "num_layers": module.num_layers,
        "bias": module.bias,
        "batch_first": module.batch_first,
        "dropout": module.dropout,
        "bidirectional": module.bidirectional,
    }
    return args | _factory(module)


def from_torch(module: nn.Module, backend: str = "auto") -> nn.Module:
    """The rnnkit equivalent of a torch.nn RNN/LSTM/GRU layer or cell, with the same weights."""
    if isinstance(module, nn.LSTM):
        mine = LSTM(**_layer_args(module), proj_size=module.proj_size, backend=backend)
    elif isinstance(module, nn.GRU):
        mine = GRU(**_layer_args(module), backend=backend)
    elif isinstance(module, nn.RNN):
        mine = RNN(**_layer_args(module), nonlinearity=module.nonlinearity, backend=backend)
    elif isinstance(module, (nn.RNNCell, nn.LSTMCell, nn.GRUCell)):
        args = {
            "input_size": module.input_size,
            "hidden_size": module.hidden_size,
            "bias": module.bias,
        } | _factory(module)
        if isinstance(module, nn.RNNCell):
            mine = RNNCell(**args, nonlinearity=module.nonlinearity)
        elif isinstance(module, nn.LSTMCell):
            mine = LSTMCell(**args)
        else:
            mine = GRUCell(**args)
    else:
        raise TypeError(
            "from_torch: module must be torch.nn.RNN/LSTM/GRU or RNNCell/LSTMCell/GRUCell, "
            f"got {type(module).__name__}"
        )
    mine.load_state_dict(module.state_dict())
    mine.train(module.training)
    return mine


def to_torch(module: nn.Module) -> nn.Module:
    """The torch.nn equivalent of an rnnkit layer or cell, with the same weights."""
    if isinstance(module, RNNBase):
        if getattr(module, "reset_after", True) is False:
            raise ValueError("to_torch: GRU(reset_after=False) has no torch.nn counterpart")
        if isinstance(module, LSTM):
            theirs = nn.LSTM(**_layer_args(module), proj_size=module.proj_size)
        elif isinstance(module, GRU):
            theirs = nn.GRU(**_layer_args(module))
        elif isinstance(module, RNN):
            theirs = nn.RNN(**_layer_args(module), nonlinearity=module.nonlinearity)
        else:
            raise TypeError(f"to_torch: no torch.nn counterpart for {type(module).__name__}")
    elif isinstance(module, (RNNCell, LSTMCell, GRUCell)):
        args = {
            "input_size": module.input_size,
            "hidden_size": module.hidden_size,
            "bias": module.bias,
        } | _factory(module)
        if isinstance(module, RNNCell):
            theirs = nn.RNNCell(**args, nonlinearity=module.nonlinearity)
        elif isinstance(module, LSTMCell):
            theirs = nn.LSTMCell(**args)
        else:
            if not module.reset_after:
                raise ValueError("to_torch: GRUCell(reset_after=False) has no torch.nn counterpart")
            theirs = nn.GRUCell(**args)
    else:
        raise TypeError(
            f"to_torch: module must be an rnnkit layer or cell, got {type(module).__name__}"
        )
    theirs.load_state_dict(module.state_dict())
    theirs.train(module.training)
    return theirs
