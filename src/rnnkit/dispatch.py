"""The one place that decides which implementation runs a recurrent layer, and says why.

Every backend offers the same contract, per layer (all of its directions):

    run_layer(spec, x, hx, weights, lengths) -> (output, final_states)

    x        (T, B, I) time-major input
    hx       one state tuple per direction: (h,) or (h, c), each (B, H_out) / (B, H); None
             for zero states (made here for the backends that do not take None themselves)
    weights  one tuple per direction: (w_ih, w_hh, b_ih, b_hh) [+ (w_hr,) for LSTM]
    lengths  None or a (B,) int64 tensor: steps t >= lengths[b] output zeros and keep the state
    output   (T, B, D * H_out); final_states: one state tuple per direction

and `unsupported_reason(spec, x, lengths) -> str | None`. Layers and cells never import kernels.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from rnnkit.scan import (
    State,
    run_layer_reference,
    run_layer_single_step,
    single_step_covers,
    zero_state,
)
from rnnkit.spec import LayerSpec

BACKENDS = ("auto", "reference", "cpu", "gpu")
_KERNEL_MODULES = {"cpu": "rnnkit.kernels.cpu", "gpu": "rnnkit.kernels.gpu"}


class Backend(Protocol):
    # Whether run_layer takes hx=None for zero states itself (the CPU kernels: a zero state
    # needs no tensor there); the dispatch makes the zero tensors for the others.
    takes_zero_state: bool

    def unsupported_reason(
        self, spec: LayerSpec, x: Tensor, lengths: Tensor | None
    ) -> str | None: ...

    def run_layer(
        self,
        spec: LayerSpec,
        x: Tensor,
        hx: Sequence[State],
        weights: Sequence[Sequence[Tensor | None]],
        lengths: Tensor | None,
    ) -> tuple[Tensor, list[State]]: ...


class ReferenceBackend:
    """The autograd loop: runs everything, slowly."""

    takes_zero_state = False

    def unsupported_reason(self, spec: LayerSpec, x: Tensor, lengths: Tensor | None) -> None:
        return None

    def run_layer(self, spec, x, hx, weights, lengths):
        return run_layer_reference(spec, x, hx, weights, lengths)


class SingleStepBackend:
    """One time step: torch's own fused cell ops (those of torch.nn's cells). There is no loop
    over time to fuse, and a fused kernel's set-up (its arguments, buffers and batch parts) cost
    more than the step: a decoder that calls a layer once per step ran slower through the kernels
    than through torch.nn."""

    takes_zero_state = False

    def unsupported_reason(self, spec: LayerSpec, x: Tensor, lengths: Tensor | None) -> str | None:
        # CUDA tensors keep the Triton path: not measured against torch's cell ops on a GPU.
        if x.size(0) != 1 or not x.is_cpu or not single_step_covers(spec):
            return "not one time step of a plain layer on the CPU"
        return None

    def run_layer(self, spec, x, hx, weights, lengths):
        return run_layer_single_step(spec, x, hx, weights)


_loaded: dict[str, Backend | str] = {"reference": ReferenceBackend()}
_SINGLE_STEP = SingleStepBackend()


def check_backend_name(owner: str, backend: str) -> str:
    """Validate a backend argument where it enters (a layer's constructor)."""
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _load(name: str) -> Backend | str:
    """The backend object, or a string saying why it cannot be used here."""
    if name not in _loaded and torch.compiler.is_compiling():
        # A first import under torch.compile: outside dynamo's trace, which would otherwise
        # follow the import machinery (and numba's cache lookups) and warn at each builtin.
        return torch.compiler.disable(_import_backend)(name)
    return _import_backend(name)


def _import_backend(name: str) -> Backend | str:
    """_load's import, remembered in _loaded."""
    if name not in _loaded:
        try:
            module = importlib.import_module(_KERNEL_MODULES[name])
        except ImportError as error:
            _loaded[name] = f"the {name} kernels could not be imported ({error})"
        else:
            backend = getattr(module, "backend", None)
            if backend is None:
                backend = f"the {name} kernels are not implemented in this version"
            _loaded[name] = backend
    return _loaded[name]


_is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def _traced_reason() -> str | None:
    """Why the fused kernels cannot run here, or None: torch.export captures only torch
    operations, and torch.func's transforms (grad, vmap, ...) need autograd Functions written
    for them, while the kernels are numba and Triton calls behind hand-written backwards."""
    if _is_exporting is not None and _is_exporting():
        return "torch.export captures the reference loop, not the fused kernels"
    if _transforms_active is not None and _transforms_active():
        return "torch.func's transforms run the reference loop, not the fused kernels"
    return None


def resolve(requested: str, spec: LayerSpec, x: Tensor, lengths: Tensor | None) -> tuple[str, str]:
    """(backend name, reason) for running this layer on this input."""
    name, _, reason = _select(requested, spec, x, lengths, explain=True)
    return name, reason


def _select(
    requested: str, spec: LayerSpec, x: Tensor, lengths: Tensor | None, explain: bool
) -> tuple[str, Backend, str]:
    """(name, backend, reason) for this layer and input. A fused kernel's reason is formatted
    only with `explain`: a layer's forward runs this on every call and has no use for it."""
    reference = _loaded["reference"]
    if requested == "reference":
        return "reference", reference, "backend='reference' was requested"
    # Checked before any kernel is imported: torch.export swaps builtins (math.pow) that
    # numba's typing registry checks on import, and the import would fail.
    traced = _traced_reason()
    if traced is not None:
        if requested == "auto":
            return "reference", reference, f"auto: {traced}"
        raise RuntimeError(
            f"backend={requested!r} cannot run here: {traced}; use backend='auto' or 'reference'"
        )
    if requested == "auto":
        if _SINGLE_STEP.unsupported_reason(spec, x, lengths) is None:
            reason = "auto: one time step: torch's fused cell op (no loop over time to fuse)"
            return "step", _SINGLE_STEP, reason if explain else ""
        candidate = "gpu" if x.is_cuda else "cpu"
        backend = _load(candidate)
        if isinstance(backend, str):
            return "reference", reference, f"auto: {backend}; using the reference loop"
        unsupported = backend.unsupported_reason(spec, x, lengths)
        if unsupported is not None:
            reason = f"auto: the {candidate} kernel does not cover this: {unsupported}"
            return "reference", reference, reason
        reason = f"auto: fused {candidate} kernel for {x.device.type} tensors" if explain else ""
        return candidate, backend, reason
    backend = _load(requested)
    if isinstance(backend, str):
        raise RuntimeError(f"backend={requested!r} is unavailable: {backend}")
    unsupported = backend.unsupported_reason(spec, x, lengths)
    if unsupported is not None:
        raise RuntimeError(f"backend={requested!r} cannot run this layer: {unsupported}")
    return requested, backend, f"backend={requested!r} was requested" if explain else ""


def run_layer(
    requested: str,
    spec: LayerSpec,
    x: Tensor,
    hx: Sequence[State] | None,
    weights: Sequence[Sequence[Tensor | None]],
    lengths: Tensor | None,
) -> tuple[Tensor, list[State]]:
    """Run one layer (all directions) on the backend that `resolve` picks; hx None: zeros."""
    name, backend, _ = _select(requested, spec, x, lengths, explain=False)
    if hx is None and not backend.takes_zero_state:
        hx = [zero_state(spec, x) for _ in range(spec.directions)]
    if name in ("reference", "step"):  # torch operations: traceable as they are
        return backend.run_layer(spec, x, hx, weights, lengths)
    return run_opaque(backend.run_layer, spec, x, hx, weights, lengths)


def run_opaque(function, *arguments):
    """function(*arguments), a fused kernel's call, kept out of torch.compile's tracing: the
    kernels are numba and Triton calls that dynamo cannot trace, so the compiled graph breaks
    around the call instead of tracing the numpy and ctypes glue up to them (which only slowed
    compiling and warned). The reference loop is plain torch, and stays traceable."""
    if torch.jit.is_tracing():
        # The tracer hands sizes over as tensors and cannot record the kernels; without this
        # message numba failed on an argument's type.
        raise RuntimeError(
            "torch.jit.trace cannot record rnnkit's fused kernels (numba and Triton calls); "
            "export RNN/LSTM/GRU layers with rnnkit.export_onnx, or trace a layer with "
            "backend='reference' (the trace then holds its loop unrolled over the traced steps)"
        )
    if torch.compiler.is_compiling():
        # Decorated here, not where defined: torch.compiler.disable imports dynamo (and with it
        # Triton), which importing rnnkit must not; while compiling, dynamo is loaded already.
        return torch.compiler.disable(function)(*arguments)
    return function(*arguments)


def resolve_elementwise(owner: str, requested: str, x: Tensor) -> tuple[str, str]:
    """(backend name, reason) for the layers with an element-wise recurrence (MinGRU, MinLSTM,
    IndRNN): their fused CPU kernels run float32/float64 CPU tensors, their Triton walks CUDA
    tensors, the reference loop the rest."""
    supported = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if requested == "reference":
        return "reference", "backend='reference' was requested"
    traced = _traced_reason()
    if traced is not None:
        if requested == "auto":
            return "reference", f"auto: {traced}"
        raise RuntimeError(
            f"{owner}: backend={requested!r} cannot run here: {traced}; use backend='auto' or "
            "'reference'"
        )
    if requested == "auto":
        if x.is_cuda:
            unsupported = _gpu_elementwise_reason(x)
            if unsupported is None:
                return "gpu", "auto: fused gpu kernel for cuda tensors"
            return "reference", f"auto: {unsupported}; reference loop"
        if supported:
            return "cpu", "auto: fused cpu kernel for cpu tensors"
        return "reference", f"auto: no fused kernel for {x.dtype} on {x.device}; reference loop"
    if requested == "cpu" and supported:
        return "cpu", "backend='cpu' was requested"
    if requested == "gpu":
        unsupported = _gpu_elementwise_reason(x)
        if unsupported is None:
            return "gpu", "backend='gpu' was requested"
        raise RuntimeError(f"{owner}: backend='gpu' is unavailable: {unsupported}")
    raise RuntimeError(
        f"{owner}: backend={requested!r} needs a float32/float64 CPU input for this layer, "
        f"got {x.dtype} on {x.device}"
    )


def _gpu_elementwise_reason(x: Tensor) -> str | None:
    """Why the gpu backend's element-wise kernels cannot run x, or None."""
    backend = _load("gpu")
    if isinstance(backend, str):
        return backend
    return backend.elementwise_unsupported_reason(x)


def explain_backend(module, input, lengths: Tensor | None = None) -> str:
    """Which backend `module(input)` would run on, and why."""
    if hasattr(module, "dispatch_input"):
        x = module.dispatch_input(input, lengths)
        name, reason = resolve_elementwise(type(module).__name__, module.backend, x)
        # Layers with more than one path per backend (MinGRU/MinLSTM modes) say which runs.
        note = module.describe_backend(name) if hasattr(module, "describe_backend") else None
        return reason if note is None else f"{reason}; {note}"
    spec, x, lengths = module.layer_inputs(input, lengths)
    return resolve(module.backend, spec, x, lengths)[1]
