"""The operators as torch custom ops (torch >= 2.1): ``torch.ops.moedist.npu_moe_distribute_dispatch`` and
``torch.ops.moedist.npu_moe_distribute_combine``, with torch_npu's schemas (parameter names, order,
defaults, the seven-tensor result), CPU and CUDA kernels (the package's eager path, _ops.py) and a fake kernel
that gives the static output shapes from the arguments alone, so that ``torch.compile(...,
dynamic=False, fullgraph=True)`` traces a module calling them without a graph break.

Output shapes of dispatch, for BS = x.shape[0], H = x.shape[1], K = expert_ids.shape[1]: expand_x
(R, H) int8 (quant_mode 2) or x's dtype, dynamic_scales (R,), expand_idx (BS * K,), expert_token_nums
(L,) int64, ep_recv_counts (W * L * (2 if T == 2 else 1),), tp_recv_counts (tp_world_size,),
expand_scales (R,), where R = moedist.capacity's max_receive_rows: torch_npu's A * max(T, 1), more only
on a shared-expert rank of ranks with different BS, where A can be exceeded (docs/contract.md, "Capacity
A"), and L the rank's local experts. Combine gives (BS, H) in expand_x's dtype.

The ops are collective and write nothing of their inputs; they are marked as having side effects, so a
graph never drops a call whose results are unused (every rank must make every call)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ._tensors import OutputSpec, dispatch_outputs, matrix

NAMESPACE = "moedist"

DISPATCH_SCHEMA = (
    "npu_moe_distribute_dispatch(Tensor x, Tensor expert_ids, str group_ep, int ep_world_size, int ep_rank_id, "
    "int moe_expert_num, *, Tensor? scales=None, Tensor? x_active_mask=None, Tensor? expert_scales=None, "
    "str group_tp=\"\", int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, "
    "int shared_expert_rank_num=0, int quant_mode=0, int global_bs=0, int expert_token_nums_type=1) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")

COMBINE_SCHEMA = (
    "npu_moe_distribute_combine(Tensor expand_x, Tensor expert_ids, Tensor expand_idx, Tensor ep_send_counts, "
    "Tensor expert_scales, str group_ep, int ep_world_size, int ep_rank_id, int moe_expert_num, *, "
    "Tensor? tp_send_counts=None, Tensor? x_active_mask=None, Tensor? activation_scale=None, "
    "Tensor? weight_scale=None, Tensor? group_list=None, Tensor? expand_scales=None, Tensor? shared_expert_x=None, "
    "str group_tp=\"\", int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, "
    "int shared_expert_rank_num=0, int global_bs=0, int out_dtype=0, int comm_quant_mode=0, int group_list_type=0) "
    "-> Tensor")

# V2 (V2 §1.1-1.2): torch_npu's schemas, with performance_info marked as written in place (the op raises
# its entries to this call's waits), so that a compiled graph keeps the update.
DISPATCH_V2_SCHEMA = (
    "npu_moe_distribute_dispatch_v2(Tensor x, Tensor expert_ids, str group_ep, int ep_world_size, int ep_rank_id, "
    "int moe_expert_num, *, Tensor? scales=None, Tensor? x_active_mask=None, Tensor? expert_scales=None, "
    "Tensor? elastic_info=None, Tensor(a!)? performance_info=None, str group_tp=\"\", int tp_world_size=0, "
    "int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, int shared_expert_rank_num=0, "
    "int quant_mode=0, int global_bs=0, int expert_token_nums_type=1, str comm_alg=\"\", int zero_expert_num=0, "
    "int copy_expert_num=0, int const_expert_num=0, int? y_dtype=None, int? x_dtype=None, int? scales_dtype=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")

COMBINE_V2_SCHEMA = (
    "npu_moe_distribute_combine_v2(Tensor expand_x, Tensor expert_ids, Tensor assist_info_for_combine, "
    "Tensor ep_send_counts, Tensor expert_scales, str group_ep, int ep_world_size, int ep_rank_id, int moe_expert_num, "
    "*, Tensor? tp_send_counts=None, Tensor? x_active_mask=None, Tensor? expand_scales=None, "
    "Tensor? shared_expert_x=None, Tensor? elastic_info=None, Tensor? ori_x=None, Tensor? const_expert_alpha_1=None, "
    "Tensor? const_expert_alpha_2=None, Tensor? const_expert_v=None, Tensor(a!)? performance_info=None, "
    "str group_tp=\"\", int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, "
    "int shared_expert_rank_num=0, int global_bs=0, int comm_quant_mode=0, str comm_alg=\"\", int zero_expert_num=0, "
    "int copy_expert_num=0, int const_expert_num=0) -> Tensor")

_CONFIG_KEYS = ("ep_world_size", "ep_rank_id", "moe_expert_num", "tp_world_size", "tp_rank_id", "expert_shard_type",
                "shared_expert_num", "shared_expert_rank_num", "global_bs")


def supported() -> bool:
    """Whether this torch can register the ops (torch.library with fake kernels: torch >= 2.1)."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return version >= (2, 1) and hasattr(torch.library, "Library")


def _torch_outputs(specs: List[OutputSpec], x: torch.Tensor) -> List[Tuple[Tuple[int, ...], torch.dtype]]:
    return [(shape, x.dtype if dtype == "x" else getattr(torch, dtype)) for shape, dtype in specs]


def dispatch_shapes(x: torch.Tensor, expert_ids: torch.Tensor, quant_mode: int,
                    config: Dict[str, int]) -> List[Tuple[Tuple[int, ...], torch.dtype]]:
    """The output shapes and dtypes of dispatch, from the arguments alone (see the module's docstring)."""
    return _torch_outputs(dispatch_outputs(x, expert_ids, quant_mode, config, 1), x)


def dispatch_v2_shapes(x: torch.Tensor, expert_ids: torch.Tensor, quant_mode: int,
                       config: Dict[str, int]) -> List[Tuple[Tuple[int, ...], torch.dtype]]:
    """The output shapes and dtypes of dispatch_v2 (V2 §1.4): expand_x (A * max(T, 1), H), dynamic_scales
    (A * max(T, 1),), assist_info_for_combine (max(BS * K, 128 * A),), expert_token_nums (L,),
    ep_recv_counts (W * L * (2 if T == 2 else 1),), tp_recv_counts (T,), expand_scales (A,)."""
    return _torch_outputs(dispatch_outputs(x, expert_ids, quant_mode, config, 2), x)


def _config(args: Dict[str, Any]) -> Dict[str, int]:
    return {key: args[key] for key in _CONFIG_KEYS}


def _dispatch_fake(x: torch.Tensor, expert_ids: torch.Tensor, group_ep: str, ep_world_size: int, ep_rank_id: int,
                   moe_expert_num: int, *, scales: Optional[torch.Tensor] = None,
                   x_active_mask: Optional[torch.Tensor] = None, expert_scales: Optional[torch.Tensor] = None,
                   group_tp: str = "", tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0,
                   shared_expert_num: int = 1, shared_expert_rank_num: int = 0, quant_mode: int = 0, global_bs: int = 0,
                   expert_token_nums_type: int = 1) -> Tuple[torch.Tensor, ...]:
    config = _config(locals())
    return tuple(x.new_empty(shape, dtype=dtype) for shape, dtype in dispatch_shapes(x, expert_ids, quant_mode, config))


def _combine_fake(expand_x: torch.Tensor, expert_ids: torch.Tensor, expand_idx: torch.Tensor,
                  ep_send_counts: torch.Tensor, expert_scales: torch.Tensor, group_ep: str, ep_world_size: int,
                  ep_rank_id: int, moe_expert_num: int, *, tp_send_counts: Optional[torch.Tensor] = None,
                  x_active_mask: Optional[torch.Tensor] = None, activation_scale: Optional[torch.Tensor] = None,
                  weight_scale: Optional[torch.Tensor] = None, group_list: Optional[torch.Tensor] = None,
                  expand_scales: Optional[torch.Tensor] = None, shared_expert_x: Optional[torch.Tensor] = None,
                  group_tp: str = "", tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0,
                  shared_expert_num: int = 1, shared_expert_rank_num: int = 0, global_bs: int = 0, out_dtype: int = 0,
                  comm_quant_mode: int = 0, group_list_type: int = 0) -> torch.Tensor:
    _, h = matrix("expand_x", expand_x)
    bs, _ = matrix("expert_ids", expert_ids)
    return expand_x.new_empty((bs, h))


def _dispatch_v2_fake(x: torch.Tensor, expert_ids: torch.Tensor, group_ep: str, ep_world_size: int, ep_rank_id: int,
                      moe_expert_num: int, *, scales: Optional[torch.Tensor] = None,
                      x_active_mask: Optional[torch.Tensor] = None, expert_scales: Optional[torch.Tensor] = None,
                      elastic_info: Optional[torch.Tensor] = None, performance_info: Optional[torch.Tensor] = None,
                      group_tp: str = "", tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0,
                      shared_expert_num: int = 1, shared_expert_rank_num: int = 0, quant_mode: int = 0,
                      global_bs: int = 0, expert_token_nums_type: int = 1, comm_alg: str = "", zero_expert_num: int = 0,
                      copy_expert_num: int = 0, const_expert_num: int = 0, y_dtype: Optional[int] = None,
                      x_dtype: Optional[int] = None, scales_dtype: Optional[int] = None) -> Tuple[torch.Tensor, ...]:
    config = _config(locals())
    return tuple(x.new_empty(shape, dtype=dtype) for shape, dtype in dispatch_v2_shapes(x, expert_ids, quant_mode, config))


def _combine_v2_fake(expand_x: torch.Tensor, expert_ids: torch.Tensor, assist_info_for_combine: torch.Tensor,
                     ep_send_counts: torch.Tensor, expert_scales: torch.Tensor, group_ep: str, ep_world_size: int,
                     ep_rank_id: int, moe_expert_num: int, **options: Any) -> torch.Tensor:
    _, h = matrix("expand_x", expand_x)
    bs, _k = matrix("expert_ids", expert_ids)
    return expand_x.new_empty((bs, h))


def _register_fake(qualified: str, fn: Callable[..., Any], lib: torch.library.Library) -> None:
    if hasattr(torch.library, "register_fake"):  # torch >= 2.4
        torch.library.register_fake(qualified, fn, lib=lib)
    elif hasattr(torch.library, "impl_abstract"):  # torch 2.2, 2.3
        torch.library.impl_abstract(qualified, fn, lib=lib)
    else:  # torch 2.1: a Meta kernel serves fake tensors too
        lib.impl(qualified.split("::")[1], fn, "Meta")


def _mark_side_effects(op: Any) -> None:
    # A collective: every rank must make the call, even one whose results nobody reads.
    has_side_effect = getattr(torch.fx.node, "has_side_effect", None)
    if has_side_effect is not None:
        has_side_effect(op)


_library: Optional[torch.library.Library] = None


def register(dispatch_kernel: Callable[..., Any], combine_kernel: Callable[..., Any]) -> Tuple[Any, Any]:
    """Defines the two ops once per process, with the given kernels for CPU and CUDA tensors; returns
    (dispatch, combine)."""
    global _library
    if _library is None:
        library = torch.library.Library(NAMESPACE, "DEF")
        library.define(DISPATCH_SCHEMA)
        library.define(COMBINE_SCHEMA)
        for device in ("CPU", "CUDA"):  # the same kernels: they tell the two apart (_ops.py, _cuda.py)
            library.impl("npu_moe_distribute_dispatch", dispatch_kernel, device)
            library.impl("npu_moe_distribute_combine", combine_kernel, device)
        _register_fake(f"{NAMESPACE}::npu_moe_distribute_dispatch", _dispatch_fake, library)
        _register_fake(f"{NAMESPACE}::npu_moe_distribute_combine", _combine_fake, library)
        _library = library
        for op in (torch.ops.moedist.npu_moe_distribute_dispatch, torch.ops.moedist.npu_moe_distribute_combine):
            _mark_side_effects(op.default)
    return torch.ops.moedist.npu_moe_distribute_dispatch, torch.ops.moedist.npu_moe_distribute_combine


_library_v2: Optional[torch.library.Library] = None


def register_v2(dispatch_kernel: Callable[..., Any], combine_kernel: Callable[..., Any]) -> Tuple[Any, Any]:
    """Defines the V2 pair once per process (in a fragment of the namespace); returns (dispatch_v2, combine_v2)."""
    global _library_v2
    if _library_v2 is None:
        library = torch.library.Library(NAMESPACE, "FRAGMENT")
        library.define(DISPATCH_V2_SCHEMA)
        library.define(COMBINE_V2_SCHEMA)
        for device in ("CPU", "CUDA"):
            library.impl("npu_moe_distribute_dispatch_v2", dispatch_kernel, device)
            library.impl("npu_moe_distribute_combine_v2", combine_kernel, device)
        _register_fake(f"{NAMESPACE}::npu_moe_distribute_dispatch_v2", _dispatch_v2_fake, library)
        _register_fake(f"{NAMESPACE}::npu_moe_distribute_combine_v2", _combine_v2_fake, library)
        _library_v2 = library
        for op in (torch.ops.moedist.npu_moe_distribute_dispatch_v2, torch.ops.moedist.npu_moe_distribute_combine_v2):
            _mark_side_effects(op.default)
    return torch.ops.moedist.npu_moe_distribute_dispatch_v2, torch.ops.moedist.npu_moe_distribute_combine_v2
