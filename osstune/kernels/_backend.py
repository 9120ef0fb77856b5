"""Where our Triton kernels can run: the one place that decides between Triton and plain PyTorch.

Triton compiles for CUDA devices; on CPU it runs only under its interpreter (TRITON_INTERPRET=1, read
by Triton when a kernel module is first imported), which the CPU test suite uses at tiny shapes.
Triton itself is an optional dependency (`pip install osstune[gpu]`), imported only when a kernel runs.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache  # find_spec walks sys.path: too slow to repeat on every kernel call
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def triton_usable(x: torch.Tensor) -> bool:
    """True when our Triton kernels can run on x's device."""
    if not triton_installed():
        return False
    if x.is_cuda:
        return not triton_interpreting()
    return x.device.type == "cpu" and triton_interpreting()


def triton_interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels here, or None when it can."""
    if not triton_installed():
        return "triton is not installed (pip install 'osstune[gpu]')"
    import numpy
    import triton

    def major_minor(version: str) -> tuple[int, int]:
        return tuple(int(p) for p in version.split(".")[:2])  # type: ignore[return-value]

    # numpy 2.4 refuses int() of 1-element arrays, which Triton < 3.7's interpreter uses for loop
    # bounds (triton-lang/triton#9171, fixed in 3.7).
    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        return f"Triton {triton.__version__}'s interpreter needs numpy < 2.4 (found {numpy.__version__}); use triton >= 3.7"
    return None
