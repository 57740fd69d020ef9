"""torch_npu.npu_moe_distribute_dispatch / npu_moe_distribute_combine, with torch_npu's signatures and
defaults (contract §1.1, §1.3), over moedist's C++ groups."""
from . import _groups
from ._integers import integer
from ._moedist import ViewAs
from ._tensors import is_bfloat16, kind_of, output, prepare


def _config(ep_world_size, ep_rank_id, moe_expert_num, tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num,
            shared_expert_rank_num, global_bs):
    return {name: integer(name, value) for name, value in (
        ("ep_world_size", ep_world_size), ("ep_rank_id", ep_rank_id), ("moe_expert_num", moe_expert_num),
        ("tp_world_size", tp_world_size), ("tp_rank_id", tp_rank_id), ("expert_shard_type", expert_shard_type),
        ("shared_expert_num", shared_expert_num), ("shared_expert_rank_num", shared_expert_rank_num),
        ("global_bs", global_bs))}


class _Tensors:
    """The tensor arguments of one call, prepared for the extension (each checked before anything is
    joined or sent): ``[name]`` is the object it reads, ``views`` says which parameters it reads as
    another dtype."""

    def __init__(self, **tensors):
        self.objects, self.views = {}, {}
        for name, value in tensors.items():
            self.objects[name], view_as, _ = prepare(name, value)
            if view_as != ViewAs.native:
                self.views[name] = view_as

    def __getitem__(self, name):
        return self.objects[name]


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
    quant_mode = integer("quant_mode", quant_mode)
    expert_token_nums_type = integer("expert_token_nums_type", expert_token_nums_type)
    tensors = _Tensors(x=x, expert_ids=expert_ids, scales=scales, x_active_mask=x_active_mask, expert_scales=expert_scales)
    group = _groups.group_for(group_ep, group_tp, config)
    results = group.dispatch(tensors["x"], tensors["expert_ids"], tensors["scales"], tensors["x_active_mask"],
                             tensors["expert_scales"], quant_mode, expert_token_nums_type, tensors.views)
    expand_x_bf16 = is_bfloat16(x) and quant_mode == 0
    return tuple(output(a, kind_of(x), expand_x_bf16 and i == 0) for i, a in enumerate(results[:7]))


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
    out_dtype = integer("out_dtype", out_dtype)
    comm_quant_mode = integer("comm_quant_mode", comm_quant_mode)
    group_list_type = integer("group_list_type", group_list_type)
    # tp_send_counts (T,) is ignored without TP, as on the NPU
    tensors = _Tensors(expand_x=expand_x, expert_ids=expert_ids, expand_idx=expand_idx, ep_send_counts=ep_send_counts,
                       expert_scales=expert_scales, tp_send_counts=tp_send_counts if config["tp_world_size"] == 2 else None,
                       x_active_mask=x_active_mask, activation_scale=activation_scale, weight_scale=weight_scale,
                       group_list=group_list, expand_scales=expand_scales, shared_expert_x=shared_expert_x)
    group = _groups.group_for(group_ep, group_tp, config)
    out = group.combine(*(tensors[name] for name in (
        "expand_x", "expert_ids", "expand_idx", "ep_send_counts", "expert_scales", "tp_send_counts", "x_active_mask",
        "activation_scale", "weight_scale", "group_list", "expand_scales", "shared_expert_x")),
        out_dtype, comm_quant_mode, group_list_type, tensors.views)
    return output(out, kind_of(expand_x), is_bfloat16(expand_x))

