"""torch_npu.npu_moe_distribute_dispatch / npu_moe_distribute_combine, with torch_npu's signatures and
defaults (contract §1.1, §1.3), over moedist's C++ groups.

A call takes one of three ways:

* the fast path: a plain eager call -- torch tensors on the CPU, Python ints, a group and configuration
  resolved by an earlier call, no torch mode that must see the call -- is one call of the extension
  (_moedist.dispatch_call / combine_call), which reads the tensors in place and returns fresh torch
  tensors that the C++ call wrote (caller buffers); it answers None for any other call;
* through the registered op: with torch >= 2.1 the operators are also torch custom ops (_custom_ops.py),
  and a call that torch.compile traces, or that a torch mode or a tensor subclass would see, goes through
  ``torch.ops.moedist.*``, whose CPU and CUDA kernels try the fast path and then the eager functions here;
* the eager functions (_dispatch, _combine): everything else -- numpy arrays, other int forms, the first
  call of a group, torch 1.13's modes -- read and checked argument by argument, every mistake named."""
from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Dict, Optional, Tuple

from . import _cuda, _groups, _moedist
from ._errors import ValidationError
from ._integers import Integer, integer
from ._moedist import ViewAs
from ._tensors import detached, is_bfloat16, kind_of, output, prepare

# The parameters of each operator by kind, in torch_npu's order (after the leading positional ones).
_DISPATCH_TENSORS = ("scales", "x_active_mask", "expert_scales")
_DISPATCH_INTS = ("ep_world_size", "ep_rank_id", "moe_expert_num", "tp_world_size", "tp_rank_id", "expert_shard_type",
                  "shared_expert_num", "shared_expert_rank_num", "quant_mode", "global_bs", "expert_token_nums_type")
_COMBINE_TENSORS = ("tp_send_counts", "x_active_mask", "activation_scale", "weight_scale", "group_list",
                    "expand_scales", "shared_expert_x")
_COMBINE_INTS = ("ep_world_size", "ep_rank_id", "moe_expert_num", "tp_world_size", "tp_rank_id", "expert_shard_type",
                 "shared_expert_num", "shared_expert_rank_num", "global_bs", "out_dtype", "comm_quant_mode",
                 "group_list_type")
_CONFIG = _groups.CONFIG_KEYS  # the configuration's ints (the rest are per call)


class _Tensors:
    """The tensor arguments of one call, prepared for the extension (each checked before anything is
    joined or sent): ``[name]`` is the object it reads, ``views`` says which parameters it reads as
    another dtype."""

    def __init__(self, **tensors: Any) -> None:
        self.objects: Dict[str, Any] = {}
        self.views: Dict[str, ViewAs] = {}
        for name, value in tensors.items():
            self.objects[name], view_as, _ = prepare(name, value)
            if view_as != ViewAs.native:
                self.views[name] = view_as

    def __getitem__(self, name: str) -> Any:
        return self.objects[name]


def npu_moe_distribute_dispatch(x: Any, expert_ids: Any, group_ep: str, ep_world_size: Integer, ep_rank_id: Integer,
                                moe_expert_num: Integer, *, scales: Any = None, x_active_mask: Any = None,
                                expert_scales: Any = None, group_tp: str = "", tp_world_size: Integer = 0,
                                tp_rank_id: Integer = 0, expert_shard_type: Integer = 0, shared_expert_num: Integer = 1,
                                shared_expert_rank_num: Integer = 0, quant_mode: Integer = 0, global_bs: Integer = 0,
                                expert_token_nums_type: Integer = 1) -> Tuple[Any, ...]:
    """Sends every token of ``x`` (BS, H) to the ranks of its top-K experts ``expert_ids`` (BS, K).

    Returns (expand_x, dynamic_scales, expand_idx, expert_token_nums, ep_recv_counts, tp_recv_counts,
    expand_scales) as torch_npu does, as torch tensors for torch inputs (on x's device) and numpy arrays for
    numpy inputs. Only the first valid rows of expand_x / dynamic_scales / expand_scales are meaningful, as
    on the NPU (here the rest are zero on the CPU, unspecified on CUDA tensors); the row counts depend on
    the arguments alone (_custom_ops.py). Collective: every rank of the group calls it."""
    if not _is_compiling():
        fast = _dispatch_call(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, scales, x_active_mask,
                              expert_scales, group_tp, tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num,
                              shared_expert_rank_num, quant_mode, global_bs, expert_token_nums_type)
        if fast is not None:
            return fast
    args = dict(scales=scales, x_active_mask=x_active_mask, expert_scales=expert_scales, group_tp=group_tp,
                ep_world_size=ep_world_size, ep_rank_id=ep_rank_id, moe_expert_num=moe_expert_num,
                tp_world_size=tp_world_size, tp_rank_id=tp_rank_id, expert_shard_type=expert_shard_type,
                shared_expert_num=shared_expert_num, shared_expert_rank_num=shared_expert_rank_num,
                quant_mode=quant_mode, global_bs=global_bs, expert_token_nums_type=expert_token_nums_type)
    if _registered_ops is not None and _through_op(x, expert_ids, *(args[name] for name in _DISPATCH_TENSORS)):
        a = _op_arguments(args, _DISPATCH_TENSORS, _DISPATCH_INTS)
        op = _registered_ops[0]
        results: Tuple[Any, ...] = op(detached(x), detached(expert_ids), _group_name("group_ep", group_ep),
                                      a.pop("ep_world_size"), a.pop("ep_rank_id"), a.pop("moe_expert_num"), **a)
        return results
    return _dispatch(x, expert_ids, group_ep, **args)


def _dispatch(x: Any, expert_ids: Any, group_ep: Any, *, ep_world_size: Integer, ep_rank_id: Integer,
              moe_expert_num: Integer, scales: Any, x_active_mask: Any, expert_scales: Any, group_tp: Any,
              tp_world_size: Integer, tp_rank_id: Integer, expert_shard_type: Integer, shared_expert_num: Integer,
              shared_expert_rank_num: Integer, quant_mode: Integer, global_bs: Integer,
              expert_token_nums_type: Integer) -> Tuple[Any, ...]:
    """The eager dispatch (also the registered op's CPU and CUDA kernel)."""
    ints = _ints(locals(), _DISPATCH_INTS)
    config = {name: ints[name] for name in _CONFIG}
    if _cuda.on_cuda(x):
        return _cuda.dispatch(x, expert_ids, group_ep, group_tp, config, ints["quant_mode"],
                              ints["expert_token_nums_type"], scales, x_active_mask, expert_scales)
    tensors = _Tensors(x=x, expert_ids=expert_ids, scales=scales, x_active_mask=x_active_mask, expert_scales=expert_scales)
    group = _groups.group_for(group_ep, group_tp, config)
    results = group.dispatch(x=tensors["x"], expert_ids=tensors["expert_ids"], scales=tensors["scales"],
                             x_active_mask=tensors["x_active_mask"], expert_scales=tensors["expert_scales"],
                             quant_mode=ints["quant_mode"], expert_token_nums_type=ints["expert_token_nums_type"],
                             views=tensors.views)
    expand_x_bf16 = is_bfloat16(x) and ints["quant_mode"] == 0
    kind = kind_of(x)
    return tuple(output(a, kind, expand_x_bf16 and i == 0) for i, a in enumerate(results[:7]))


def npu_moe_distribute_combine(expand_x: Any, expert_ids: Any, expand_idx: Any, ep_send_counts: Any, expert_scales: Any,
                               group_ep: str, ep_world_size: Integer, ep_rank_id: Integer, moe_expert_num: Integer, *,
                               tp_send_counts: Any = None, x_active_mask: Any = None, activation_scale: Any = None,
                               weight_scale: Any = None, group_list: Any = None, expand_scales: Any = None,
                               shared_expert_x: Any = None, group_tp: str = "", tp_world_size: Integer = 0,
                               tp_rank_id: Integer = 0, expert_shard_type: Integer = 0, shared_expert_num: Integer = 1,
                               shared_expert_rank_num: Integer = 0, global_bs: Integer = 0, out_dtype: Integer = 0,
                               comm_quant_mode: Integer = 0, group_list_type: Integer = 0) -> Any:
    """Brings the expert outputs ``expand_x`` (in dispatch's row order) back to their tokens and adds
    them, weighted by ``expert_scales`` (the shared expert unweighted). Returns (BS, H) in expand_x's
    dtype, as the caller's kind of tensor. Collective."""
    if not _is_compiling():
        out = _combine_call(expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, group_ep, ep_world_size,
                            ep_rank_id, moe_expert_num, tp_send_counts, x_active_mask, activation_scale, weight_scale,
                            group_list, expand_scales, shared_expert_x, group_tp, tp_world_size, tp_rank_id,
                            expert_shard_type, shared_expert_num, shared_expert_rank_num, global_bs, out_dtype,
                            comm_quant_mode, group_list_type)
        if out is not None:
            return out
    args = dict(tp_send_counts=tp_send_counts, x_active_mask=x_active_mask, activation_scale=activation_scale,
                weight_scale=weight_scale, group_list=group_list, expand_scales=expand_scales,
                shared_expert_x=shared_expert_x, group_tp=group_tp, ep_world_size=ep_world_size, ep_rank_id=ep_rank_id,
                moe_expert_num=moe_expert_num, tp_world_size=tp_world_size, tp_rank_id=tp_rank_id,
                expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
                shared_expert_rank_num=shared_expert_rank_num, global_bs=global_bs, out_dtype=out_dtype,
                comm_quant_mode=comm_quant_mode, group_list_type=group_list_type)
    if _registered_ops is not None and _through_op(expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales,
                                                   *(args[name] for name in _COMBINE_TENSORS)):
        a = _op_arguments(args, _COMBINE_TENSORS, _COMBINE_INTS)
        return _registered_ops[1](detached(expand_x), detached(expert_ids), detached(expand_idx),
                                  detached(ep_send_counts), detached(expert_scales), _group_name("group_ep", group_ep),
                                  a.pop("ep_world_size"), a.pop("ep_rank_id"), a.pop("moe_expert_num"), **a)
    return _combine(expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, group_ep, **args)


def _combine(expand_x: Any, expert_ids: Any, expand_idx: Any, ep_send_counts: Any, expert_scales: Any, group_ep: Any, *,
             ep_world_size: Integer, ep_rank_id: Integer, moe_expert_num: Integer, tp_send_counts: Any,
             x_active_mask: Any, activation_scale: Any, weight_scale: Any, group_list: Any, expand_scales: Any,
             shared_expert_x: Any, group_tp: Any, tp_world_size: Integer, tp_rank_id: Integer,
             expert_shard_type: Integer, shared_expert_num: Integer, shared_expert_rank_num: Integer,
             global_bs: Integer, out_dtype: Integer, comm_quant_mode: Integer, group_list_type: Integer) -> Any:
    """The eager combine (also the registered op's CPU and CUDA kernel)."""
    ints = _ints(locals(), _COMBINE_INTS)
    config = {name: ints[name] for name in _CONFIG}
    if _cuda.on_cuda(expand_x):
        optional = dict(tp_send_counts=tp_send_counts, x_active_mask=x_active_mask, activation_scale=activation_scale,
                        weight_scale=weight_scale, group_list=group_list, expand_scales=expand_scales,
                        shared_expert_x=shared_expert_x)
        return _cuda.combine(expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, group_ep, group_tp, config,
                             optional, ints["out_dtype"], ints["comm_quant_mode"], ints["group_list_type"])
    # tp_send_counts (T,) is ignored without TP, as on the NPU
    tensors = _Tensors(expand_x=expand_x, expert_ids=expert_ids, expand_idx=expand_idx, ep_send_counts=ep_send_counts,
                       expert_scales=expert_scales, tp_send_counts=tp_send_counts if config["tp_world_size"] == 2 else None,
                       x_active_mask=x_active_mask, activation_scale=activation_scale, weight_scale=weight_scale,
                       group_list=group_list, expand_scales=expand_scales, shared_expert_x=shared_expert_x)
    group = _groups.group_for(group_ep, group_tp, config)
    names = ("expand_x", "expert_ids", "expand_idx", "ep_send_counts", "expert_scales") + _COMBINE_TENSORS
    out = group.combine(**{name: tensors[name] for name in names}, out_dtype=ints["out_dtype"],
                        comm_quant_mode=ints["comm_quant_mode"], group_list_type=ints["group_list_type"],
                        views=tensors.views)
    return output(out, kind_of(expand_x), is_bfloat16(expand_x))


def _ints(args: Dict[str, Any], names: Tuple[str, ...]) -> Dict[str, int]:
    """The int arguments, each read as torch reads an int (_integers.py) or refused by name."""
    return {name: integer(name, args[name]) for name in names}


def _through_op(*tensors: Any) -> bool:
    """Whether a call is made through its registered op: when the op can take its tensors (_op_takes)
    and something would see the difference -- torch.compile tracing, a torch dispatch or function mode
    (fake tensors, make_fx, export, a profiler's record of ops), a tensor subclass, meta tensors. A plain eager call
    runs the op's CPU kernel directly: the same function, without the dispatcher's boxing of some 20
    arguments each way (tens of µs, several times the rest of the Python layer)."""
    if not _op_takes(*tensors):
        return False
    if tensors[0].is_meta:  # all on the meta device (_op_takes): shapes from the op's fake, nothing runs
        return True
    if _compiling() or _current_dispatch_mode() is not None or _torch._C._is_torch_function_mode_enabled():
        return True
    return any(t is not None and type(t) is not _torch.Tensor for t in tensors)


def _op_takes(*tensors: Any) -> bool:
    """Whether a call goes through the registered op: every tensor argument a dense torch tensor, all on
    the CPU, or all on CUDA devices (the op's CUDA kernel names a tensor on another device than x's), or
    all on the meta device (where the op computes shapes only, as torch ops do). numpy arrays,
    mixed kinds or devices and tensors the op could not take (sparse, quantized, other devices) take the
    eager path, which reads what it can and names what it cannot."""
    devices = set()
    for t in tensors:
        if t is None:
            continue
        if not isinstance(t, _torch.Tensor) or t.layout != _torch.strided or t.is_quantized:
            return False
        devices.add(t.device.type)
    return devices == {"cpu"} or devices == {"meta"} or devices == {"cuda"}


def _compiling() -> bool:
    compiler = getattr(_torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return bool(_torch._dynamo.is_compiling())


def _op_arguments(args: Dict[str, Any], tensor_names: Tuple[str, ...], int_names: Tuple[str, ...]) -> Dict[str, Any]:
    """``args`` as a registered op takes them: tensors detached, ints as Python ints (eagerly read as
    torch reads an int, or refused by name; while torch.compile traces they are the graph's constants
    and go as they are), group_tp a string."""
    compiling = _compiling()
    out = {name: detached(args[name]) for name in tensor_names}
    out.update({name: args[name] if compiling else integer(name, args[name]) for name in int_names})
    out["group_tp"] = _group_name("group_tp", args["group_tp"])
    return out


def _group_name(parameter: str, name: object) -> str:
    if not isinstance(name, str):
        raise ValidationError(f"{parameter} = {name!r}: must be a string (a group's name)", "invalid_argument", parameter,
                              repr(name), "must be a string (a group's name)")
    return name


# The registered ops' kernels (CPU and CUDA): torch passes the schema's arguments, kwarg-only ones by name. The fast
# path first (what a compiled graph calls is a plain call), then the eager functions.
def _dispatch_kernel(x: Any, expert_ids: Any, group_ep: str, ep_world_size: int, ep_rank_id: int, moe_expert_num: int,
                     scales: Any = None, x_active_mask: Any = None, expert_scales: Any = None, group_tp: str = "",
                     tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0,
                     shared_expert_num: int = 1, shared_expert_rank_num: int = 0, quant_mode: int = 0,
                     global_bs: int = 0, expert_token_nums_type: int = 1) -> Tuple[Any, ...]:
    results = _dispatch_call(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, scales, x_active_mask,
                             expert_scales, group_tp, tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num,
                             shared_expert_rank_num, quant_mode, global_bs, expert_token_nums_type)
    if results is not None:
        return results
    args = dict(locals())
    del args["results"]
    return _dispatch(args.pop("x"), args.pop("expert_ids"), args.pop("group_ep"), **args)


def _combine_kernel(expand_x: Any, expert_ids: Any, expand_idx: Any, ep_send_counts: Any, expert_scales: Any,
                    group_ep: str, ep_world_size: int, ep_rank_id: int, moe_expert_num: int, tp_send_counts: Any = None,
                    x_active_mask: Any = None, activation_scale: Any = None, weight_scale: Any = None,
                    group_list: Any = None, expand_scales: Any = None, shared_expert_x: Any = None, group_tp: str = "",
                    tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0, shared_expert_num: int = 1,
                    shared_expert_rank_num: int = 0, global_bs: int = 0, out_dtype: int = 0, comm_quant_mode: int = 0,
                    group_list_type: int = 0) -> Any:
    out = _combine_call(expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, group_ep, ep_world_size,
                        ep_rank_id, moe_expert_num, tp_send_counts, x_active_mask, activation_scale, weight_scale,
                        group_list, expand_scales, shared_expert_x, group_tp, tp_world_size, tp_rank_id,
                        expert_shard_type, shared_expert_num, shared_expert_rank_num, global_bs, out_dtype,
                        comm_quant_mode, group_list_type)
    if out is not None:
        return out
    args = dict(locals())
    del args["out"]
    leading = [args.pop(name) for name in ("expand_x", "expert_ids", "expand_idx", "ep_send_counts", "expert_scales",
                                           "group_ep")]
    return _combine(*leading, **args)


def _import_torch() -> Optional[ModuleType]:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _register_ops() -> Optional[Tuple[Any, Any]]:
    """The registered (dispatch, combine) ops where this torch supports them, else None. They are
    registered when moedist is imported (torch with it, where installed), so that torch.ops.moedist.*
    exist before anything is compiled."""
    if _torch is None:
        return None
    from . import _custom_ops
    if not _custom_ops.supported():
        return None
    return _custom_ops.register(_dispatch_kernel, _combine_kernel)


def _compiling_check() -> Callable[[], bool]:
    """The function that says whether dynamo (torch.compile) is tracing: torch's own, which dynamo reads as
    True while it traces, so that the fast path, opaque to it, is never traced (other tracers -- fake
    tensors, make_fx, export -- are declined by the fast path itself); the cheapest one this torch has.
    Always False where no op is registered: nothing then goes through one."""
    compiler = getattr(_torch, "compiler", None)
    for name in ("is_dynamo_compiling", "is_compiling"):
        if _registered_ops is not None and hasattr(compiler, name):
            check: Callable[[], bool] = getattr(compiler, name)
            return check
    return _compiling if _registered_ops is not None else lambda: False


_torch: Any = _import_torch()  # the torch module, or None
if _torch is not None:
    _cuda.register_backend(_torch.Tensor, _cuda.TorchBackend(_torch))
_current_dispatch_mode: Callable[[], Any] = lambda: None  # torch's innermost dispatch mode, where torch is
if _torch is not None:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    _current_dispatch_mode = _get_current_dispatch_mode
_registered_ops = _register_ops()
_is_compiling = _compiling_check()
_dispatch_call = _moedist.dispatch_call  # the fast path (module.cpp)
_combine_call = _moedist.combine_call
