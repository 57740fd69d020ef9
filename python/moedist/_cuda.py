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

from . import _groups, _moedist
from ._errors import ValidationError

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

    def readable(self, t: Any) -> Any:
        """t as the extension reads it through DLPack (or None)."""
        return t


class TorchBackend(Backend):
    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def readable(self, t: Any) -> Any:
        # The ops have no autograd formula (as on the CPU path): what they read of a tensor that requires
        # grad is its data (DLPack refuses such a tensor itself).
        return t.detach() if t is not None and t.requires_grad else t

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


def _matrix(name: str, t: Any) -> Tuple[int, int]:
    shape = tuple(t.shape)
    if len(shape) != 2:
        raise ValidationError(f"{name}.dim() = {len(shape)}: must be 2", "invalid_shape", f"{name}.dim()",
                              str(len(shape)), "must be 2")
    return int(shape[0]), int(shape[1])


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


def dispatch(x: Any, expert_ids: Any, group_ep: Any, group_tp: Any, config: Dict[str, int], quant_mode: int,
             expert_token_nums_type: int, scales: Any, x_active_mask: Any, expert_scales: Any) -> Tuple[Any, ...]:
    """npu_moe_distribute_dispatch on CUDA tensors: the seven results, fresh tensors on x's device."""
    backend = _backend_of(x)
    assert backend is not None
    x, expert_ids, scales, x_active_mask, expert_scales = (
        backend.readable(t) for t in (x, expert_ids, scales, x_active_mask, expert_scales))
    bs, h = _matrix("x", x)
    _, k = _matrix("expert_ids", expert_ids)
    group = _group(group_ep, group_tp, config, backend, x, bs, k, h)
    cap = _moedist.capacity(config, bs, k, h, quant_mode)
    rows, t = cap["max_receive_rows"], max(config["tp_world_size"], 0)
    shapes = [((rows, h), "int8" if quant_mode == 2 else backend.dtype(x)), ((rows,), "float32"), ((bs * k,), "int32"),
              ((cap["local_expert_num"],), "int64"), ((cap["ep_recv_counts_len"],), "int32"), ((t,), "int32"),
              ((rows,), "float32")]
    outputs = tuple(backend.empty(shape, dtype, x) for shape, dtype in shapes)
    group.dispatch(backend.stream(group.device), x, expert_ids, scales, x_active_mask, expert_scales, quant_mode,
                   expert_token_nums_type, outputs)
    return outputs


def combine(expand_x: Any, expert_ids: Any, expand_idx: Any, ep_send_counts: Any, expert_scales: Any, group_ep: Any,
            group_tp: Any, config: Dict[str, int], tensors: Dict[str, Any], out_dtype: int, comm_quant_mode: int,
            group_list_type: int) -> Any:
    """npu_moe_distribute_combine on CUDA tensors: (BS, H) in expand_x's dtype, a fresh tensor. `tensors`
    holds the optional tensor parameters by name."""
    backend = _backend_of(expand_x)
    assert backend is not None
    expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales = (
        backend.readable(t) for t in (expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales))
    tensors = {name: backend.readable(t) for name, t in tensors.items()}
    _, h = _matrix("expand_x", expand_x)
    bs, k = _matrix("expert_ids", expert_ids)
    group = _group(group_ep, group_tp, config, backend, expand_x, bs, k, h)
    out = backend.empty((bs, h), backend.dtype(expand_x), expand_x)
    tp_send_counts = tensors["tp_send_counts"] if config["tp_world_size"] == 2 else None  # ignored without TP
    group.combine(backend.stream(group.device), expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales,
                  tp_send_counts, tensors["x_active_mask"], tensors["activation_scale"], tensors["weight_scale"],
                  tensors["group_list"], tensors["expand_scales"], tensors["shared_expert_x"], out_dtype,
                  comm_quant_mode, group_list_type, out)
    return out


def dispatch_v2(x: Any, expert_ids: Any, group_ep: Any, group_tp: Any, config: Dict[str, int], ints: Dict[str, int],
                comm_alg: str, tensors: Dict[str, Any]) -> Tuple[Any, ...]:
    """npu_moe_distribute_dispatch_v2 on CUDA tensors: the seven results, fresh tensors on x's device
    (assist_info_for_combine: max(BS * K, 128 * A) entries, 3 per own row; the rest unspecified, as the
    rows of expand_x past the valid ones are). `tensors` holds the optional tensor parameters by name;
    performance_info is raised in place."""
    backend = _backend_of(x)
    assert backend is not None
    x, expert_ids = backend.readable(x), backend.readable(expert_ids)
    tensors = {name: backend.readable(t) for name, t in tensors.items()}
    bs, h = _matrix("x", x)
    _, k = _matrix("expert_ids", expert_ids)
    group = _group(group_ep, group_tp, config, backend, x, bs, k, h)
    quant_mode = ints["quant_mode"]
    cap = _moedist.capacity(config, bs, k, h, quant_mode, 2)
    rows, a, t = cap["max_receive_rows"], cap["A"], max(config["tp_world_size"], 0)
    shapes = [((rows, h), "int8" if quant_mode == 2 else backend.dtype(x)), ((rows,), "float32"),
              ((max(bs * k, 128 * a),), "int32"), ((cap["local_expert_num"],), "int64"),
              ((cap["ep_recv_counts_len"],), "int32"), ((t,), "int32"), ((a,), "float32")]
    outputs = tuple(backend.empty(shape, dtype, x) for shape, dtype in shapes)
    group.dispatch_v2(backend.stream(group.device), x, expert_ids, tensors["scales"], tensors["x_active_mask"],
                      tensors["expert_scales"], tensors["elastic_info"], tensors["performance_info"], quant_mode,
                      ints["expert_token_nums_type"], ints["zero_expert_num"], ints["copy_expert_num"],
                      ints["const_expert_num"], comm_alg, outputs)
    return outputs


def combine_v2(expand_x: Any, expert_ids: Any, assist_info_for_combine: Any, ep_send_counts: Any, expert_scales: Any,
               group_ep: Any, group_tp: Any, config: Dict[str, int], ints: Dict[str, int], comm_alg: str,
               tensors: Dict[str, Any]) -> Any:
    """npu_moe_distribute_combine_v2 on CUDA tensors: (BS, H) in expand_x's dtype, a fresh tensor."""
    backend = _backend_of(expand_x)
    assert backend is not None
    expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales = (
        backend.readable(t) for t in (expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales))
    tensors = {name: backend.readable(t) for name, t in tensors.items()}
    _, h = _matrix("expand_x", expand_x)
    bs, k = _matrix("expert_ids", expert_ids)
    group = _group(group_ep, group_tp, config, backend, expand_x, bs, k, h)
    out = backend.empty((bs, h), backend.dtype(expand_x), expand_x)
    tp_send_counts = tensors["tp_send_counts"] if config["tp_world_size"] == 2 else None  # ignored without TP
    group.combine_v2(backend.stream(group.device), expand_x, expert_ids, assist_info_for_combine, ep_send_counts,
                     expert_scales, tp_send_counts, tensors["x_active_mask"], tensors["expand_scales"],
                     tensors["shared_expert_x"], tensors["elastic_info"], tensors["ori_x"],
                     tensors["const_expert_alpha_1"], tensors["const_expert_alpha_2"], tensors["const_expert_v"],
                     tensors["performance_info"], ints["comm_quant_mode"], ints["zero_expert_num"],
                     ints["copy_expert_num"], ints["const_expert_num"], comm_alg, out)
    return out


def synchronize_group(group: Any, stream: Optional[int]) -> None:
    """Waits for the calls of one CUDA group on `stream` (default: the stream of its latest call) and
    raises the first error its GPU recorded."""
    group.synchronize(stream)
