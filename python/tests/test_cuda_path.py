"""The package's CUDA path as far as a machine without a GPU can see it: which calls take it, the group
options and functions it adds, and the C++ CUDA group's refusal without a device. The path itself, from
the operators down to the kernels, runs in python.cuda_emulated (cuda_path_check.py on the emulated
build); with torch CUDA tensors on a GPU in scripts/gpu_session.sh --python."""
import numpy as np
import pytest
import torch

import moedist
from moedist import _cuda, _moedist
from moedist._groups import DEFAULT_TIMEOUT_MS


def test_the_build_says_whether_it_has_the_cuda_group():
    assert moedist.has_cuda == _moedist.has_cuda
    assert hasattr(_moedist, "CudaGroup") == _moedist.has_cuda
    assert not _moedist.cuda_emulated  # the emulated twin is a separate package (python-cuda-emulated)


def test_cpu_tensors_and_numpy_arrays_stay_on_the_cpu_path():
    for t in (torch.zeros(2, 3, dtype=torch.bfloat16), np.zeros((2, 3), np.float16), None, [1, 2]):
        assert not _cuda.on_cuda(t)


def test_torch_backend_names_dtypes_as_the_outputs_are_made():
    backend = _cuda.TorchBackend(torch)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.int32, torch.int64):
        name = backend.dtype(torch.zeros(1, dtype=dtype))
        assert getattr(torch, name) is dtype
        made = backend.empty((2, 3), name, torch.zeros(1))
        assert made.dtype is dtype and tuple(made.shape) == (2, 3)


def test_max_bs_is_checked_and_held_by_the_open_group(job):
    for bad, rule in ((0, "must be"), (2**31, "must be"), ("4", "int")):
        with pytest.raises(moedist.ValidationError) as info:
            moedist.new_group(job, 0, 1, max_bs=bad)
        assert info.value.parameter == "max_bs" and rule in info.value.rule, str(info.value)
    ep, tp = moedist.new_group(job, 0, 1, max_bs=8)
    with pytest.raises(moedist.ValidationError) as info:
        moedist.new_group(job, 0, 1, max_bs=16)
    assert (info.value.parameter, info.value.code) == ("max_bs", "config_mismatch"), str(info.value)
    ep.close()
    tp.close()
    ep, tp = moedist.new_group(job, 0, 1, max_bs=16)  # closed: may open again with another value
    ep.close()
    tp.close()


def test_synchronize_names_unknown_groups_and_waits_for_nothing_without_cuda_calls(job):
    with pytest.raises(moedist.ValidationError) as info:
        moedist.synchronize("no-such-group")
    assert info.value.parameter == "group", str(info.value)
    ep, tp = moedist.new_group(job, 0, 1)
    moedist.synchronize(ep)  # no call on CUDA tensors: nothing to wait for
    moedist.synchronize(ep.name)
    ep.close()
    tp.close()
    with pytest.raises(moedist.ValidationError) as info:
        moedist.synchronize(ep)
    assert "closed" in info.value.rule, str(info.value)


if _moedist.has_cuda:  # defined only where it applies: python.pytest fails on any skip
    def test_the_cuda_group_refuses_a_join_it_cannot_make(job):
        available, reason = _moedist.cuda_available()
        config = dict(ep_world_size=1, ep_rank_id=0, moe_expert_num=2)
        with pytest.raises(moedist.Error) as info:  # no device here; on a GPU machine, no device 10000
            _moedist.CudaGroup.join(config, job, 10000 if available else 0, 4, 2, 16, DEFAULT_TIMEOUT_MS)
        if available:
            assert "cudaSetDevice" in str(info.value), str(info.value)
        else:
            assert info.value.code == "unsupported" and reason in str(info.value), str(info.value)
