"""Tensors in and out: torch tensors and numpy arrays are viewed in place by the extension (DLPack or
the buffer protocol, no copy); results come back as the caller's kind of tensor."""
from __future__ import annotations

import sys
from typing import Any, Optional, Tuple

import numpy as np
import numpy.typing as npt

from ._errors import ValidationError
from ._moedist import ViewAs


class BFloat16Array:
    """A numpy uint16 array whose elements are bfloat16 bit patterns (numpy has no bfloat16).

    Pass one wherever torch_npu takes a bfloat16 tensor (``x`` of dispatch, ``expand_x`` of combine);
    bfloat16 results for numpy callers come back as plain uint16 arrays of bit patterns, which
    ``moedist.bfloat16()`` turns into inputs again."""

    array: np.ndarray

    def __init__(self, array: npt.ArrayLike) -> None:
        array = np.asarray(array)
        if array.dtype not in (np.uint16, np.int16):
            raise ValidationError(f"bfloat16: the array has dtype {array.dtype}: must be uint16 (bfloat16 bit patterns)",
                                  "invalid_dtype", "bfloat16", str(array.dtype), "must be uint16 (bfloat16 bit patterns)")
        self.array = array

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.array.shape)

    def __repr__(self) -> str:
        return f"moedist.bfloat16({self.array!r})"


def bfloat16(array: npt.ArrayLike | BFloat16Array) -> BFloat16Array:
    """Marks a numpy uint16 array as bfloat16 bit patterns (see BFloat16Array)."""
    return array if isinstance(array, BFloat16Array) else BFloat16Array(array)


def is_torch(t: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(t, torch.Tensor)


def prepare(name: str, t: Any) -> Tuple[Any, ViewAs, Optional[str]]:
    """(object for the extension, how it reads the elements: a _moedist.ViewAs, 'torch' | 'numpy' | None).
    ``name`` is the torch_npu parameter name, for errors."""
    if t is None:
        return None, ViewAs.native, None
    torch = sys.modules.get("torch")
    # The common case first, in a handful of attribute reads: a plain dense CPU tensor of a dtype DLPack
    # exports, that does not require grad.
    if torch is not None and type(t) is torch.Tensor and t.is_cpu and t.layout is torch.strided and \
            not t.requires_grad and t.dtype is not torch.bool:
        return t, ViewAs.native, "torch"
    if isinstance(t, BFloat16Array):
        return t.array, ViewAs.bfloat16, "numpy"
    if torch is not None and isinstance(t, torch.Tensor):
        if t.device.type != "cpu":
            raise ValidationError(f"{name}.device = {t.device}: must be the CPU (moedist's Python package runs on CPU tensors)",
                                  "invalid_argument", f"{name}.device", str(t.device), "must be the CPU")
        if t.layout != torch.strided:
            raise ValidationError(f"{name}.layout = {t.layout}: must be torch.strided (a dense tensor)", "invalid_argument",
                                  f"{name}.layout", str(t.layout), "must be torch.strided (a dense tensor)")
        if t.requires_grad:
            t = t.detach()  # DLPack cannot export a tensor that requires grad
        if t.dtype == torch.bool:  # torch 1.13's DLPack refuses bool: its bytes, read as bools, without a copy
            return t.view(torch.uint8), ViewAs.boolean, "torch"
        return t, ViewAs.native, "torch"
    if isinstance(t, np.ndarray):
        return t, ViewAs.native, "numpy"
    return t, ViewAs.native, None  # the extension names the parameter and says what it must be


def kind_of(t: object) -> str:
    """The kind of tensor results come back as: 'torch' for a torch tensor, else 'numpy'."""
    return "torch" if is_torch(t) else "numpy"


def is_bfloat16(t: Any) -> bool:
    if isinstance(t, BFloat16Array):
        return True
    if is_torch(t):
        import torch
        return bool(t.dtype == torch.bfloat16)
    return False


def output(array: np.ndarray, kind: str, bfloat16_bits: bool) -> Any:
    """A result array as the caller's kind of tensor (zero-copy for torch: torch.from_numpy)."""
    if kind != "torch":
        return array
    torch = sys.modules["torch"]  # the caller passed torch tensors: torch is imported
    if bfloat16_bits:  # torch.from_numpy takes no uint16: reinterpret as int16, then as bfloat16
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
