"""What a backend needs to know about a layer: the cell and its sizes, nothing about modules."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU", "LN_LSTM", "LN_GRU")


@dataclass(frozen=True)
class LayerSpec:
    """One recurrent layer as the kernels see it.

    Weights per direction are `(w_ih, w_hh, b_ih, b_hh)` plus `w_hr` for LSTM (None without
    projection); biases are None when `bias=False`. States per direction are `(h,)` or `(h, c)`.
    The layer-normalised cells (LN_LSTM, LN_GRU) add their gains and shifts after the four
    (`rnnkit.cells.layer_norm`). `recurrent_dropout` and `zoneout` (hidden, cell) change the
    recurrence itself (`rnnkit.variants.regularization`); `training` says whether they sample
    masks or take their evaluation form.
    """

    mode: str
    hidden_size: int
    proj_size: int = 0
    reset_after: bool = True
    bias: bool = True
    bidirectional: bool = False
    recurrent_dropout: float = 0.0
    zoneout: tuple[float, float] = (0.0, 0.0)
    training: bool = False

    @property
    def output_size(self) -> int:
        """Width of h per direction: proj_size for a projected LSTM, else hidden_size."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def state_sizes(self) -> tuple[int, ...]:
        """Widths of one direction's state tensors: (h,) or (h, c)."""
        if self.mode in ("LSTM", "LN_LSTM"):
            return (self.output_size, self.hidden_size)
        return (self.hidden_size,)
