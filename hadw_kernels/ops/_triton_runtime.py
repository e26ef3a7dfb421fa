"""What every Triton launcher of the package shares: whether kernels are interpreted, the fix that lets triton 3.6's
interpreter run them, and output allocation (poisoned with NaN in tests).

Triton versions: the kernels support 3.6 and 3.7.x. The compiled kernels are the same source on both versions
(tests/test_triton_aot.py compiles every launch variant for sm_90 with the installed triton; CI pins 3.7.1, and 3.6
is the version a GPU machine may come with). The difference is in the interpreter (TRITON_INTERPRET=1, how CI runs
the kernels on CPU tensors): triton 3.6 holds every scalar, a kernel argument or a program id alike, as a 1-element
numpy array and turns a `range` bound into a Python int with `int(array)`, which numpy >= 2.4 refuses ("only
0-dimensional arrays can be converted to Python scalars"). So under 3.6 every loop whose bound is not a constexpr
fails, the grid-stride loop over row blocks and the loop over tokens alike. triton 3.7 squeezes the array first
(triton-lang/triton#9172); `fix_interpreter` applies that same one-line change to 3.6's interpreter. The
alternative, rewriting each loop as a `while` loop (whose condition 3.6 evaluates with bool(), which numpy still
allows), would change the compiled code (scf.while is not software-pipelined) to work around a bug in a test tool.
"""

from __future__ import annotations

import os

import torch
import triton

_FIXED: list[bool] = []

POISON_OUTPUTS = False
"""Test switch: allocate every kernel output with NaN (-1 for integers, True for bool) instead of torch.empty, so
an element a kernel does not write fails loudly."""


def alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A kernel output (see POISON_OUTPUTS)."""
    if POISON_OUTPUTS:
        fill = float("nan") if dtype.is_floating_point else (True if dtype == torch.bool else -1)
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def interpreting() -> bool:
    """Whether triton runs kernels in its interpreter (TRITON_INTERPRET set and not 0), decided as triton decides."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def fix_interpreter() -> None:
    """Backport triton 3.7's `tensor.__index__` (squeeze, then int) to the 3.6 interpreter. Idempotent; does nothing
    when the kernels are compiled or triton is 3.7 or newer. Call it before the first interpreted launch."""
    if _FIXED or not interpreting() or _version(triton.__version__) >= (3, 7):
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_squeezing_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_squeezing_index
    _FIXED.append(True)
