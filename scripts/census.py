"""Count what a piece of PyTorch code dispatches: ops, kernel-launching ops, host syncs, tensors built from
Python data. Used by the census test (the frame step must have no syncs) and by `bench.py census`.

A sync is an op whose result the host must wait for: `.item()`/`bool()`/`int()` on a tensor
(`_local_scalar_dense`), data-dependent shapes (`nonzero`, `masked_select`, `unique`...), and
`.tolist()`/`.numpy()`, which bypass the dispatcher and are counted by wrapping them.

Each launch of one of the step's Triton kernels (`fused_kernels`) is one kernel op, named after the kernel;
what it does inside is not counted (on a CPU that is Triton's interpreter, not the kernel's work).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from tts_service import fused_kernels

TRITON_LAUNCHERS = ("qk_norm_rope_into_cache", "rms_norm", "silu_mul", "sample_top_k", "decode_attention")

SYNC_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten.unique",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.equal",
    "aten.is_nonzero",
    "aten.bincount",
    "aten.histc",
    "aten.repeat_interleave",
}
PYTHON_DATA_OPS = {"aten.lift_fresh", "aten.lift_fresh_copy", "aten.lift"}
NO_KERNEL_OPS = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.lift_fresh"}


@dataclass
class Census:
    ops: int = 0
    kernels: int = 0  # ops that would launch a GPU kernel (views and allocations excluded)
    syncs: int = 0
    python_tensors: int = 0
    by_op: Counter = field(default_factory=Counter)
    sync_ops: Counter = field(default_factory=Counter)

    def per(self, count: int) -> Census:
        """This census divided by `count` (e.g. frames), rounded."""
        return Census(
            ops=round(self.ops / count),
            kernels=round(self.kernels / count),
            syncs=round(self.syncs / count),
            python_tensors=round(self.python_tensors / count),
        )


class _Mode(TorchDispatchMode):
    def __init__(self, census: Census) -> None:
        super().__init__()
        self.census = census

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        c = self.census
        c.ops += 1
        c.by_op[name] += 1
        if name in SYNC_OPS:
            c.syncs += 1
            c.sync_ops[name] += 1
        if name in PYTHON_DATA_OPS:
            c.python_tensors += 1
        if name == "aten._to_copy" and args and getattr(args[0], "device", None) is not None:
            target = (kwargs or {}).get("device")
            if target is not None and torch.device(target).type != args[0].device.type:
                c.syncs += args[0].device.type != "cpu"  # device -> host copies wait for the device
                c.python_tensors += args[0].device.type == "cpu"  # host -> device: data from the host
        out = func(*args, **(kwargs or {}))
        no_op = (  # `.to()` of a tensor already of that dtype and device returns it unchanged
            name == "aten.to" and isinstance(out, torch.Tensor) and out.data_ptr() == args[0].data_ptr()
        )
        if not func.is_view and not no_op and name not in NO_KERNEL_OPS and name not in SYNC_OPS:
            c.kernels += 1
        return out


@contextmanager
def census() -> Iterator[Census]:
    """Count everything dispatched inside the block (this thread only)."""
    result = Census()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def counting(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            result.syncs += 1
            result.sync_ops[f"Tensor.{name}"] += 1
            return original(self, *args, **kwargs)

        return wrapper

    def uncounted(name):  # a launcher's own tensor ops (and the interpreter's) are not the GPU's
        original = getattr(fused_kernels, name)

        def launcher(*args, **kwargs):
            with _disable_current_modes():
                return original(*args, **kwargs)

        return launcher

    def launch(name, *args, **kwargs):  # each kernel it launches is one
        result.ops += 1
        result.kernels += 1
        result.by_op[f"triton.{name}"] += 1
        return launchers["_launch"](name, *args, **kwargs)

    launchers = {name: getattr(fused_kernels, name) for name in (*TRITON_LAUNCHERS, "_launch")}
    for name in originals:
        setattr(torch.Tensor, name, counting(name))
    for name in TRITON_LAUNCHERS:
        setattr(fused_kernels, name, uncounted(name))
    fused_kernels._launch = launch
    try:
        with _Mode(result):
            yield result
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for name, original in launchers.items():
            setattr(fused_kernels, name, original)
