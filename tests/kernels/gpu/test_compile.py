"""Every Triton kernel compiles for a Hopper GPU (sm_90) without one, as the real backend would.

Triton's interpreter accepts programs the compiler rejects (types, layouts, dot shapes), so this
checks the compiled path on CPU-only machines: triton.compile lowers each kernel variant through
TTIR, TTGIR, LLVM and PTX to a cubin with the ptxas that ships in the triton wheel. It runs in a
subprocess because this process may hold interpreted kernels (test_interpreter.py).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

COMPILE_ALL = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rnnkit.kernels.gpu import gru, layer_norm, lstm, minimal, rnn

TARGET = GPUTarget("cuda", 90, 32)


def compile_variant(kernel, pointers, constants, num_warps=4):
    signature = {
        name: pointers.get(name, "constexpr" if name in constants else "i32")
        for name in kernel.arg_names
    }
    defaults = {"BLOCK_B": 16, "BLOCK_N": 32, "BLOCK_K": 64, "REVERSE": True, "SPLIT": True,
                "PREFETCH": True}
    constants = {
        name: value for name, value in (defaults | constants).items() if name in kernel.arg_names
    }
    source = ASTSource(kernel, signature, constants)
    compiled = triton.compile(source, target=TARGET, options={"num_warps": num_warps})
    assert compiled.asm["cubin"], kernel.__name__
    print(kernel.__name__, sorted(constants.items()), "ok", flush=True)


def pointers(names, dtype, acc="fp32"):
    table = {"lengths_ptr": "*i32", "counter_ptr": "*i32"}
    for name in names:
        table.setdefault(name, "*" + (dtype if name in ("xp_ptr", "w_hh_ptr", "out_ptr") else acc))
    return table


for dtype, precision in (("fp32", "ieee"), ("bf16", "ieee")):
    lstm_forward = ["xp_ptr", "w_hh_ptr", "h_buf_ptr", "c_ptr", "out_ptr", "gates_ptr", "cells_ptr"]
    compile_variant(lstm.lstm_forward_kernel, pointers(lstm_forward, dtype),
                    {"SAVE": True, "PRECISION": precision})
    if dtype == "bf16":
        break
    lstm_backward = ["dout_ptr", "dh_buf_ptr", "dc_ptr", "gates_ptr", "cells_ptr", "c0_ptr",
                     "w_hh_ptr", "dpre_ptr"]
    compile_variant(lstm.lstm_backward_kernel, pointers(lstm_backward, dtype),
                    {"PRECISION": precision})
    rnn_forward = ["xp_ptr", "w_hh_ptr", "h_buf_ptr", "out_ptr"]
    compile_variant(rnn.rnn_forward_kernel, pointers(rnn_forward, dtype),
                    {"RELU": False, "PRECISION": precision})
    rnn_backward = ["dout_ptr", "dh_buf_ptr", "out_ptr", "w_hh_ptr", "dpre_ptr"]
    compile_variant(rnn.rnn_backward_kernel, pointers(rnn_backward, dtype),
                    {"RELU": True, "PRECISION": precision})
    # The on-chip kernels at their widest tiles, with the warps and TF32 products they run with,
    # plain and with the in-loop regularisers (recurrent dropout, zoneout masks).
    regularizer_pointers = ["mask_ptr", "keep_ptr", "keep_h_ptr", "keep_c_ptr", "cand_ptr",
                            "cand_c_ptr"]
    for regularized in (False, True):
        switches = {"DROPOUT": regularized, "ZONEOUT": int(regularized),
                    "ZONEOUT_C": int(regularized)}
        rnn_resident_forward = ["xp_ptr", "w_hh_ptr", "h0_ptr", "out_ptr", "h_n_ptr"]
        compile_variant(rnn.rnn_resident_forward_kernel,
                        pointers(rnn_resident_forward + regularizer_pointers, dtype),
                        {"RELU": False, "PRECISION": "tf32", "BLOCK_H": 128, "SAVE": True}
                        | switches, num_warps=8)
        rnn_resident_backward = ["dout_ptr", "out_ptr", "w_hh_ptr", "dh_n_ptr", "dpre_ptr",
                                 "dh0_ptr"]
        compile_variant(rnn.rnn_resident_backward_kernel,
                        pointers(rnn_resident_backward + regularizer_pointers, dtype),
                        {"RELU": True, "PRECISION": "tf32", "BLOCK_H": 128} | switches,
                        num_warps=8)
        # the slice kernels: hidden 256, 32 units a program
        lstm_slice_forward = ["xp_ptr", "w_hh_ptr", "h_buf_ptr", "c_ptr", "out_ptr", "gates_ptr",
                              "cells_ptr"]
        compile_variant(lstm.lstm_slice_forward_kernel,
                        pointers(lstm_slice_forward + regularizer_pointers, dtype),
                        {"SAVE": True, "PRECISION": "tf32", "BLOCK_H": 256} | switches)
        lstm_slice_backward = ["dout_ptr", "dh_buf_ptr", "dc_ptr", "gates_ptr", "cells_ptr",
                               "c0_ptr", "w_hh_ptr", "dpre_ptr"]
        compile_variant(lstm.lstm_slice_backward_kernel,
                        pointers(lstm_slice_backward + regularizer_pointers, dtype),
                        {"PRECISION": "tf32", "BLOCK_H": 256} | switches)
        gru_slice_forward = ["xp_ptr", "w_hh_ptr", "b_hn_ptr", "h_buf_ptr", "out_ptr",
                             "gates_ptr"]
        compile_variant(gru.gru_slice_forward_kernel,
                        pointers(gru_slice_forward + regularizer_pointers, dtype),
                        {"SAVE": True, "PRECISION": "tf32", "BLOCK_H": 256} | switches)
        gru_slice_backward = ["dout_ptr", "dh_buf_ptr", "gates_ptr", "out_ptr", "h0_ptr",
                              "w_hh_ptr", "dpre_ptr"]
        compile_variant(gru.gru_slice_backward_kernel,
                        pointers(gru_slice_backward + regularizer_pointers, dtype),
                        {"PRECISION": "tf32", "BLOCK_H": 256} | switches)
    for reset_after in (True, False):
        gru_forward = ["xp_ptr", "w_hh_ptr", "b_hn_ptr", "h_buf_ptr", "scratch_ptr", "out_ptr",
                       "gates_ptr"]
        compile_variant(gru.gru_forward_kernel, pointers(gru_forward, dtype),
                        {"RESET_AFTER": reset_after, "SAVE": True, "PRECISION": precision})
        gru_backward = ["dout_ptr", "dh_buf_ptr", "gates_ptr", "out_ptr", "h0_ptr", "w_hh_ptr",
                        "dpre_ptr"]
        compile_variant(gru.gru_backward_kernel, pointers(gru_backward, dtype),
                        {"RESET_AFTER": reset_after, "PRECISION": precision})
    for lstm_cell in (True, False):
        minimal_forward = ["gates_ptr", "h0_ptr", "out_ptr", "final_ptr"]
        compile_variant(minimal.min_scan_forward_kernel, pointers(minimal_forward, dtype),
                        {"LSTM": lstm_cell, "BLOCK": 128})
        minimal_backward = ["gates_ptr", "h0_ptr", "out_ptr", "dout_ptr", "dh_ptr", "dgates_ptr"]
        compile_variant(minimal.min_scan_backward_kernel, pointers(minimal_backward, dtype),
                        {"LSTM": lstm_cell, "BLOCK": 128})
    for relu in (True, False):
        indrnn_forward = ["pre_ptr", "h0_ptr", "u_ptr", "out_ptr", "final_ptr"]
        compile_variant(minimal.indrnn_forward_kernel, pointers(indrnn_forward, dtype),
                        {"RELU": relu, "BLOCK": 128})
        indrnn_backward = ["h0_ptr", "u_ptr", "out_ptr", "dout_ptr", "dh_ptr", "dpre_ptr",
                           "du_ptr"]
        compile_variant(minimal.indrnn_backward_kernel, pointers(indrnn_backward, dtype),
                        {"RELU": relu, "BLOCK": 128})

# The layer-normalised cells' kernels, in float32 and in bfloat16 (autocast): the inputs,
# weights, gains, shifts, masks and output in that dtype, the per-step buffers in float32; in
# float32 also with recurrent dropout and zoneout.
for dtype in ("fp32", "bf16"):
    table = {name: "*" + dtype for name in ("a_x_ptr", "w_hh_ptr", "g_hh_ptr", "b_hh_ptr",
                                             "g_c_ptr", "b_c_ptr", "out_ptr", "d_out_ptr",
                                             "h_prev_ptr", "mask_ptr", "keep_h_ptr",
                                             "keep_c_ptr")}  # fmt: skip
    table["lengths_ptr"] = "*i32"
    names = lambda kernel: {name: table.get(name, "*fp32") for name in kernel.arg_names
                            if name.endswith("_ptr")}  # fmt: skip
    for regularized in ((False, True) if dtype == "fp32" else (False,)):
        layer_norm_constants = {"HAS_BIAS": True, "EPS": 1e-5, "PRECISION": "tf32",
                                "DROPOUT": regularized, "ZONEOUT": int(regularized),
                                "ZONEOUT_C": int(regularized)}  # fmt: skip
        for kernel in (layer_norm.ln_lstm_forward_kernel, layer_norm.ln_gru_forward_kernel):
            compile_variant(kernel, names(kernel), layer_norm_constants | {"SAVE": True})
        for kernel in (layer_norm.ln_lstm_backward_kernel, layer_norm.ln_gru_backward_kernel):
            compile_variant(kernel, names(kernel), layer_norm_constants)
"""


def test_every_kernel_compiles_for_sm90():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed: the gpu kernels cannot be compiled")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"} | {
        "TRITON_DEFAULT_FP_FUSION": "1"
    }
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_ALL],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    if result.returncode != 0 and "ptxas" in result.stderr and "No such file" in result.stderr:
        pytest.skip("this triton wheel ships no ptxas to assemble the PTX")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(" ok") == 41, result.stdout


COMPILE_WITH_LOAD_BARRIER = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rnnkit.kernels.gpu import _common, lstm

assert _common.sync_programs is _common.sync_programs_load
kernel = lstm.lstm_slice_forward_kernel
constants = {"REVERSE": False, "SAVE": True, "BLOCK_B": 16, "BLOCK_N": 32, "BLOCK_H": 128,
             "PRECISION": "tf32", "SPLIT": True, "DROPOUT": False, "ZONEOUT": 0, "ZONEOUT_C": 0,
             "PREFETCH": True}
pointers = {"lengths_ptr": "*i32", "counter_ptr": "*i32"}
signature = {
    name: "constexpr" if name in constants else pointers.get(name, "*fp32")
    if name.endswith("_ptr") else "i32"
    for name in kernel.arg_names
}
compiled = triton.compile(ASTSource(kernel, signature, constants),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
ptx = compiled.asm["ptx"]
print("acquire loads", ptx.count("ld.global.acquire.gpu"), "release", ptx.count(".release."))
"""


def run_with_barrier(barrier: str, script: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment |= {"TRITON_DEFAULT_FP_FUSION": "1", "RNNKIT_GPU_BARRIER": barrier}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300
    )


def test_barrier_polled_with_acquire_loads_compiles_for_sm90():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed: the gpu kernels cannot be compiled")
    result = run_with_barrier("load", COMPILE_WITH_LOAD_BARRIER)
    if result.returncode != 0 and "ptxas" in result.stderr and "No such file" in result.stderr:
        pytest.skip("this triton wheel ships no ptxas to assemble the PTX")
    assert result.returncode == 0, result.stderr[-4000:]
    # one poll in the step loop's barrier, after one release of the arrival
    assert "acquire loads 1 release 1" in result.stdout, result.stdout


def test_unknown_barrier_names_the_variable_and_the_choices():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed: the gpu kernels cannot be imported")
    result = run_with_barrier("spin", "import rnnkit.kernels.gpu._common")
    assert result.returncode != 0
    assert "RNNKIT_GPU_BARRIER must be 'atomic' or 'load', got 'spin'" in result.stderr
