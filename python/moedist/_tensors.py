"""Tensors in and out: torch tensors and numpy arrays are viewed in place by the extension (DLPack or
the buffer protocol, no copy); results come back as the caller's kind of tensor."""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import numpy.typing as npt

from . import _moedist
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


def detached(t: Any) -> Any:
    """What the operators read of a torch tensor that requires grad: its data (they have no autograd
    formula); anything else as it is."""
    return t.detach() if is_torch(t) and t.requires_grad else t


def matrix(name: str, t: Any) -> Tuple[int, int]:
    """(rows, cols) of a 2-D tensor argument, or a ValidationError as the C++ checks would raise it."""
    shape = tuple(t.shape)
    if len(shape) != 2:
        raise ValidationError(f"{name}.dim() = {len(shape)}: must be 2", "invalid_shape", f"{name}.dim()",
                              str(len(shape)), "must be 2")
    return int(shape[0]), int(shape[1])


# One output of a dispatch: its shape, and its dtype by name ("x": the dtype of the call's x).
OutputSpec = Tuple[Tuple[int, ...], str]


def dispatch_outputs(x: Any, expert_ids: Any, quant_mode: int, config: Dict[str, int], version: int) -> List[OutputSpec]:
    """The seven outputs of dispatch (version 1) or dispatch_v2 (2), from the arguments alone: the static
    shapes of the registered ops' fakes (_custom_ops.py) and of the CUDA path's results (_cuda.py).
    V1: expand_x (R, H), dynamic_scales (R,), expand_idx (BS * K,); V2: expand_x (R, H), dynamic_scales
    (R,), assist_info_for_combine (max(BS * K, 128 * A),); both: expert_token_nums (L,), ep_recv_counts,
    tp_recv_counts (T,), then expand_scales (R,) in V1 and (A,) in V2; R is capacity's max_receive_rows."""
    bs, h = matrix("x", x)
    ids_rows, k = matrix("expert_ids", expert_ids)
    if ids_rows != bs:
        raise ValidationError(f"expert_ids.shape = ({ids_rows}, {k}): must have BS = x.shape[0] = {bs} rows",
                              "invalid_shape", "expert_ids.shape", f"({ids_rows}, {k})",
                              f"must have BS = x.shape[0] = {bs} rows")
    cap = _moedist.capacity(config, bs, k, h, quant_mode, version)
    rows, a = cap["max_receive_rows"], cap["A"]
    third = ((bs * k,), "int32") if version == 1 else ((max(bs * k, 128 * a),), "int32")
    return [((rows, h), "int8" if quant_mode == 2 else "x"), ((rows,), "float32"), third,
            ((cap["local_expert_num"],), "int64"), ((cap["ep_recv_counts_len"],), "int32"),
            ((max(config["tp_world_size"], 0),), "int32"), ((rows if version == 1 else a,), "float32")]


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
