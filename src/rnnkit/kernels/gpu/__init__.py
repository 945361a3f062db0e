"""Fused GPU kernels (Triton): forward and hand-derived backpropagation through time.

Each cell file (lstm.py, gru.py, rnn.py) exports `run_direction(x, state, weights, lengths,
reverse, ...)`, and layer_norm.py (LN_LSTM, LN_GRU) `run_direction(mode, x, ...)`: (T, B, I)
input -> ((T, B, H) output, final state tuple), differentiable through its own
torch.autograd.Function. This package turns them into the dispatch's backend. Triton is
imported only when this package is (the dispatch does that lazily), and a missing Triton is a
reason the backend gives, not an import error. On CPU tensors the kernels run only under
Triton's interpreter (TRITON_INTERPRET=1), which the tests use; "auto" never picks this backend
for CPU tensors.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from rnnkit.scan import run_layer_reference
from rnnkit.spec import LayerSpec
from rnnkit.variants.regularization import draw_masks, in_loop_regularizers

_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Triton's interpreter multiplies the raw bit patterns in tl.dot on bfloat16 operands (reproduced
# with 3.9.0; triton-lang/triton#11584, "not supported yet"), so bfloat16 runs only on CUDA.
_INTERPRETER_DTYPES = (torch.float32, torch.float64, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class GPUBackend:
    """Runs each direction of a layer through the cell's fused Triton kernels."""

    takes_zero_state = False  # the dispatch makes zero tensors for hx None

    def unsupported_reason(self, spec: LayerSpec, x: Tensor, lengths: Tensor | None) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install triton)"
        if x.device.type == "cpu":
            if not _interpreting():
                return "input is on the CPU and TRITON_INTERPRET=1 is not set"
            dtype = _compute_dtype(x)
            if dtype not in _INTERPRETER_DTYPES:
                return (
                    f"dtype {dtype} is not float32, float64 or float16 under Triton's interpreter"
                )
        elif x.device.type != "cuda":
            return f"input is on {x.device}, not a CUDA device"
        elif _compute_dtype(x) not in _CUDA_DTYPES:
            return f"dtype {_compute_dtype(x)} is not float32, float64, float16 or bfloat16"
        if spec.proj_size > 0:
            return "LSTM with proj_size > 0 is not covered by the gpu kernel"
        regularizers = in_loop_regularizers(spec)
        if regularizers is not None:
            reason = _in_loop_unsupported_reason(spec, x)
            if reason is not None:
                return f"{regularizers}: {reason}"
        # The kernels index (T, B, 4H) buffers with 32-bit offsets.
        if x.size(0) * x.size(1) * 4 * spec.hidden_size >= 2**31:
            return f"T * B * 4 * hidden_size >= 2**31 (T={x.size(0)}, B={x.size(1)})"
        return None

    def elementwise_unsupported_reason(self, x: Tensor) -> str | None:
        """Why the element-wise walks (minimal.py: MinGRU, MinLSTM, IndRNN) cannot run x, or None."""
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install triton)"
        if x.device.type == "cpu":
            if not _interpreting():
                return "input is on the CPU and TRITON_INTERPRET=1 is not set"
            if x.dtype not in (torch.float32, torch.float64):
                return f"dtype {x.dtype} is not float32 or float64 under Triton's interpreter"
            return None
        if x.device.type != "cuda":
            return f"input is on {x.device}, not a CUDA device"
        if x.dtype not in _CUDA_DTYPES:
            return f"dtype {x.dtype} is not float32, float64, float16 or bfloat16"
        return None

    def run_layer(self, spec, x, hx, weights, lengths):
        if x.size(1) == 0:
            return run_layer_reference(spec, x, hx, weights, lengths)
        from rnnkit.kernels.gpu import gru, layer_norm, lstm, rnn
        from rnnkit.kernels.gpu._common import InLoop

        dtype = _compute_dtype(x)
        if dtype != x.dtype:
            x = x.to(dtype)
            weights = [tuple(None if w is None else w.to(dtype) for w in ws) for ws in weights]
        outputs, finals = [], []
        regularized = in_loop_regularizers(spec) is not None
        # The kernels choose their own precisions: autocast must not recast inside them.
        with torch.autocast(x.device.type, enabled=False):
            for direction, (state, direction_weights) in enumerate(zip(hx, weights)):
                reverse = direction == 1
                in_loop = None
                if regularized:  # drawn per direction before it runs, as the reference loop does
                    in_loop = InLoop(*_flatten_masks(draw_masks(spec, tuple(state), x.size(0))))
                if spec.mode in layer_norm.MODES:
                    output, final = layer_norm.run_direction(
                        spec.mode, x, state, direction_weights, lengths, reverse, in_loop=in_loop
                    )
                elif spec.mode == "LSTM":
                    output, final = lstm.run_direction(
                        x, state, direction_weights, lengths, reverse, in_loop=in_loop
                    )
                elif spec.mode == "GRU":
                    output, final = gru.run_direction(
                        x,
                        state,
                        direction_weights,
                        lengths,
                        reverse,
                        reset_after=spec.reset_after,
                        in_loop=in_loop,
                    )
                else:
                    nonlinearity = "tanh" if spec.mode == "RNN_TANH" else "relu"
                    output, final = rnn.run_direction(
                        x,
                        state,
                        direction_weights,
                        lengths,
                        reverse,
                        nonlinearity=nonlinearity,
                        in_loop=in_loop,
                    )
                outputs.append(output)
                finals.append(final)
        output = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
        return output, finals


def _flatten_masks(masks) -> tuple:
    """draw_masks' (recurrent, [zoneout h, zoneout c]) -> (mask, keep_h, keep_c)."""
    recurrent, zoneout = masks
    return recurrent, zoneout[0], zoneout[1] if len(zoneout) > 1 else None


def _in_loop_unsupported_reason(spec: LayerSpec, x: Tensor) -> str | None:
    """Why the gpu kernels cannot run this layer's recurrent dropout and zoneout, or None: the
    RNN's resident kernel and the LSTM's and GRU's slice kernels take them where the recurrent
    weights fit (kernels/gpu/_common.py), the layer-normalised cells' kernels at any size."""
    if spec.mode in ("LN_LSTM", "LN_GRU"):
        return None  # their kernels read W_hh from memory at every step: any size fits
    from rnnkit.kernels.gpu import _common, gru, lstm, rnn

    dtype = _compute_dtype(x)
    like = x if x.dtype == dtype else x.new_empty(0, dtype=dtype)  # the plans read its dtype
    hidden, batch = spec.hidden_size, max(x.size(1), 1)
    if spec.mode == "GRU" and not spec.reset_after:
        return "the gpu kernels take them for the GRU with reset_after=True only"
    if spec.mode in ("RNN_TANH", "RNN_RELU"):
        fits = rnn.resident_plan(rnn.rnn_resident_forward_kernel, batch, hidden, like)
    elif spec.mode == "LSTM":
        fits = _common.slice_tiling(lstm.lstm_slice_forward_kernel, batch, hidden, 4, like)
    else:
        fits = _common.slice_tiling(gru.gru_slice_forward_kernel, batch, hidden, 3, like)
    return None if fits is not None else _common.regularizers_do_not_fit(hidden, like)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device (and x is not float64), else x's."""
    device_type = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
    return x.dtype


def warmup(
    device: str | torch.device = "cuda",
    dtypes: tuple[torch.dtype, ...] = (torch.float32,),
    hidden_sizes: tuple[int, ...] = (16, 20),
) -> None:
    """Compile (or load from Triton's disk cache) the kernel variants of these hidden sizes.

    Triton compiles a variant per dtype, direction, training or inference forward, hidden-size
    alignment (a multiple of 16 or not) and tile: the tiles grow with the hidden size (the split
    kernels' up to 32 x 64, the resident and slice kernels' to the next power of two up to 256),
    so a layer of another width compiles its own variants on its first call, a few seconds each,
    and Triton keeps them on disk from then on. The default sizes cover both alignments.
    """
    from rnnkit.layers import GRU, LSTM, RNN
    from rnnkit.variants.indrnn import IndRNN
    from rnnkit.variants.layer_norm import LayerNormGRU, LayerNormLSTM
    from rnnkit.variants.minimal import MinGRU, MinLSTM

    cells = [
        (LSTM, {}),
        (GRU, {}),
        (GRU, {"reset_after": False}),
        (RNN, {}),
        (RNN, {"nonlinearity": "relu"}),
        (LayerNormLSTM, {}),
        (LayerNormGRU, {}),
        (MinGRU, {}),
        (MinLSTM, {}),
        (IndRNN, {}),
        (IndRNN, {"nonlinearity": "tanh"}),
    ]
    for dtype in dtypes:
        for hidden in hidden_sizes:
            for layer_class, options in cells:
                layer = layer_class(
                    2,
                    hidden,
                    bidirectional=True,
                    backend="gpu",
                    device=device,
                    dtype=dtype,
                    **options,
                )
                x = torch.randn(2, 1, 2, device=device, dtype=dtype)
                with torch.no_grad():
                    layer(x)
                output, _ = layer(x.requires_grad_())
                output.sum().backward()


backend = GPUBackend()
