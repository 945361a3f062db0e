"""Conversions between rnnkit modules and their torch.nn counterparts (same weights)."""

from __future__ import annotations

import os
import pickle

import torch
from torch import Tensor, nn

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


def load_torch_state_dict(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, Tensor]:
    """A state_dict (name -> CPU tensor) from a safetensors file, or from a torch.save pickle
    (.pt/.pth) only when `trust_pickle=True`: unpickling can run code hidden in the file."""
    from rnnkit.data._files import existing_file
    from rnnkit.data.errors import DataError
    from rnnkit.train.io import load_tensors

    file = existing_file(path, "path")
    if file.suffix.lower() == ".safetensors":
        return load_tensors(file)
    if not trust_pickle:
        raise DataError(
            f"{file}: torch.save files are Python pickles, and unpickling a file can run any "
            "code its author put in it, so rnnkit reads them only when asked: pass "
            "trust_pickle=True (--trust-pickle) for a file from a source you trust, or convert "
            "it where it was made with safetensors.torch.save_file(model.state_dict(), PATH)"
        )
    try:
        # Trusted or not, only tensors and plain containers are unpickled (weights_only).
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{file}: not a readable torch.save file ({message})") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded:
        raise DataError(
            f"{file}: holds a {type(loaded).__name__}, expected a non-empty state_dict "
            "(torch.save(module.state_dict(), PATH))"
        )
    bad = [name for name, value in loaded.items() if not isinstance(value, Tensor)]
    if bad or not all(isinstance(name, str) for name in loaded):
        raise DataError(
            f"{file}: the state_dict holds entries that are not named tensors: {bad[:5]}"
        )
    return {name: value.detach().cpu() for name, value in loaded.items()}
