"""Fused CPU kernels for RNN, LSTM and GRU with recurrent dropout and zoneout inside the loop.

The regularisers of rnnkit.variants.regularization that change each step, per direction:
    hm = h * m                  variational (recurrent) dropout: one (B, H) mask m per sequence,
                                on h where it enters the recurrent products (training only)
    h' = k * h + (1 - k) * h~   zoneout: k a fresh 0/1 mask per step in training (its
    c' = k_c * c + (1 - k_c) * c~          probability p in eval), h~ and c~ the cell's new state
The GRU carries the whole h in z * h (only its products see hm). The cell equations are those of
lstm.py, gru.py and rnn.py. Backward per step, given dh (and dc) reaching h' (and c'):
    dh~ = (1 - k) dh,  dc~ = (1 - k_c) dc (+ the LSTM's path through h~)
    the cell's own gate gradients dpre from dh~ (and dc~), as in its plain kernel
    dh_prev = k dh (+ z dh~ for the GRU) + (dpre_rec @ W_hh) * m,  dc_prev = k_c dc + f dc~
and dW_hh = sum over steps of dpre_rec^T hm (r * hm for the GRU's candidate when the reset comes
before its product), one matmul over all T * B rows after the loop. The input projection and
its gradients are autograd's (one matmul outside), and the caller reverses a backward direction,
so the kernels always walk forward in processing order: the masks are drawn in the reference
loop's order (rnnkit.scan) and give the same numbers for the same seed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.kernels.cpu import blas
from rnnkit.kernels.cpu.indrnn import _array, _lengths_array
from rnnkit.kernels.cpu.lstm import _gate_activations, _sigmoid, _tanh
from rnnkit.scan import reverse_padded
from rnnkit.spec import LayerSpec

_jit = njit(cache=True, nogil=True, error_model="numpy")
CELLS = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")


@_jit
def _product(a, b):
    """a (M, K) @ b (K, N) by the BLAS the other CPU kernels use (torch's MKL where it has one)."""
    c = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
    blas.matmul(a, b, c)
    return c


@_jit
def _valid(lengths, step, b):
    return lengths.size == 0 or step < lengths[b]


@_jit
def _split_by_zoneout(d_out, dh, keep, d_new):
    """One row of a step, backward: d_new = (1 - k) (d_out + dh) reaches the cell's new state,
    and dh becomes k (d_out + dh), what zoneout carries straight to the previous state."""
    for j in range(dh.size):
        total = d_out[j] + dh[j]
        d_new[j] = (1 - keep[j]) * total
        dh[j] = keep[j] * total


@_jit
def _add_recurrent_gradient(dh, d_pre_recurrent, w, mask, lengths, step):
    """dh += (d_pre_recurrent @ W_hh) * m on the rows valid at this step: the gradient through
    the recurrent products, which saw the dropped state h * m."""
    d_hm = _product(d_pre_recurrent, w)
    for b in range(dh.shape[0]):
        if _valid(lengths, step, b):
            for j in range(dh.shape[1]):
                dh[b, j] += d_hm[b, j] * mask[b, j]


@_jit
def _rnn_forward(xp, h, wt, lengths, mask, keep, relu, out, cand, hm_all):
    """xp (T, B, H), h (B, H): h0 in, h_n out; wt = W_hh^T; saves h~ and hm per step."""
    steps, batch, hidden = xp.shape
    for s in range(steps):
        hm = h * mask
        hm_all[s] = hm
        recurrent = _product(hm, wt)
        for b in range(batch):
            if not _valid(lengths, s, b):
                out[s, b] = 0
                continue
            new, pre, rec = cand[s, b], xp[s, b], recurrent[b]
            for j in range(hidden):
                new[j] = pre[j] + rec[j]
            if relu:
                for j in range(hidden):
                    new[j] = new[j] if new[j] > 0 else new[j] * 0  # NaN stays NaN
            else:
                for j in range(hidden):
                    new[j] = _tanh(new[j])
            h_row, k = h[b], keep[s, b]
            for j in range(hidden):
                h_row[j] = k[j] * h_row[j] + (1 - k[j]) * new[j]
            out[s, b] = h_row


@_jit
def _rnn_backward(d_out, dh, w, lengths, mask, keep, relu, cand, d_pre):
    """dh: dL/dh_n in, dL/dh0 out; d_pre (T, B, H): dL/d(pre-activation), zero at padding."""
    steps, batch, hidden = d_out.shape
    d_new = np.empty(hidden, dtype=d_out.dtype)
    for s in range(steps - 1, -1, -1):
        for b in range(batch):
            if not _valid(lengths, s, b):
                d_pre[s, b] = 0
                continue
            _split_by_zoneout(d_out[s, b], dh[b], keep[s, b], d_new)
            new, d_row = cand[s, b], d_pre[s, b]
            if relu:
                for j in range(hidden):
                    d_row[j] = d_new[j] if new[j] > 0 else d_new[j] * 0
            else:
                for j in range(hidden):
                    d_row[j] = d_new[j] * (1 - new[j] * new[j])
        _add_recurrent_gradient(dh, d_pre[s], w, mask, lengths, s)


@_jit
def _lstm_forward(xp, h, c, wt, lengths, mask, keep_h, keep_c, out, gates, cand_c, c_prev, hm_all):
    """xp (T, B, 4H) in torch's gate order (i, f, g, o); h, c: initial in, final out."""
    steps, batch, hidden = out.shape
    new_h = np.empty(hidden, dtype=out.dtype)
    for s in range(steps):
        hm = h * mask
        hm_all[s] = hm
        recurrent = _product(hm, wt)
        for b in range(batch):
            if not _valid(lengths, s, b):
                out[s, b] = 0
                continue
            # Loops over whole rows from 0, each writing one array, so that LLVM vectorises them.
            row = gates[s, b]
            pre, rec = xp[s, b], recurrent[b]
            for k in range(4 * hidden):
                row[k] = pre[k] + rec[k]
            _gate_activations(row, hidden)
            c_row, h_row, kc, kh = c[b], h[b], keep_c[s, b], keep_h[s, b]
            c_prev[s, b] = c_row
            cand = cand_c[s, b]
            for j in range(hidden):
                cand[j] = row[hidden + j] * c_row[j] + row[j] * row[2 * hidden + j]
            for j in range(hidden):
                new_h[j] = row[3 * hidden + j] * _tanh(cand[j])
            for j in range(hidden):
                c_row[j] = kc[j] * c_row[j] + (1 - kc[j]) * cand[j]
            for j in range(hidden):
                h_row[j] = kh[j] * h_row[j] + (1 - kh[j]) * new_h[j]
            out[s, b] = h_row


@_jit
def _lstm_backward(d_out, dh, dc, w, lengths, mask, keep_h, keep_c, gates, cand_c, c_prev, d_pre):
    """dh, dc: dL/d(h_n, c_n) in, dL/d(h0, c0) out; d_pre (T, B, 4H), zero at padding."""
    steps, batch, hidden = d_out.shape
    d_new = np.empty(hidden, dtype=d_out.dtype)
    for s in range(steps - 1, -1, -1):
        for b in range(batch):
            if not _valid(lengths, s, b):
                d_pre[s, b] = 0
                continue
            _split_by_zoneout(d_out[s, b], dh[b], keep_h[s, b], d_new)
            for j in range(hidden):
                kc = keep_c[s, b, j]
                d_new_h = d_new[j]
                i = gates[s, b, j]
                f = gates[s, b, hidden + j]
                g = gates[s, b, 2 * hidden + j]
                o = gates[s, b, 3 * hidden + j]
                tanh_c = _tanh(cand_c[s, b, j])
                d_new_c = (1 - kc) * dc[b, j] + d_new_h * o * (1 - tanh_c * tanh_c)
                d_pre[s, b, j] = d_new_c * g * i * (1 - i)
                d_pre[s, b, hidden + j] = d_new_c * c_prev[s, b, j] * f * (1 - f)
                d_pre[s, b, 2 * hidden + j] = d_new_c * i * (1 - g * g)
                d_pre[s, b, 3 * hidden + j] = d_new_h * tanh_c * o * (1 - o)
                dc[b, j] = kc * dc[b, j] + d_new_c * f
        _add_recurrent_gradient(dh, d_pre[s], w, mask, lengths, s)


@_jit
def _gru_forward(
    xp, h, wt_rz, wt_n, b_hn, lengths, mask, keep, reset_after, out, gates, h_prev, hm_all, rhm_all
):
    """xp (T, B, 3H) in torch's gate order (r, z, n); wt_rz, wt_n: W_hh^T's two column blocks.

    Saves r, z, n and (reset_after) hn = hm W_hn^T + b_hn in gates (T, B, 4H), the whole h each
    step started from, hm, and (reset before the product) r * hm.
    """
    steps, batch, hidden = out.shape
    for s in range(steps):
        hm = h * mask
        hm_all[s] = hm
        h_prev[s] = h
        recurrent = _product(hm, wt_rz)
        for b in range(batch):
            for j in range(hidden):
                gates[s, b, j] = _sigmoid(xp[s, b, j] + recurrent[b, j])
                gates[s, b, hidden + j] = _sigmoid(xp[s, b, hidden + j] + recurrent[b, hidden + j])
        if reset_after:
            candidate = _product(hm, wt_n)
            for b in range(batch):
                for j in range(hidden):
                    candidate[b, j] += b_hn[j]
                    gates[s, b, 3 * hidden + j] = candidate[b, j]
                    candidate[b, j] *= gates[s, b, j]
        else:
            rhm = gates[s, :, :hidden] * hm
            rhm_all[s] = rhm
            candidate = _product(rhm, wt_n)
        for b in range(batch):
            if not _valid(lengths, s, b):
                out[s, b] = 0
                continue
            for j in range(hidden):
                n = _tanh(xp[s, b, 2 * hidden + j] + candidate[b, j])
                gates[s, b, 2 * hidden + j] = n
                z = gates[s, b, hidden + j]
                new = (1 - z) * n + z * h[b, j]
                k = keep[s, b, j]
                h[b, j] = k * h[b, j] + (1 - k) * new
                out[s, b, j] = h[b, j]


@_jit
def _gru_backward(
    d_out, dh, w_rz, w_n, lengths, mask, keep, reset_after, gates, h_prev, hm_all, d_pre
):
    """dh: dL/dh_n in, dL/dh0 out; d_pre (T, B, 4H): d(r, z, n pre-activations) and, with
    reset_after, d(hn); zero at padding."""
    steps, batch, hidden = d_out.shape
    d_new_row = np.empty(hidden, dtype=d_out.dtype)
    for s in range(steps - 1, -1, -1):
        for b in range(batch):
            if not _valid(lengths, s, b):
                d_pre[s, b] = 0
                continue
            _split_by_zoneout(d_out[s, b], dh[b], keep[s, b], d_new_row)
            for j in range(hidden):
                d_new = d_new_row[j]
                r = gates[s, b, j]
                z = gates[s, b, hidden + j]
                n = gates[s, b, 2 * hidden + j]
                d_pre_n = d_new * (1 - z) * (1 - n * n)
                d_pre[s, b, hidden + j] = d_new * (h_prev[s, b, j] - n) * z * (1 - z)
                d_pre[s, b, 2 * hidden + j] = d_pre_n
                if reset_after:
                    hn = gates[s, b, 3 * hidden + j]
                    d_pre[s, b, j] = d_pre_n * hn * r * (1 - r)
                    d_pre[s, b, 3 * hidden + j] = d_pre_n * r
                dh[b, j] += d_new * z
        d_rz = np.ascontiguousarray(d_pre[s, :, : 2 * hidden])
        if reset_after:
            _add_recurrent_gradient(dh, d_rz, w_rz, mask, lengths, s)
            d_hn = np.ascontiguousarray(d_pre[s, :, 3 * hidden :])
            _add_recurrent_gradient(dh, d_hn, w_n, mask, lengths, s)
        else:
            d_rhm = _product(np.ascontiguousarray(d_pre[s, :, 2 * hidden : 3 * hidden]), w_n)
            for b in range(batch):
                if _valid(lengths, s, b):
                    for j in range(hidden):
                        r = gates[s, b, j]
                        d_rz[b, j] = d_rhm[b, j] * hm_all[s, b, j] * r * (1 - r)
                        d_pre[s, b, j] = d_rz[b, j]
            d_hm = _product(d_rz, w_rz)
            for b in range(batch):
                if _valid(lengths, s, b):
                    for j in range(hidden):
                        d_hm[b, j] += d_rhm[b, j] * gates[s, b, j]
                        dh[b, j] += d_hm[b, j] * mask[b, j]


def _rows(tensor: Tensor) -> Tensor:
    """(T, B, K) -> (T * B, K)."""
    return tensor.reshape(-1, tensor.size(-1))


def active(spec: LayerSpec) -> bool:
    """Whether the spec's recurrent dropout (training) or zoneout acts inside the loop."""
    return (spec.training and spec.recurrent_dropout > 0) or any(spec.zoneout)


class RegularizedFunction(torch.autograd.Function):
    """One direction's recurrence with its masks: (T, B, G*H) projections -> (T, B, H) output."""

    @staticmethod
    def forward(ctx, xp, h0, c0, w_hh, b_hn, lengths, mask, keep_h, keep_c, mode, reset_after):
        steps, batch, _ = xp.shape
        hidden = w_hh.size(1)
        dtype = xp.dtype
        xp_array = _array(xp)
        h = h0.detach().clone(memory_format=torch.contiguous_format)
        out = torch.empty(steps, batch, hidden, dtype=dtype)
        hm = torch.empty(steps, batch, hidden, dtype=dtype)
        kernel_lengths = _lengths_array(lengths)
        arrays = (_array(mask), _array(keep_h))
        if mode == "LSTM":
            c = c0.detach().clone(memory_format=torch.contiguous_format)
            gates = torch.empty(steps, batch, 4 * hidden, dtype=dtype)
            cand_c, c_prev = torch.empty_like(out), torch.empty_like(out)
            _lstm_forward(
                xp_array, h.numpy(), c.numpy(), _array(w_hh.T), kernel_lengths, *arrays,
                _array(keep_c), out.numpy(), gates.numpy(), cand_c.numpy(), c_prev.numpy(),
                hm.numpy(),
            )  # fmt: skip
            saved = (gates, cand_c, c_prev)
        elif mode == "GRU":
            c = None
            gates = torch.empty(steps, batch, 4 * hidden, dtype=dtype)
            h_prev = torch.empty_like(out)
            rhm = torch.empty_like(out) if not reset_after else torch.empty(0, 0, 0, dtype=dtype)
            wt = w_hh.T
            _gru_forward(
                xp_array, h.numpy(), _array(wt[:, : 2 * hidden]), _array(wt[:, 2 * hidden :]),
                _array(b_hn), kernel_lengths, *arrays, reset_after, out.numpy(), gates.numpy(),
                h_prev.numpy(), hm.numpy(), rhm.numpy(),
            )  # fmt: skip
            saved = (gates, h_prev, rhm)
        else:
            c = None
            cand = torch.empty_like(out)
            _rnn_forward(
                xp_array, h.numpy(), _array(w_hh.T), kernel_lengths, *arrays,
                mode == "RNN_RELU", out.numpy(), cand.numpy(), hm.numpy(),
            )  # fmt: skip
            saved = (cand,)
        ctx.mode, ctx.reset_after = mode, reset_after
        ctx.save_for_backward(w_hh, lengths, mask, keep_h, keep_c, hm, *saved)
        return out, h, c

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h_n, d_c_n):
        w_hh, lengths, mask, keep_h, keep_c, hm, *saved = ctx.saved_tensors
        steps, batch, hidden = hm.shape
        dtype = hm.dtype
        d_out = torch.zeros_like(hm) if d_out is None else d_out.to(dtype).contiguous()
        dh = torch.zeros(batch, hidden, dtype=dtype)
        if d_h_n is not None:
            dh.copy_(d_h_n)
        kernel_lengths = _lengths_array(lengths)
        arrays = (_array(mask), _array(keep_h))
        gates_per_step = {"LSTM": 4, "GRU": 4}.get(ctx.mode, 1)
        d_pre = torch.empty(steps, batch, gates_per_step * hidden, dtype=dtype)
        dc = None
        d_b_hn = None
        if ctx.mode == "LSTM":
            gates, cand_c, c_prev = saved
            dc = torch.zeros(batch, hidden, dtype=dtype)
            if d_c_n is not None:
                dc.copy_(d_c_n)
            _lstm_backward(
                d_out.numpy(), dh.numpy(), dc.numpy(), _array(w_hh), kernel_lengths, *arrays,
                _array(keep_c), gates.numpy(), cand_c.numpy(), c_prev.numpy(), d_pre.numpy(),
            )  # fmt: skip
            d_xp = d_pre
            d_w_hh = _rows(d_pre).T @ _rows(hm)
        elif ctx.mode == "GRU":
            gates, h_prev, rhm = saved
            _gru_backward(
                d_out.numpy(), dh.numpy(), _array(w_hh[: 2 * hidden]), _array(w_hh[2 * hidden :]),
                kernel_lengths, *arrays, ctx.reset_after, gates.numpy(), h_prev.numpy(),
                hm.numpy(), d_pre.numpy(),
            )  # fmt: skip
            d_xp = d_pre[..., : 3 * hidden]
            d_rz = _rows(d_pre[..., : 2 * hidden]).T @ _rows(hm)
            if ctx.reset_after:
                d_w_n = _rows(d_pre[..., 3 * hidden :]).T @ _rows(hm)
                d_b_hn = d_pre[..., 3 * hidden :].sum((0, 1))
            else:
                d_w_n = _rows(d_pre[..., 2 * hidden : 3 * hidden]).T @ _rows(rhm)
            d_w_hh = torch.cat([d_rz, d_w_n])
        else:
            (cand,) = saved
            _rnn_backward(
                d_out.numpy(), dh.numpy(), _array(w_hh), kernel_lengths, *arrays,
                ctx.mode == "RNN_RELU", cand.numpy(), d_pre.numpy(),
            )  # fmt: skip
            d_xp = d_pre
            d_w_hh = _rows(d_pre).T @ _rows(hm)
        if not ctx.needs_input_grad[4]:
            d_b_hn = None
        return d_xp, dh, dc, d_w_hh, d_b_hn, None, None, None, None, None, None


def _masks(spec: LayerSpec, state: tuple[Tensor, ...], steps: int):
    """(B, H) recurrent mask and (T, B, H) zoneout keep weights for h and c, as the kernels take
    them (ones and zeros where off), drawn as the reference loop draws them."""
    from rnnkit.variants.regularization import draw_masks

    recurrent, zoneout = draw_masks(spec, state, steps)
    mask = torch.ones_like(state[0]) if recurrent is None else recurrent
    keeps = []
    for part, keep in zip(state, zoneout):
        if keep is None or isinstance(keep, float):
            keep = torch.full((steps, *part.shape), keep or 0.0, dtype=part.dtype)
        keeps.append(keep)
    return mask, keeps[0], keeps[-1]


def run_direction(
    spec: LayerSpec,
    x: Tensor,
    state: tuple[Tensor, ...],
    weights: tuple[Tensor | None, ...],
    lengths: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(T, B, I) input, (h0,) or (h0, c0) -> (T, B, H) output, final state, with the spec's
    recurrent dropout and zoneout."""
    mode = "RNN" if spec.mode.startswith("RNN") else spec.mode
    if spec.mode not in CELLS or spec.proj_size > 0:
        raise ValueError(f"no regularised kernel for {spec.mode} with proj_size={spec.proj_size}")
    w_ih, w_hh, b_ih, b_hh = weights[:4]
    hidden = w_hh.size(1)
    reset_after = mode == "GRU" and spec.reset_after
    b_hn = torch.zeros(hidden, dtype=x.dtype)
    bias = None
    if b_ih is not None:
        if reset_after:
            bias = b_ih + torch.cat([b_hh[: 2 * hidden], torch.zeros_like(b_hh[2 * hidden :])])
            b_hn = b_hh[2 * hidden :]
        else:
            bias = b_ih + b_hh
    xp = F.linear(x, w_ih, bias)
    if reverse:
        xp = reverse_padded(xp, lengths)
    h0, c0 = state[0], (state[1] if mode == "LSTM" else None)
    mask, keep_h, keep_c = _masks(spec, tuple(state), x.size(0))
    if lengths is not None:
        lengths = lengths.to("cpu", torch.int64).contiguous()
    output, h_n, c_n = RegularizedFunction.apply(
        xp, h0, c0, w_hh, b_hn, lengths, mask, keep_h, keep_c, spec.mode, reset_after
    )
    if reverse:
        output = reverse_padded(output, lengths)
    return output, ((h_n, c_n) if mode == "LSTM" else (h_n,))


def warmup() -> None:
    """Compile (or load from numba's disk cache) every kernel here for float32 and float64."""
    from rnnkit.layers import GRU, LSTM, RNN

    cells = [(LSTM, {}), (GRU, {}), (GRU, {"reset_after": False}), (RNN, {})]
    for dtype in (torch.float32, torch.float64):
        for layer_class, options in cells:
            layer = layer_class(
                2, 3, backend="cpu", dtype=dtype, recurrent_dropout=0.2, zoneout=0.1, **options
            )
            output, _ = layer(torch.randn(2, 1, 2, dtype=dtype))
            output.sum().backward()
