"""torch_npu.npu_moe_distribute_dispatch / npu_moe_distribute_combine, with torch_npu's signatures and
defaults (contract §1.1, §1.3), over moedist's C++ groups."""
from . import _groups
from ._errors import ValidationError
from ._tensors import is_bfloat16, output, prepare


def _int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name} = {value!r}: must be an integer", "invalid_argument", name, repr(value),
                              "must be an integer")
    return value


def _config(ep_world_size, ep_rank_id, moe_expert_num, tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num,
            shared_expert_rank_num, global_bs):
    return {name: _int(name, value) for name, value in (
        ("ep_world_size", ep_world_size), ("ep_rank_id", ep_rank_id), ("moe_expert_num", moe_expert_num),
        ("tp_world_size", tp_world_size), ("tp_rank_id", tp_rank_id), ("expert_shard_type", expert_shard_type),
        ("shared_expert_num", shared_expert_num), ("shared_expert_rank_num", shared_expert_rank_num),
        ("global_bs", global_bs))}


def npu_moe_distribute_dispatch(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, scales=None,
                                x_active_mask=None, expert_scales=None, group_tp="", tp_world_size=0, tp_rank_id=0,
                                expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0,
                                global_bs=0, expert_token_nums_type=1):
    """Sends every token of ``x`` (BS, H) to the ranks of its top-K experts ``expert_ids`` (BS, K).

    Returns (expand_x, dynamic_scales, expand_idx, expert_token_nums, ep_recv_counts, tp_recv_counts,
    expand_scales) as torch_npu does, as torch tensors for torch inputs and numpy arrays for numpy inputs.
    Only the first valid rows of expand_x / dynamic_scales / expand_scales are meaningful (the rest are
    zero), as on the NPU. Collective: every rank of the group calls it."""
    config = _config(ep_world_size, ep_rank_id, moe_expert_num, tp_world_size, tp_rank_id, expert_shard_type,
                     shared_expert_num, shared_expert_rank_num, global_bs)
    group = _groups.group_for(group_ep, group_tp, config)
    x_in, x_bf16, kind = prepare(x)
    results = group.dispatch(x_in, prepare(expert_ids)[0], prepare(scales)[0], prepare(x_active_mask)[0],
                             prepare(expert_scales)[0], _int("quant_mode", quant_mode),
                             _int("expert_token_nums_type", expert_token_nums_type), x_bf16)
    expand_x_bf16 = is_bfloat16(x) and quant_mode == 0
    return tuple(output(a, kind, expand_x_bf16 and i == 0) for i, a in enumerate(results[:7]))


def npu_moe_distribute_combine(expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, group_ep, ep_world_size,
                               ep_rank_id, moe_expert_num, *, tp_send_counts=None, x_active_mask=None,
                               activation_scale=None, weight_scale=None, group_list=None, expand_scales=None,
                               shared_expert_x=None, group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
                               shared_expert_num=1, shared_expert_rank_num=0, global_bs=0, out_dtype=0,
                               comm_quant_mode=0, group_list_type=0):
    """Brings the expert outputs ``expand_x`` (in dispatch's row order) back to their tokens and adds
    them, weighted by ``expert_scales`` (the shared expert unweighted). Returns (BS, H) in expand_x's
    dtype, as the caller's kind of tensor. Collective."""
    config = _config(ep_world_size, ep_rank_id, moe_expert_num, tp_world_size, tp_rank_id, expert_shard_type,
                     shared_expert_num, shared_expert_rank_num, global_bs)
    group = _groups.group_for(group_ep, group_tp, config)
    x_in, x_bf16, kind = prepare(expand_x)
    tp_counts = prepare(tp_send_counts)[0] if config["tp_world_size"] == 2 else None  # (T,) is ignored without TP, as on the NPU
    out = group.combine(x_in, prepare(expert_ids)[0], prepare(expand_idx)[0], prepare(ep_send_counts)[0],
                        prepare(expert_scales)[0], tp_counts, prepare(x_active_mask)[0], prepare(activation_scale)[0],
                        prepare(weight_scale)[0], prepare(group_list)[0], prepare(expand_scales)[0],
                        prepare(shared_expert_x)[0], _int("out_dtype", out_dtype), _int("comm_quant_mode", comm_quant_mode),
                        _int("group_list_type", group_list_type), x_bf16)
    return output(out, kind, is_bfloat16(expand_x))
