"""Recurrent regularisers, as layer options of RNN, LSTM, GRU and the layer-normalised layers.

    input_dropout      variational dropout on each layer's input x_t (Gal & Ghahramani 2016):
                       one Bernoulli mask per sequence and layer, the same at every time step
    recurrent_dropout  variational dropout on h_{t-1} where it enters the recurrent matmul
                       W_hh h_{t-1}: one mask per sequence, layer and direction, the same at every
                       step (the GRU's carry z * h_{t-1} keeps the undropped state, as in the paper)
    zoneout            (Krueger et al. 2016) each unit of h (and of c for LSTMs) keeps its previous
                       value with probability p at each step: h_t = d * h_{t-1} + (1 - d) * h~_t,
                       d ~ Bernoulli(p) per unit and step; in eval mode its expectation,
                       h_t = p * h_{t-1} + (1 - p) * h~_t. A float applies to h and c, a pair
                       (p_h, p_c) sets them apart.
    weight_drop        DropConnect on W_hh (Merity et al. 2017): one mask over the weight's
                       entries, sampled once per forward and shared by every step and sequence

Dropout masks are scaled by 1 / (1 - p), so that they are the identity in expectation; all of
them are off in eval mode (zoneout takes its expectation form there). input_dropout and
weight_drop act outside the recurrence and run with every fused kernel; recurrent_dropout in
training and zoneout act inside it: the CPU backend runs them for RNN, LSTM and GRU in kernels of
their own (rnnkit.kernels.cpu.regularized) and for the layer-normalised cells in theirs
(rnnkit.kernels.cpu.layer_norm), with the same masks as the reference loop for the same seed;
the GPU backend runs them in its on-chip kernels (rnnkit.kernels.gpu._common) where the recurrent
weights fit and leaves the rest to the reference loop, which `rnnkit.explain_backend` says.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rnnkit.cells.layer_norm import ln_gru_gates
from rnnkit.spec import LayerSpec

Step = Callable[..., tuple[Tensor, ...]]


@dataclass(frozen=True)
class Regularizers:
    """The regularisation options of one layer (probabilities in [0, 1))."""

    input_dropout: float = 0.0
    recurrent_dropout: float = 0.0
    zoneout: tuple[float, float] = (0.0, 0.0)
    weight_drop: float = 0.0


def _probability(owner: str, name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{owner}: {name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_regularizers(
    owner: str,
    mode: str,
    input_dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    zoneout: float | tuple[float, float] = 0.0,
    weight_drop: float = 0.0,
) -> Regularizers:
    """Validate the options where they enter (a layer's constructor)."""
    has_cell = mode in ("LSTM", "LN_LSTM")
    if isinstance(zoneout, (tuple, list)):
        if not has_cell:
            raise ValueError(
                f"{owner}: zoneout must be one number for a layer without a cell state, "
                f"got {zoneout!r}"
            )
        if len(zoneout) != 2:
            raise ValueError(
                f"{owner}: zoneout must be a number or a pair (hidden, cell), got {zoneout!r}"
            )
        pair = (
            _probability(owner, "zoneout[0]", zoneout[0]),
            _probability(owner, "zoneout[1]", zoneout[1]),
        )
    else:
        rate = _probability(owner, "zoneout", zoneout)
        pair = (rate, rate if has_cell else 0.0)
    return Regularizers(
        input_dropout=_probability(owner, "input_dropout", input_dropout),
        recurrent_dropout=_probability(owner, "recurrent_dropout", recurrent_dropout),
        zoneout=pair,
        weight_drop=_probability(owner, "weight_drop", weight_drop),
    )


def in_loop_regularizers(spec: LayerSpec) -> str | None:
    """What of the spec acts inside the recurrence (recurrent dropout in training, zoneout), or None."""
    active = []
    if spec.training and spec.recurrent_dropout > 0:
        active.append(f"recurrent_dropout={spec.recurrent_dropout} in training")
    if any(spec.zoneout):
        active.append(f"zoneout={spec.zoneout} (hidden, cell)")
    return " and ".join(active) or None


# From this many entries on, CPU dropout masks come from the compiled draws (random_masks):
# 0.06 against 0.57 ms at (512, 128), 0.61 against 9.1 ms at (2048, 512) (weight_drop on an
# LSTM's W_hh at H = 512); below it bernoulli_ is faster (6 against 12 us at (1, 64); the
# compiled draws' fixed cost is torch and numpy calls around the loop).
_COMPILED_MASK_MIN = 1024


def dropout_mask(like: Tensor, p: float) -> Tensor:
    """A Bernoulli(1 - p) mask shaped like `like`, scaled by 1 / (1 - p)."""
    keep = 1 - p
    if _compiled_masks(like) and like.numel() >= _COMPILED_MASK_MIN:
        from rnnkit.kernels.cpu.random_masks import bernoulli_mask

        return bernoulli_mask(like.shape, keep, like.dtype).mul_(1 / keep)
    return torch.empty_like(like).bernoulli_(keep) / keep


def _compiled_masks(like: Tensor) -> bool:
    """Whether masks shaped like `like` come from rnnkit.kernels.cpu.random_masks."""
    return like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64)


def drop_input(x: Tensor, p: float, training: bool) -> Tensor:
    """(T, B, I) -> x with one (B, I) mask per sequence, the same at every step (identity in eval)."""
    if not training or p == 0:
        return x
    return x * dropout_mask(x[0], p)


def drop_weights(weights: Sequence[Tensor | None], p: float, training: bool) -> tuple:
    """(w_ih, w_hh, ...) -> the same with a DropConnect mask on w_hh (identity in eval)."""
    if not training or p == 0:
        return tuple(weights)
    w_ih, w_hh, *rest = weights
    return (w_ih, w_hh * dropout_mask(w_hh, p), *rest)


def _update_gate(spec: LayerSpec, x: Tensor, h: Tensor, weights: Sequence[Tensor | None]) -> Tensor:
    """(B, H) update gate z of a GRU step on input x and recurrent input h."""
    if spec.mode == "LN_GRU":
        return ln_gru_gates(x, h, *weights)[1]
    w_ih, w_hh, b_ih, b_hh = weights
    hidden = w_hh.size(1)
    pre = x @ w_ih[hidden : 2 * hidden].T + h @ w_hh[hidden : 2 * hidden].T
    if b_ih is not None:
        pre = pre + b_ih[hidden : 2 * hidden] + b_hh[hidden : 2 * hidden]
    return torch.sigmoid(pre)


def zoneout_mask(like: Tensor, steps: int, p: float) -> Tensor:
    """(steps, *like.shape) 0/1 mask, each entry 1 (keep the old value) with probability p.

    float32/float64 CPU tensors: compiled draws (rnnkit.kernels.cpu.random_masks, seeded from
    torch's default generator, so that torch.manual_seed fixes them; 279 against 2371 us with
    bernoulli_ at (100, 32, 128) here); other tensors: bernoulli_ on their device.
    """
    if not _compiled_masks(like):
        return like.new_empty((steps, *like.shape)).bernoulli_(p)
    from rnnkit.kernels.cpu.random_masks import bernoulli_mask

    return bernoulli_mask((steps, *like.shape), p, like.dtype)


def draw_masks(
    spec: LayerSpec, state: tuple[Tensor, ...], steps: int
) -> tuple[Tensor | None, list[Tensor | float | None]]:
    """One direction's in-loop masks over `steps` steps of a batch shaped like `state`, in the
    order the reference loop and the fused kernels both draw them: the (B, H) recurrent dropout
    mask (None when off), then for each state part (h, then c) its zoneout: a (T, B, H) 0/1
    keep-the-old-value mask in training (zoneout_mask), the probability itself in eval, None
    when off."""
    p_recurrent = spec.recurrent_dropout if spec.training else 0.0
    recurrent = dropout_mask(state[0], p_recurrent) if p_recurrent > 0 else None
    zoneout: list[Tensor | float | None] = []
    for part, rate in zip(state, spec.zoneout):
        if rate == 0:
            zoneout.append(None)
        elif spec.training:
            zoneout.append(zoneout_mask(part, steps, rate))
        else:
            zoneout.append(rate)
    return recurrent, zoneout


def regularized_step(step: Step, spec: LayerSpec, state: tuple[Tensor, ...], steps: int) -> Step:
    """The cell step with the spec's recurrent dropout and zoneout, for one direction's pass of
    `steps` calls over a batch shaped like `state` (masks from draw_masks, step by step)."""
    recurrent_mask, zoneout = draw_masks(spec, state, steps)
    if recurrent_mask is None and all(keep is None for keep in zoneout):
        return step
    gru = spec.mode in ("GRU", "LN_GRU")
    calls = itertools.count()

    def regularized(x: Tensor, state: tuple[Tensor, ...], *weights) -> tuple[Tensor, ...]:
        t = next(calls)
        if recurrent_mask is None:
            new_state = step(x, state, *weights)
        else:
            dropped = state[0] * recurrent_mask
            new_state = step(x, (dropped, *state[1:]), *weights)
            if gru:
                # The step carried the dropped state through z * h; the paper carries h itself.
                z = _update_gate(spec, x, dropped, weights)
                new_state = (new_state[0] + z * (state[0] - dropped),)
        return tuple(
            new
            if keep is None
            else torch.lerp(new, old, keep if isinstance(keep, float) else keep[t])
            for old, new, keep in zip(state, new_state, zoneout)
        )

    return regularized
