"""torch_npu.npu_moe_distribute_dispatch_v2 / npu_moe_distribute_combine_v2, with torch_npu's signatures,
defaults and results (V2 §1.1-1.2), over moedist's C++ groups (docs/contract.md, "The V2 operators").

As for the V1 pair (_ops.py): with torch >= 2.1 they are torch custom ops too, whose CPU and CUDA kernels are the
eager functions here, so that torch.compile traces them; numpy arrays, and torch 1.13, call the eager
functions."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from . import _cuda, _groups, _ops
from ._errors import ValidationError
from ._integers import Integer, integer
from ._tensors import detached, is_bfloat16, kind_of, output

_DISPATCH_TENSORS = ("scales", "x_active_mask", "expert_scales", "elastic_info", "performance_info")
_DISPATCH_INTS = ("ep_world_size", "ep_rank_id", "moe_expert_num", "tp_world_size", "tp_rank_id", "expert_shard_type",
                  "shared_expert_num", "shared_expert_rank_num", "quant_mode", "global_bs", "expert_token_nums_type",
                  "zero_expert_num", "copy_expert_num", "const_expert_num")
_COMBINE_TENSORS = ("tp_send_counts", "x_active_mask", "expand_scales", "shared_expert_x", "elastic_info", "ori_x",
                    "const_expert_alpha_1", "const_expert_alpha_2", "const_expert_v", "performance_info")
_COMBINE_INTS = ("ep_world_size", "ep_rank_id", "moe_expert_num", "tp_world_size", "tp_rank_id", "expert_shard_type",
                 "shared_expert_num", "shared_expert_rank_num", "global_bs", "comm_quant_mode", "zero_expert_num",
                 "copy_expert_num", "const_expert_num")
_HIDDEN_DTYPES = ("y_dtype", "x_dtype", "scales_dtype")  # the Ascend 950's fp8/hif8/fp4 relabelling (V2 §2.7)


def npu_moe_distribute_dispatch_v2(x: Any, expert_ids: Any, group_ep: str, ep_world_size: Integer, ep_rank_id: Integer,
                                   moe_expert_num: Integer, *, scales: Any = None, x_active_mask: Any = None,
                                   expert_scales: Any = None, elastic_info: Any = None, performance_info: Any = None,
                                   group_tp: str = "", tp_world_size: Integer = 0, tp_rank_id: Integer = 0,
                                   expert_shard_type: Integer = 0, shared_expert_num: Integer = 1,
                                   shared_expert_rank_num: Integer = 0, quant_mode: Integer = 0, global_bs: Integer = 0,
                                   expert_token_nums_type: Integer = 1, comm_alg: str = "", zero_expert_num: Integer = 0,
                                   copy_expert_num: Integer = 0, const_expert_num: Integer = 0,
                                   y_dtype: Optional[Integer] = None, x_dtype: Optional[Integer] = None,
                                   scales_dtype: Optional[Integer] = None) -> Tuple[Any, ...]:
    """Sends the active entries of ``x`` (BS, H) to the ranks of their MoE experts (special experts stay
    for combine) and every active token to its Sn shared experts.

    Returns (expand_x, dynamic_scales, assist_info_for_combine, expert_token_nums, ep_recv_counts,
    tp_recv_counts, expand_scales) as torch_npu does: assist_info_for_combine has max(BS * K, 128 * A)
    entries, of which the first 3 per received row hold (source rank, token, k). ``performance_info``
    (W,) int64 is updated in place with the waits per peer in µs (their maximum). Collective."""
    _refuse_hidden_dtypes(y_dtype=y_dtype, x_dtype=x_dtype, scales_dtype=scales_dtype)
    args = dict(scales=scales, x_active_mask=x_active_mask, expert_scales=expert_scales, elastic_info=elastic_info,
                performance_info=performance_info, group_tp=group_tp, ep_world_size=ep_world_size,
                ep_rank_id=ep_rank_id, moe_expert_num=moe_expert_num, tp_world_size=tp_world_size,
                tp_rank_id=tp_rank_id, expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
                shared_expert_rank_num=shared_expert_rank_num, quant_mode=quant_mode, global_bs=global_bs,
                expert_token_nums_type=expert_token_nums_type, comm_alg=comm_alg, zero_expert_num=zero_expert_num,
                copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)
    ops = _registered_ops()
    if ops is not None and _ops._through_op(x, expert_ids, *(args[name] for name in _DISPATCH_TENSORS)):
        a = _ops._op_arguments(args, _DISPATCH_TENSORS, _DISPATCH_INTS)
        a["comm_alg"] = _string("comm_alg", comm_alg)
        results: Tuple[Any, ...] = ops[0](detached(x), detached(expert_ids),
                                          _ops._group_name("group_ep", group_ep), a.pop("ep_world_size"),
                                          a.pop("ep_rank_id"), a.pop("moe_expert_num"), **a)
        return results
    return _dispatch_v2(x, expert_ids, group_ep, **args)


def _dispatch_v2(x: Any, expert_ids: Any, group_ep: Any, *, ep_world_size: Integer, ep_rank_id: Integer,
                 moe_expert_num: Integer, scales: Any, x_active_mask: Any, expert_scales: Any, elastic_info: Any,
                 performance_info: Any, group_tp: Any, tp_world_size: Integer, tp_rank_id: Integer,
                 expert_shard_type: Integer, shared_expert_num: Integer, shared_expert_rank_num: Integer,
                 quant_mode: Integer, global_bs: Integer, expert_token_nums_type: Integer, comm_alg: Any,
                 zero_expert_num: Integer, copy_expert_num: Integer, const_expert_num: Integer) -> Tuple[Any, ...]:
    """The eager dispatch_v2 (also the registered op's CPU and CUDA kernel)."""
    ints = _ops._ints(locals(), _DISPATCH_INTS)
    config = {name: ints[name] for name in _ops._CONFIG}
    if _cuda.on_cuda(x):
        optional = dict(scales=scales, x_active_mask=x_active_mask, expert_scales=expert_scales,
                        elastic_info=elastic_info, performance_info=performance_info)
        return _cuda.dispatch_v2(x, expert_ids, group_ep, group_tp, config, ints, _string("comm_alg", comm_alg), optional)
    tensors = _ops._Tensors(x=x, expert_ids=expert_ids, scales=scales, x_active_mask=x_active_mask,
                            expert_scales=expert_scales, elastic_info=elastic_info, performance_info=performance_info)
    group = _groups.group_for(group_ep, group_tp, config)
    results = group.dispatch_v2(**{name: tensors[name] for name in ("x", "expert_ids") + _DISPATCH_TENSORS},
                                quant_mode=ints["quant_mode"], expert_token_nums_type=ints["expert_token_nums_type"],
                                zero_expert_num=ints["zero_expert_num"], copy_expert_num=ints["copy_expert_num"],
                                const_expert_num=ints["const_expert_num"], comm_alg=_string("comm_alg", comm_alg),
                                views=tensors.views)
    expand_x_bf16 = is_bfloat16(x) and ints["quant_mode"] == 0
    kind = kind_of(x)
    return tuple(output(a, kind, expand_x_bf16 and i == 0) for i, a in enumerate(results[:7]))


def npu_moe_distribute_combine_v2(expand_x: Any, expert_ids: Any, assist_info_for_combine: Any, ep_send_counts: Any,
                                  expert_scales: Any, group_ep: str, ep_world_size: Integer, ep_rank_id: Integer,
                                  moe_expert_num: Integer, *, tp_send_counts: Any = None, x_active_mask: Any = None,
                                  expand_scales: Any = None, shared_expert_x: Any = None, elastic_info: Any = None,
                                  ori_x: Any = None, const_expert_alpha_1: Any = None, const_expert_alpha_2: Any = None,
                                  const_expert_v: Any = None, performance_info: Any = None, group_tp: str = "",
                                  tp_world_size: Integer = 0, tp_rank_id: Integer = 0, expert_shard_type: Integer = 0,
                                  shared_expert_num: Integer = 1, shared_expert_rank_num: Integer = 0,
                                  global_bs: Integer = 0, comm_quant_mode: Integer = 0, comm_alg: str = "",
                                  zero_expert_num: Integer = 0, copy_expert_num: Integer = 0,
                                  const_expert_num: Integer = 0) -> Any:
    """Brings each row of ``expand_x`` back to the token and k its triple in ``assist_info_for_combine``
    names (any row order), and adds the routed rows weighted by ``expert_scales``, the copy and const
    experts from ``ori_x``, the shared experts and ``shared_expert_x`` unweighted, in the kernel's order
    (docs/contract.md). Returns (BS, H) in expand_x's dtype, zero rows for inactive tokens. Collective."""
    args = dict(tp_send_counts=tp_send_counts, x_active_mask=x_active_mask, expand_scales=expand_scales,
                shared_expert_x=shared_expert_x, elastic_info=elastic_info, ori_x=ori_x,
                const_expert_alpha_1=const_expert_alpha_1, const_expert_alpha_2=const_expert_alpha_2,
                const_expert_v=const_expert_v, performance_info=performance_info, group_tp=group_tp,
                ep_world_size=ep_world_size, ep_rank_id=ep_rank_id, moe_expert_num=moe_expert_num,
                tp_world_size=tp_world_size, tp_rank_id=tp_rank_id, expert_shard_type=expert_shard_type,
                shared_expert_num=shared_expert_num, shared_expert_rank_num=shared_expert_rank_num, global_bs=global_bs,
                comm_quant_mode=comm_quant_mode, comm_alg=comm_alg, zero_expert_num=zero_expert_num,
                copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)
    ops = _registered_ops()
    if ops is not None and _ops._through_op(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales,
                                            *(args[name] for name in _COMBINE_TENSORS)):
        a = _ops._op_arguments(args, _COMBINE_TENSORS, _COMBINE_INTS)
        a["comm_alg"] = _string("comm_alg", comm_alg)
        d = detached
        return ops[1](d(expand_x), d(expert_ids), d(assist_info_for_combine), d(ep_send_counts), d(expert_scales),
                      _ops._group_name("group_ep", group_ep), a.pop("ep_world_size"), a.pop("ep_rank_id"),
                      a.pop("moe_expert_num"), **a)
    return _combine_v2(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep, **args)


def _combine_v2(expand_x: Any, expert_ids: Any, assist_info_for_combine: Any, ep_send_counts: Any, expert_scales: Any,
                group_ep: Any, *, ep_world_size: Integer, ep_rank_id: Integer, moe_expert_num: Integer,
                tp_send_counts: Any, x_active_mask: Any, expand_scales: Any, shared_expert_x: Any, elastic_info: Any,
                ori_x: Any, const_expert_alpha_1: Any, const_expert_alpha_2: Any, const_expert_v: Any,
                performance_info: Any, group_tp: Any, tp_world_size: Integer, tp_rank_id: Integer,
                expert_shard_type: Integer, shared_expert_num: Integer, shared_expert_rank_num: Integer,
                global_bs: Integer, comm_quant_mode: Integer, comm_alg: Any, zero_expert_num: Integer,
                copy_expert_num: Integer, const_expert_num: Integer) -> Any:
    """The eager combine_v2 (also the registered op's CPU and CUDA kernel)."""
    ints = _ops._ints(locals(), _COMBINE_INTS)
    config = {name: ints[name] for name in _ops._CONFIG}
    if _cuda.on_cuda(expand_x):
        optional = dict(tp_send_counts=tp_send_counts, x_active_mask=x_active_mask, expand_scales=expand_scales,
                        shared_expert_x=_rows_of(shared_expert_x, expert_ids), elastic_info=elastic_info, ori_x=ori_x,
                        const_expert_alpha_1=const_expert_alpha_1, const_expert_alpha_2=const_expert_alpha_2,
                        const_expert_v=const_expert_v, performance_info=performance_info)
        return _cuda.combine_v2(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep,
                                group_tp, config, ints, _string("comm_alg", comm_alg), optional)
    tensors = _ops._Tensors(expand_x=expand_x, expert_ids=expert_ids, assist_info_for_combine=assist_info_for_combine,
                            ep_send_counts=ep_send_counts, expert_scales=expert_scales,
                            tp_send_counts=tp_send_counts if config["tp_world_size"] == 2 else None,
                            x_active_mask=x_active_mask, expand_scales=expand_scales,
                            shared_expert_x=_rows_of(shared_expert_x, expert_ids), elastic_info=elastic_info, ori_x=ori_x,
                            const_expert_alpha_1=const_expert_alpha_1, const_expert_alpha_2=const_expert_alpha_2,
                            const_expert_v=const_expert_v, performance_info=performance_info)
    group = _groups.group_for(group_ep, group_tp, config)
    names = ("expand_x", "expert_ids", "assist_info_for_combine", "ep_send_counts", "expert_scales") + _COMBINE_TENSORS
    out = group.combine_v2(**{name: tensors[name] for name in names}, comm_quant_mode=ints["comm_quant_mode"],
                           zero_expert_num=ints["zero_expert_num"], copy_expert_num=ints["copy_expert_num"],
                           const_expert_num=ints["const_expert_num"], comm_alg=_string("comm_alg", comm_alg),
                           views=tensors.views)
    return output(out, kind_of(expand_x), is_bfloat16(expand_x))


def _rows_of(shared_expert_x: Any, expert_ids: Any) -> Any:
    """shared_expert_x as (BS, H): torch_npu also takes a 3-D tensor whose first two extents multiply to BS
    (V2 §4.5)."""
    shape = getattr(shared_expert_x, "shape", None)
    if shape is not None and len(shape) == 3 and hasattr(shared_expert_x, "reshape"):
        return shared_expert_x.reshape(shape[0] * shape[1], shape[2])
    return shared_expert_x


def _string(parameter: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{parameter} = {value!r}: must be a string", "invalid_argument", parameter, repr(value),
                              "must be a string")
    return value


def _refuse_hidden_dtypes(**dtypes: Optional[Integer]) -> None:
    """y_dtype, x_dtype and scales_dtype relabel the Ascend 950's fp8 / hif8 / fp4 tensors (V2 §2.7), which
    moedist does not implement: None only."""
    for name, value in dtypes.items():
        if value is not None:
            code = integer(name, value)
            raise ValidationError(f"{name} = {code}: the Ascend 950's low-precision dtypes are not supported (must be None)",
                                  "unsupported", name, str(code), "the Ascend 950's low-precision dtypes are not supported (must be None)")


# The registered ops' kernels (CPU and CUDA): torch passes the schema's arguments, kwarg-only ones by name.
def _dispatch_v2_kernel(x: Any, expert_ids: Any, group_ep: str, ep_world_size: int, ep_rank_id: int,
                        moe_expert_num: int, scales: Any = None, x_active_mask: Any = None, expert_scales: Any = None,
                        elastic_info: Any = None, performance_info: Any = None, group_tp: str = "",
                        tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0,
                        shared_expert_num: int = 1, shared_expert_rank_num: int = 0, quant_mode: int = 0,
                        global_bs: int = 0, expert_token_nums_type: int = 1, comm_alg: str = "",
                        zero_expert_num: int = 0, copy_expert_num: int = 0, const_expert_num: int = 0,
                        y_dtype: Optional[int] = None, x_dtype: Optional[int] = None,
                        scales_dtype: Optional[int] = None) -> Tuple[Any, ...]:
    args = dict(locals())
    _refuse_hidden_dtypes(**{name: args.pop(name) for name in _HIDDEN_DTYPES})
    return _dispatch_v2(args.pop("x"), args.pop("expert_ids"), args.pop("group_ep"), **args)


def _combine_v2_kernel(expand_x: Any, expert_ids: Any, assist_info_for_combine: Any, ep_send_counts: Any,
                       expert_scales: Any, group_ep: str, ep_world_size: int, ep_rank_id: int, moe_expert_num: int,
                       tp_send_counts: Any = None, x_active_mask: Any = None, expand_scales: Any = None,
                       shared_expert_x: Any = None, elastic_info: Any = None, ori_x: Any = None,
                       const_expert_alpha_1: Any = None, const_expert_alpha_2: Any = None, const_expert_v: Any = None,
                       performance_info: Any = None, group_tp: str = "", tp_world_size: int = 0, tp_rank_id: int = 0,
                       expert_shard_type: int = 0, shared_expert_num: int = 1, shared_expert_rank_num: int = 0,
                       global_bs: int = 0, comm_quant_mode: int = 0, comm_alg: str = "", zero_expert_num: int = 0,
                       copy_expert_num: int = 0, const_expert_num: int = 0) -> Any:
    args = dict(locals())
    leading = [args.pop(name) for name in ("expand_x", "expert_ids", "assist_info_for_combine", "ep_send_counts",
                                           "expert_scales", "group_ep")]
    return _combine_v2(*leading, **args)


_ops_cache: Dict[str, Optional[Tuple[Any, Any]]] = {}


def _registered_ops() -> Optional[Tuple[Any, Any]]:
    """The registered (dispatch_v2, combine_v2) ops where this torch supports them (registered once, at
    import, beside the V1 pair), else None."""
    if "ops" not in _ops_cache:
        ops = None
        if _ops._registered_ops is not None:
            from . import _custom_ops
            ops = _custom_ops.register_v2(_dispatch_v2_kernel, _combine_v2_kernel)
        _ops_cache["ops"] = ops
    return _ops_cache["ops"]


_registered_ops()
