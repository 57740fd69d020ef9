"""The operators on CUDA tensors: npu_moe_distribute_dispatch / _combine (and _v2) with torch CUDA tensors run on
the CUDA group (C++ ``moedist::cuda::CudaGroup``, docs/cuda.md) of their group names, on the caller's
current stream, with the signatures and results of the CPU path.

A call on CUDA tensors enqueues its kernels on ``torch.cuda.current_stream(x.device)`` and returns
without waiting for the GPU, as torch's own CUDA ops do (a call on another stream than the group's
previous call first waits for that one, except while a CUDA graph is captured). Its results are fresh
tensors on x's device (made on that stream), valid after the next call too; rows past the valid ones
are unspecified (the NPU's are too; the CPU path's are zero). Every tensor of a call must be on x's device; a
tensor elsewhere (the CPU, another GPU) is a ValidationError naming it. Problems only the GPU can see (an
expert id out of range, a peer's failure or timeout) are raised by ``moedist.synchronize(group)``, and by
every call after that synchronize: a CUDA group that reported an error stays failed. The V2 pair
(npu_moe_distribute_dispatch_v2 / _combine_v2) takes CUDA tensors alike, on the same CUDA group.

The CUDA group of a group name is joined by its first call on CUDA tensors (collective, as every call
is), on x's device, sized for the most tokens a rank passes: ``max_bs`` of ``new_group*``, else
global_bs / ep_world_size when the call's global_bs is not 0, else that first call's BS; H and K are the
first call's. Its ranks must be processes of one host (CUDA IPC).

Tensors come in through DLPack. Each kind of CUDA tensor has a ``Backend`` that makes the outputs and
names the stream: torch's is built in; the tests of the emulated build register one for the fake
runtime's arrays (register_backend)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from . import _groups
from ._errors import ValidationError
from ._tensors import detached, dispatch_outputs, matrix

_KDL_CUDA, _KDL_CUDA_MANAGED = 2, 13  # DLPack device types


class Backend:
    """What the CUDA path needs of a kind of CUDA tensor beyond DLPack."""

    def device(self, t: Any) -> int:
        """The CUDA device index of tensor t."""
        return int(t.__dlpack_device__()[1])

    def stream(self, device: int) -> int:
        """The stream (a cudaStream_t as an int) that calls on `device` go to."""
        raise NotImplementedError

    def empty(self, shape: Tuple[int, ...], dtype: str, like: Any) -> Any:
        """A new tensor of `shape` and `dtype` ("bfloat16", "float16", "float32", "int8", "int32",
        "int64") on the device of `like`, made in the order of `stream`'s work."""
        raise NotImplementedError

    def dtype(self, t: Any) -> str:
        """t's dtype by the names of ``empty``."""
        raise NotImplementedError


class TorchBackend(Backend):
    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def device(self, t: Any) -> int:
        return int(t.device.index)

    def stream(self, device: int) -> int:
        return int(self.torch.cuda.current_stream(device).cuda_stream)

    def empty(self, shape: Tuple[int, ...], dtype: str, like: Any) -> Any:
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=like.device)

    def dtype(self, t: Any) -> str:
        return str(t.dtype).rsplit(".", 1)[-1]


_backends: Dict[type, Backend] = {}


def register_backend(kind: type, backend: Backend) -> None:
    """Makes CUDA tensors of type `kind` (DLPack producers) usable by the operators through `backend`."""
    _backends[kind] = backend


def _backend_of(t: Any) -> Optional[Backend]:
    for kind, backend in _backends.items():
        if isinstance(t, kind):
            return backend
    return None


def on_cuda(t: Any) -> bool:
    """Whether t is a CUDA tensor of a kind the operators take (torch's, or a registered backend's)."""
    if t is None or _backend_of(t) is None:
        return False
    if hasattr(t, "is_cuda"):
        return bool(t.is_cuda)
    return int(t.__dlpack_device__()[0]) in (_KDL_CUDA, _KDL_CUDA_MANAGED)


def _group(group_ep: Any, group_tp: Any, config: Dict[str, int], backend: Backend, lead: Any, bs: int, k: int,
           h: int) -> Any:
    device = backend.device(lead)
    group = _groups.cuda_group_for(group_ep, group_tp, config, device, bs, k, h)
    if bs > group.max_bs:
        raise ValidationError(f"x.shape[0] = {bs}: must be <= {group.max_bs}, the most tokens per rank the CUDA group "
                              f"of {group_ep} was joined for (new_group's max_bs)", "invalid_shape", "x.shape[0]",
                              str(bs), f"must be <= {group.max_bs}, the most tokens per rank the CUDA group was joined "
                              "for (new_group's max_bs)")
    return group


def _dispatch_call(x: Any, expert_ids: Any, group_ep: Any, group_tp: Any, config: Dict[str, int], quant_mode: int,
                   version: int) -> Tuple[Any, Tuple[Any, ...], int]:
    """What a dispatch on CUDA tensors runs with: its CUDA group, its seven outputs (fresh, on x's device,
    torch_npu's shapes), and the stream (its device's current one)."""
    backend = _backend_of(x)
    assert backend is not None
    specs = dispatch_outputs(x, expert_ids, quant_mode, config, version)
    bs, h = matrix("x", x)
    group = _group(group_ep, group_tp, config, backend, x, bs, matrix("expert_ids", expert_ids)[1], h)
    outputs = tuple(backend.empty(shape, backend.dtype(x) if dtype == "x" else dtype, x) for shape, dtype in specs)
    return group, outputs, backend.stream(group.device)


def _combine_call(expand_x: Any, expert_ids: Any, group_ep: Any, group_tp: Any,
                  config: Dict[str, int]) -> Tuple[Any, Any, int]:
    """What a combine on CUDA tensors runs with: its CUDA group, its output ((BS, H) in expand_x's dtype,
    fresh, on its device) and the stream."""
    backend = _backend_of(expand_x)
    assert backend is not None
    _, h = matrix("expand_x", expand_x)
    bs, k = matrix("expert_ids", expert_ids)
    group = _group(group_ep, group_tp, config, backend, expand_x, bs, k, h)
    return group, backend.empty((bs, h), backend.dtype(expand_x), expand_x), backend.stream(group.device)


def dispatch(x: Any, expert_ids: Any, group_ep: Any, group_tp: Any, config: Dict[str, int], quant_mode: int,
             expert_token_nums_type: int, scales: Any, x_active_mask: Any, expert_scales: Any) -> Tuple[Any, ...]:
    """npu_moe_distribute_dispatch on CUDA tensors: the seven results, fresh tensors on x's device."""
    x, expert_ids, scales, x_active_mask, expert_scales = (
        detached(t) for t in (x, expert_ids, scales, x_active_mask, expert_scales))
    group, outputs, stream = _dispatch_call(x, expert_ids, group_ep, group_tp, config, quant_mode, 1)
    group.dispatch(stream, x, expert_ids, scales, x_active_mask, expert_scales, quant_mode, expert_token_nums_type,
                   outputs)
    return outputs


def combine(expand_x: Any, expert_ids: Any, expand_idx: Any, ep_send_counts: Any, expert_scales: Any, group_ep: Any,
            group_tp: Any, config: Dict[str, int], tensors: Dict[str, Any], out_dtype: int, comm_quant_mode: int,
            group_list_type: int) -> Any:
    """npu_moe_distribute_combine on CUDA tensors: (BS, H) in expand_x's dtype, a fresh tensor. `tensors`
    holds the optional tensor parameters by name."""
    expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales = (
        detached(t) for t in (expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales))
    tensors = {name: detached(t) for name, t in tensors.items()}
    group, out, stream = _combine_call(expand_x, expert_ids, group_ep, group_tp, config)
    tp_send_counts = tensors["tp_send_counts"] if config["tp_world_size"] == 2 else None  # ignored without TP
    group.combine(stream, expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, tp_send_counts,
                  tensors["x_active_mask"], tensors["activation_scale"], tensors["weight_scale"], tensors["group_list"],
                  tensors["expand_scales"], tensors["shared_expert_x"], out_dtype, comm_quant_mode, group_list_type,
                  out)
    return out


def dispatch_v2(x: Any, expert_ids: Any, group_ep: Any, group_tp: Any, config: Dict[str, int], ints: Dict[str, int],
                comm_alg: str, tensors: Dict[str, Any]) -> Tuple[Any, ...]:
    """npu_moe_distribute_dispatch_v2 on CUDA tensors: the seven results, fresh tensors on x's device
    (assist_info_for_combine: max(BS * K, 128 * A) entries, 3 per own row; the rest unspecified, as the
    rows of expand_x past the valid ones are). `tensors` holds the optional tensor parameters by name;
    performance_info is raised in place."""
    x, expert_ids = detached(x), detached(expert_ids)
    tensors = {name: detached(t) for name, t in tensors.items()}
    group, outputs, stream = _dispatch_call(x, expert_ids, group_ep, group_tp, config, ints["quant_mode"], 2)
    group.dispatch_v2(stream, x, expert_ids, tensors["scales"], tensors["x_active_mask"], tensors["expert_scales"],
                      tensors["elastic_info"], tensors["performance_info"], ints["quant_mode"],
                      ints["expert_token_nums_type"], ints["zero_expert_num"], ints["copy_expert_num"],
                      ints["const_expert_num"], comm_alg, outputs)
    return outputs


def combine_v2(expand_x: Any, expert_ids: Any, assist_info_for_combine: Any, ep_send_counts: Any, expert_scales: Any,
               group_ep: Any, group_tp: Any, config: Dict[str, int], ints: Dict[str, int], comm_alg: str,
               tensors: Dict[str, Any]) -> Any:
    """npu_moe_distribute_combine_v2 on CUDA tensors: (BS, H) in expand_x's dtype, a fresh tensor."""
    expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales = (
        detached(t) for t in (expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales))
    tensors = {name: detached(t) for name, t in tensors.items()}
    group, out, stream = _combine_call(expand_x, expert_ids, group_ep, group_tp, config)
    tp_send_counts = tensors["tp_send_counts"] if config["tp_world_size"] == 2 else None  # ignored without TP
    group.combine_v2(stream, expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales,
                     tp_send_counts, tensors["x_active_mask"], tensors["expand_scales"], tensors["shared_expert_x"],
                     tensors["elastic_info"], tensors["ori_x"], tensors["const_expert_alpha_1"],
                     tensors["const_expert_alpha_2"], tensors["const_expert_v"], tensors["performance_info"],
                     ints["comm_quant_mode"], ints["zero_expert_num"], ints["copy_expert_num"],
                     ints["const_expert_num"], comm_alg, out)
    return out
