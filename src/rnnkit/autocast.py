"""Running a layer under torch.autocast, as torch.nn's recurrent layers run there.

Under autocast the input of a layer is often the output of an autocast op (a Linear's, say) in
autocast's dtype while the layer's weights stay float32. torch.nn's LSTM and RNN then run in
autocast's dtype. rnnkit's layers take the input and the state in the weights' dtype. On CUDA the
fused kernels then compute in autocast's dtype themselves (kernels/gpu). On the CPU, whose fused
kernels take float32 and float64 only, the layer runs with autocast off and gives its results in
autocast's dtype, as torch.nn.LSTM does there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence


def autocast_dtype(weight: Tensor) -> torch.dtype | None:
    """The dtype autocast casts to on `weight`'s device type where it is on there and the
    weights are not float64 (which autocast leaves alone), else None."""
    if weight.dtype == torch.float64:
        return None
    device_type = "cpu" if weight.is_cpu else weight.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know ("meta", say)
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def run_under_autocast(
    forward: Callable[..., tuple[Any, Any]], weight: Tensor, input, hx, *args, **kwargs
) -> tuple[Any, Any]:
    """forward(input, hx, *args, **kwargs) -> (output, state) of a layer whose weight is
    `weight`, under autocast (autocast_dtype(weight) is not None): floating input and state in
    the weights' dtype (anything else goes through untouched, for forward to reject); on the
    CPU with autocast off and the output and state returned in autocast's dtype."""
    dtype = autocast_dtype(weight)
    input, hx = in_weights_dtype(input, weight), in_weights_dtype(hx, weight)
    if weight.device.type != "cpu":
        return forward(input, hx, *args, **kwargs)
    with torch.autocast("cpu", enabled=False):
        output, state = forward(input, hx, *args, **kwargs)
    return _map_floating((output, state), lambda tensor: tensor.to(dtype))


def in_weights_dtype(value, weight: Tensor):
    """`value` (a tensor, PackedSequence, tuple or list of them) with its floating tensors in
    `weight`'s dtype."""
    return _map_floating(value, lambda tensor: tensor.to(weight.dtype))


def _map_floating(value, function: Callable[[Tensor], Tensor]):
    """`value` with function applied to each floating tensor in it (a tensor, a PackedSequence's
    data, or the items of a plain tuple or list); everything else as it is."""
    if isinstance(value, PackedSequence):
        return value._replace(data=_map_floating(value.data, function))
    if isinstance(value, Tensor):
        return function(value) if value.is_floating_point() else value
    if type(value) in (tuple, list):
        return type(value)(_map_floating(item, function) for item in value)
    return value
