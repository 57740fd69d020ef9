"""Integer arguments, taken as torch's argument parser (which torch_npu's bindings use) takes them: a
Python int or int subclass, a numpy integer, a 0-d integer tensor, any object with ``__index__`` -- but
never a bool, which torch refuses where an int is expected."""
from __future__ import annotations

import operator
import sys
from typing import Any, NoReturn, SupportsIndex

import numpy as np

from ._errors import ValidationError

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# What an integer parameter takes: anything with __index__ (int, numpy integers, 0-d integer tensors).
Integer = SupportsIndex


def _refuse(name: str, value: object, rule: str) -> NoReturn:
    raise ValidationError(f"{name} = {value!r}: {rule}", "invalid_argument", name, repr(value), rule)


def integer(name: str, value: Any, low: int = INT32_MIN, high: int = INT32_MAX) -> int:
    """``value`` as a Python int in [low, high], or a ValidationError naming ``name``, the value and the rule."""
    if type(value) is int and low <= value <= high:  # the common case, first: every call passes a dozen ints
        return value
    if isinstance(value, (bool, np.bool_)):
        _refuse(name, value, "must be an integer, not a bool")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        # torch takes a tensor for an int only when it is 0-d and of an integer dtype.
        if value.dtype == torch.bool:
            _refuse(name, value, "must be an integer, not a bool tensor")
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex:
            _refuse(name, value, "a tensor given for an integer must be 0-d and of an integer dtype")
        if value.device.type == "meta":
            _refuse(name, value, "a tensor given for an integer must hold a value (not on the meta device)")
    try:
        number = operator.index(value)
    except Exception:  # noqa: BLE001 - whatever __index__ raises, the argument is not an integer
        _refuse(name, value, "must be an integer (an int, a numpy integer or a 0-d integer tensor)")
    if not low <= number <= high:
        _refuse(name, value, f"must be an integer in [{low}, {high}]")
    return number
