"""Tensors in and out: torch tensors and numpy arrays are viewed in place by the extension (DLPack or
the buffer protocol, no copy); results come back as the caller's kind of tensor."""
import sys

import numpy as np

from ._errors import ValidationError


class BFloat16Array:
    """A numpy uint16 array whose elements are bfloat16 bit patterns (numpy has no bfloat16).

    Pass one wherever torch_npu takes a bfloat16 tensor (``x`` of dispatch, ``expand_x`` of combine);
    bfloat16 results for numpy callers come back as plain uint16 arrays of bit patterns, which
    ``moedist.bfloat16()`` turns into inputs again."""

    def __init__(self, array):
        array = np.asarray(array)
        if array.dtype not in (np.uint16, np.int16):
            raise ValidationError(f"bfloat16: the array has dtype {array.dtype}: must be uint16 (bfloat16 bit patterns)",
                                  "invalid_dtype", "bfloat16", str(array.dtype), "must be uint16 (bfloat16 bit patterns)")
        self.array = array

    @property
    def shape(self):
        return self.array.shape

    def __repr__(self):
        return f"moedist.bfloat16({self.array!r})"


def bfloat16(array):
    """Marks a numpy uint16 array as bfloat16 bit patterns (see BFloat16Array)."""
    return array if isinstance(array, BFloat16Array) else BFloat16Array(array)


def is_torch(t):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(t, torch.Tensor)


def prepare(t):
    """(object for the extension, holds bfloat16 bit patterns, 'torch' | 'numpy' | None)."""
    if t is None:
        return None, False, None
    if isinstance(t, BFloat16Array):
        return t.array, True, "numpy"
    if is_torch(t):
        return t.detach(), False, "torch"  # DLPack cannot export a tensor that requires grad
    if isinstance(t, np.ndarray):
        return t, False, "numpy"
    return t, False, None  # the extension names the parameter and says what it must be


def is_bfloat16(t):
    if isinstance(t, BFloat16Array):
        return True
    if is_torch(t):
        import torch
        return t.dtype == torch.bfloat16
    return False


def output(array, kind, bfloat16_bits):
    """A result array as the caller's kind of tensor (zero-copy for torch: torch.from_numpy)."""
    if kind != "torch":
        return array
    import torch
    if bfloat16_bits:  # torch.from_numpy takes no uint16: reinterpret as int16, then as bfloat16
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
