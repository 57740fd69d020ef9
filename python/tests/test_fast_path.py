"""The fast path (python/src/module.cpp's dispatch_call / combine_call): a plain eager call -- torch
tensors on the CPU, Python ints, a group and configuration resolved by an earlier call, no torch mode --
is one call of the extension, whose C++ call writes fresh torch tensors. It gives the general path's
results bit for bit, every element (the rows past the valid ones are zero on both), shapes, dtypes and
strides alike (C-contiguous); and it declines (None, so that the general path reads or names it) every call that is not
plain."""
import contextlib

import numpy as np
import pytest
import torch

import moedist
from cases import bits_of, random_case, rank_kwargs, seeds_for, to_mask, to_other, to_tensor
from conftest import run_ranks
from moedist import _groups, _moedist, _ops


@contextlib.contextmanager
def general_path_only():
    """The public functions with the fast path declining every call."""
    saved = _ops._dispatch_call, _ops._combine_call
    _ops._dispatch_call = _ops._combine_call = lambda *args: None
    try:
        yield
    finally:
        _ops._dispatch_call, _ops._combine_call = saved


@contextlib.contextmanager
def fast_path_spied(taken):
    """Appends to `taken` whether each call took the fast path."""
    saved = _ops._dispatch_call, _ops._combine_call

    def spy(fn):
        def call(*args):
            result = fn(*args)
            taken.append(result is not None)
            return result
        return call

    _ops._dispatch_call, _ops._combine_call = spy(saved[0]), spy(saved[1])
    try:
        yield
    finally:
        _ops._dispatch_call, _ops._combine_call = saved


def round_trip(case, g, ep, tp):
    """Rank g's dispatch and combine of `case` with torch tensors: the seven results and combine's."""
    r = case["ranks"][g]
    t = case["tp_world_size"]
    names = dict(group_ep=ep.name, group_tp=tp.name if t == 2 else "")
    x = to_tensor(r["x"], case["dtype"], "torch")
    ids = to_other(r["expert_ids"], "torch")
    mask = to_mask(r.get("x_active_mask"), "torch")
    out = moedist.npu_moe_distribute_dispatch(x, ids, **names, **rank_kwargs(case, g),
                                              scales=to_other(r.get("scales"), "torch"),
                                              expert_scales=to_other(r.get("expert_scales"), "torch"), x_active_mask=mask,
                                              quant_mode=case["quant_mode"],
                                              expert_token_nums_type=case["expert_token_nums_type"])
    weights = to_other(r.get("expert_scales", np.ones(r["expert_ids"].shape, np.float32)), "torch")
    y = moedist.npu_moe_distribute_combine(to_tensor(r["combine_x"], case["dtype"], "torch"), ids, out[2], out[4], weights,
                                           **names, **rank_kwargs(case, g), tp_send_counts=out[5], x_active_mask=mask,
                                           comm_quant_mode=case["comm_quant_mode"])
    return list(out) + [y]


def same_results(g, n, seeds, job):
    """Every seed's round trip on the general path (whose first call resolves the group), then on the fast
    path: equal in every element, shape, dtype and stride."""
    for seed in seeds:
        case = random_case(seed, masks=True)
        ep, tp = moedist.new_group(f"{job}-{seed}", g, n, tp_world_size=case["tp_world_size"])
        with general_path_only():
            general = round_trip(case, g, ep, tp)
        taken = []
        with fast_path_spied(taken):
            fast = round_trip(case, g, ep, tp)
        assert taken == [True, True], (seed, g, taken)
        for i, (a, b) in enumerate(zip(general, fast)):
            assert type(b) is torch.Tensor and (a.dtype, a.shape) == (b.dtype, b.shape), (seed, g, i)
            assert b.is_contiguous() and (a.numel() == 0 or a.stride() == b.stride()), (seed, g, i)
            np.testing.assert_array_equal(bits_of(a), bits_of(b), err_msg=f"seed {seed} rank {g} result {i}")
        valid = _moedist.oracle_run(case)[g]["valid_rows"]
        for i in (0, 1, 6):  # expand_x, dynamic_scales, expand_scales: zero past the valid rows
            assert not bits_of(fast[i])[valid:].any(), (seed, g, i)
    return True


@pytest.mark.parametrize("world, tp", [(1, None), (2, 0), (2, 2), (4, None)])
def test_the_fast_path_gives_the_general_paths_results_bit_for_bit(world, tp, job):
    # Random cases with masks (rows past the valid ones), quantization, shared experts, uneven BS.
    run_ranks(world, same_results, seeds_for(world, 3, tp=tp), job)


# ---- what the fast path declines ----

def inputs(dtype=torch.bfloat16, bs=4, h=16):
    torch.manual_seed(0)
    x = torch.randn(bs, h).to(dtype)
    ids = torch.tensor([[i % 2, (i + 1) % 2] for i in range(bs)], dtype=torch.int32)
    return x, ids, torch.rand(bs, 2)


class Logged(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def with_argument(args, i, value):
    args = list(args)
    args[i] = value
    return args


def test_the_fast_path_declines_calls_that_are_not_plain(job):
    ep, _ = moedist.new_group(job, 0, 1)
    x, ids, w = inputs()
    d = moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 2)  # resolves the group
    dispatch = (x, ids, ep.name, 1, 0, 2, None, None, None, "", 0, 0, 0, 1, 0, 0, 0, 1)
    combine = (d[0], ids, d[2], d[4], w, ep.name, 1, 0, 2, None, None, None, None, None, None, None, "", 0, 0, 0, 1, 0, 0,
               0, 0, 0)
    assert _moedist.dispatch_call(*dispatch) is not None and _moedist.combine_call(*combine) is not None
    declined = {
        "numpy x": with_argument(dispatch, 0, x.view(torch.int16).numpy()),
        "a tensor subclass": with_argument(dispatch, 0, torch.nn.Parameter(x, requires_grad=False)),
        "meta x": with_argument(dispatch, 0, x.to("meta")),
        "float64 x": with_argument(dispatch, 0, x.double()),
        "3-D x": with_argument(dispatch, 0, x.reshape(2, 2, 16)),
        "1-D expert_ids": with_argument(dispatch, 1, ids.reshape(-1)),
        "expert_ids of other rows": with_argument(dispatch, 1, ids[:3]),
        "uint8 mask": with_argument(dispatch, 7, torch.ones(4, dtype=torch.uint8)),
        "a list": with_argument(dispatch, 8, [[1.0, 1.0]] * 4),
        "an unresolved group": with_argument(dispatch, 2, "moedist-ep-unknown"),
        "a group name that is no str": with_argument(dispatch, 2, 7),
        "another configuration": with_argument(dispatch, 5, 4),
        "numpy int": with_argument(dispatch, 3, np.int64(1)),
        "0-d tensor int": with_argument(dispatch, 4, torch.tensor(0)),
        "bool int": with_argument(dispatch, 4, False),
        "float int": with_argument(dispatch, 15, 0.0),
        "int past int32": with_argument(dispatch, 15, 2**31),
        "quant_mode capacity() refuses": with_argument(dispatch, 15, 1),
        "K capacity() refuses": with_argument(dispatch, 1, torch.zeros(4, 3, dtype=torch.int32)),
    }
    for why, args in declined.items():
        assert _moedist.dispatch_call(*args) is None, why
    combine_declined = {
        "float32 expand_x": with_argument(combine, 0, d[0].float()),
        "numpy expand_idx": with_argument(combine, 2, d[2].numpy()),
        "no expert_scales": with_argument(combine, 4, None),
    }
    for why, args in combine_declined.items():
        assert _moedist.combine_call(*args) is None, why
    # tp_send_counts is ignored without TP, as on the NPU (the general path does not read it either).
    assert _moedist.combine_call(*with_argument(combine, 9, "anything")) is not None
    with Logged():
        assert _moedist.dispatch_call(*dispatch) is None
    with torch.overrides.TorchFunctionMode():
        assert _moedist.dispatch_call(*dispatch) is None
    assert _moedist.dispatch_call(*dispatch) is not None
    with pytest.raises(TypeError):
        _moedist.dispatch_call(*dispatch[:-1])


def test_a_fast_calls_errors_are_the_general_paths(job):
    ep, _ = moedist.new_group(job, 0, 1)
    x, ids, w = inputs()
    moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 2)
    errors = []
    for path in (general_path_only, contextlib.nullcontext):
        with path(), pytest.raises(moedist.ValidationError) as info:
            moedist.npu_moe_distribute_dispatch(x, ids + 5, ep.name, 1, 0, 2)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and "expert_ids[0, 0] = 5" in errors[0]


def test_fast_results_are_fresh_tensors_that_outlive_later_calls(job):
    ep, _ = moedist.new_group(job, 0, 1)
    x, ids, w = inputs()
    moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 2)
    first = moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 2, expert_scales=w)
    kept = [bits_of(t).copy() for t in first]
    second = moedist.npu_moe_distribute_dispatch(x * 2, ids, ep.name, 1, 0, 2, expert_scales=w * 3)
    for a, b in zip(first, kept):
        np.testing.assert_array_equal(bits_of(a), b)
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(first, second) if a.numel())
    y = moedist.npu_moe_distribute_combine(first[0], ids, first[2], first[4], w, ep.name, 1, 0, 2)
    y[0, 0] = 1  # results are writable, as torch_npu's are
    assert first[0].is_contiguous() and y.is_contiguous()


def test_call_ns_and_fill_ns_count_the_cpp_calls_and_the_zero_fill(job):
    ep, _ = moedist.new_group(job, 0, 1)
    x, ids, w = inputs()
    d = moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 2)
    config = dict.fromkeys(_groups.CONFIG_KEYS, 0)
    config.update(ep_world_size=1, moe_expert_num=2, shared_expert_num=1)
    group = _groups.group_for(ep.name, "", config)
    before = group.call_ns
    moedist.npu_moe_distribute_combine(d[0], ids, d[2], d[4], w, ep.name, 1, 0, 2)
    assert group.call_ns > before
    # fill_ns: the fast path's zeroing of the rows past the valid ones (here all but one, of a wide x).
    wide = torch.ones(4, 4096, dtype=torch.bfloat16)
    mask = torch.tensor([True, False, False, False])
    moedist.npu_moe_distribute_dispatch(wide, ids, ep.name, 1, 0, 2, x_active_mask=mask)
    before = group.fill_ns
    d = moedist.npu_moe_distribute_dispatch(wide, ids, ep.name, 1, 0, 2, x_active_mask=mask)
    assert group.fill_ns > before and not d[0][2:].any() and d[0][:2].all()


def test_calls_that_alternate_between_groups_each_find_their_own(job):
    # More groups than the extension remembers recent calls of (4), called in turn, some names passed as
    # strings made afresh for each call: every call runs on its own group, on the fast path, and gives
    # what the general path gives.
    groups = [moedist.new_group(f"{job}-{i}", 0, 1)[0] for i in range(6)]
    x, ids, w = inputs()

    def round_trip(i, name):
        d = moedist.npu_moe_distribute_dispatch(x * (i + 1), ids, name, 1, 0, 2, expert_scales=w)
        return [bits_of(t).copy() for t in d] + [bits_of(moedist.npu_moe_distribute_combine(d[0], ids, d[2], d[4], w, name, 1,
                                                                                           0, 2))]

    with general_path_only():
        want = [round_trip(i, ep.name) for i, ep in enumerate(groups)]  # also resolves each group
    taken = []
    with fast_path_spied(taken):
        for _ in range(3):
            for i, ep in enumerate(groups):
                for a, b in zip(round_trip(i, "".join(list(ep.name)) if i % 2 else ep.name), want[i]):
                    np.testing.assert_array_equal(a, b)
    assert taken == [True] * (2 * 3 * len(groups))


def test_a_group_closed_after_fast_calls_is_refused_and_reopens(job):
    ep, _ = moedist.new_group(job, 0, 1)
    x, ids, w = inputs()
    for _ in range(3):  # the first resolves the group, the next ones take the fast path
        moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 2)
    ep.close()
    taken = []
    with fast_path_spied(taken), pytest.raises(moedist.ValidationError, match="this group was closed"):
        moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 2)
    assert taken == [False]
    again, _ = moedist.new_group(job, 0, 1)  # the same members: the same name, open again
    assert again.name == ep.name
    moedist.npu_moe_distribute_dispatch(x, ids, again.name, 1, 0, 2)
    with fast_path_spied(taken):
        moedist.npu_moe_distribute_dispatch(x, ids, again.name, 1, 0, 2)
    assert taken == [False, True]
