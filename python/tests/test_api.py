"""torch_npu parity of the signatures, tensor kinds in and out, reserved parameters, group names and
errors (C++ errors arrive as moedist exceptions with the same message)."""
import inspect

import numpy as np
import pytest
import torch

import moedist
from cases import bits_of, check_rank, random_case
from conftest import run_ranks

# torch_npu's signatures, from the contract's §1.1 and §1.3 (the operator pages' 函数原型).
DISPATCH = [("x", None), ("expert_ids", None), ("group_ep", None), ("ep_world_size", None), ("ep_rank_id", None),
            ("moe_expert_num", None)]
DISPATCH_KW = [("scales", None), ("x_active_mask", None), ("expert_scales", None), ("group_tp", ""), ("tp_world_size", 0),
               ("tp_rank_id", 0), ("expert_shard_type", 0), ("shared_expert_num", 1), ("shared_expert_rank_num", 0),
               ("quant_mode", 0), ("global_bs", 0), ("expert_token_nums_type", 1)]
COMBINE = [("expand_x", None), ("expert_ids", None), ("expand_idx", None), ("ep_send_counts", None), ("expert_scales", None),
           ("group_ep", None), ("ep_world_size", None), ("ep_rank_id", None), ("moe_expert_num", None)]
COMBINE_KW = [("tp_send_counts", None), ("x_active_mask", None), ("activation_scale", None), ("weight_scale", None),
              ("group_list", None), ("expand_scales", None), ("shared_expert_x", None), ("group_tp", ""), ("tp_world_size", 0),
              ("tp_rank_id", 0), ("expert_shard_type", 0), ("shared_expert_num", 1), ("shared_expert_rank_num", 0),
              ("global_bs", 0), ("out_dtype", 0), ("comm_quant_mode", 0), ("group_list_type", 0)]


@pytest.mark.parametrize("fn, positional, keyword", [(moedist.npu_moe_distribute_dispatch, DISPATCH, DISPATCH_KW),
                                                     (moedist.npu_moe_distribute_combine, COMBINE, COMBINE_KW)])
def test_signature_is_torch_npus(fn, positional, keyword):
    params = list(inspect.signature(fn).parameters.values())
    got = [(p.name, p.kind, None if p.default is inspect.Parameter.empty else p.default) for p in params]
    want = [(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, d) for n, d in positional] + \
           [(n, inspect.Parameter.KEYWORD_ONLY, d) for n, d in keyword]
    assert got == want


# ---- one rank (W = 1, E = 2): the single-process cases ----

@pytest.fixture
def one(job):
    ep, _ = moedist.new_group(job, 0, 1)
    return ep.get_hccl_comm_name(0)


def inputs(dtype=torch.bfloat16, bs=4, h=16):
    torch.manual_seed(0)
    x = torch.randn(bs, h).to(dtype)
    ids = torch.tensor([[i % 2, (i + 1) % 2] for i in range(bs)], dtype=torch.int32)
    w = torch.rand(bs, 2)
    return x, ids, w


def test_torch_in_torch_out_numpy_in_numpy_out(one):
    for dtype in (torch.bfloat16, torch.float16):
        x, ids, w = inputs(dtype)
        d = moedist.npu_moe_distribute_dispatch(x, ids, one, 1, 0, 2, expert_scales=w)
        assert all(isinstance(t, torch.Tensor) for t in d)
        assert [t.dtype for t in d] == [dtype, torch.float32, torch.int32, torch.int64, torch.int32, torch.int32, torch.float32]
        y = moedist.npu_moe_distribute_combine(d[0], ids, d[2], d[4], w, one, 1, 0, 2)
        assert isinstance(y, torch.Tensor) and y.dtype == dtype and tuple(y.shape) == (4, 16)

        xn = x.view(torch.int16).numpy().view(np.uint16)
        xn = moedist.bfloat16(xn) if dtype == torch.bfloat16 else xn.view(np.float16)
        dn = moedist.npu_moe_distribute_dispatch(xn, ids.numpy(), one, 1, 0, 2, expert_scales=w.numpy())
        assert all(isinstance(t, np.ndarray) for t in dn)
        assert dn[0].dtype == (np.uint16 if dtype == torch.bfloat16 else np.float16)  # numpy bfloat16: bit patterns
        for a, b in zip(d, dn):
            np.testing.assert_array_equal(bits_of(a), bits_of(b))
        ex = moedist.bfloat16(dn[0]) if dtype == torch.bfloat16 else dn[0]
        yn = moedist.npu_moe_distribute_combine(ex, ids.numpy(), dn[2], dn[4], w.numpy(), one, 1, 0, 2)
        np.testing.assert_array_equal(bits_of(y), bits_of(yn))


def test_int8_dispatch_and_torch_npu_shapes(one):
    x, ids, w = inputs()
    expand_x, dynamic_scales, expand_idx, etn, counts, tp_counts, expand_scales = moedist.npu_moe_distribute_dispatch(
        x, ids, one, 1, 0, 2, quant_mode=2, expert_scales=w)
    a = 4 * 2  # A = global_bs * min(L, K) with global_bs = BS * W
    assert expand_x.dtype == torch.int8 and tuple(expand_x.shape) == (a, 16)
    assert tuple(dynamic_scales.shape) == (a,) and tuple(expand_idx.shape) == (8,) and tuple(etn.shape) == (2,)
    assert tuple(counts.shape) == (2,) and tuple(tp_counts.shape) == (0,) and tuple(expand_scales.shape) == (a,)


def test_inputs_that_need_care(one):
    x, ids, w = inputs()
    want = moedist.npu_moe_distribute_dispatch(x, ids, one, 1, 0, 2)
    # A tensor that requires grad, and read-only numpy arrays, are read in place too.
    got = moedist.npu_moe_distribute_dispatch(x.float().requires_grad_().to(torch.bfloat16), ids, one, 1, 0, 2)
    np.testing.assert_array_equal(bits_of(got[0]), bits_of(want[0]))
    ro_ids = ids.numpy().copy()
    ro_ids.setflags(write=False)
    got = moedist.npu_moe_distribute_dispatch(x, ro_ids, one, 1, 0, 2)
    np.testing.assert_array_equal(got[2], want[2].numpy())


def test_inputs_are_read_in_place_not_copied():
    from moedist import _moedist
    address = lambda t, view_as=_moedist.ViewAs.native: _moedist.describe_view(t, "x", view_as)["address"]
    wide = torch.randn(6, 32).to(torch.bfloat16)
    for t in (wide, wide[:, ::2], wide[1:], wide.t()):  # contiguous, strided, offset, transposed
        assert address(t) == t.data_ptr()
    a = np.zeros((4, 8), np.float16)
    for v in (a, a[:, ::2], a[1:]):
        assert address(v) == v.__array_interface__["data"][0]
    bits = np.zeros((4, 8), np.uint16)
    assert address(moedist.bfloat16(bits).array, _moedist.ViewAs.bfloat16) == bits.__array_interface__["data"][0]


def test_results_outlive_the_next_call(one):
    x, ids, w = inputs()
    first = moedist.npu_moe_distribute_dispatch(x, ids, one, 1, 0, 2)
    kept = bits_of(first[0]).copy()
    moedist.npu_moe_distribute_dispatch(x * 2, ids, one, 1, 0, 2)
    np.testing.assert_array_equal(bits_of(first[0]), kept)


# ---- errors ----

def raises(fn, parameter, code, text):
    with pytest.raises(moedist.ValidationError) as info:
        fn()
    e = info.value
    assert (e.parameter, e.code) == (parameter, code), (e.parameter, e.code, str(e))
    assert text in str(e), str(e)
    return e


def test_bad_arguments_raise_validation_errors_with_the_library_message(one):
    x, ids, w = inputs()
    d = lambda **kw: moedist.npu_moe_distribute_dispatch(**{**dict(x=x, expert_ids=ids, group_ep=one, ep_world_size=1,
                                                                   ep_rank_id=0, moe_expert_num=2), **kw})
    e = raises(lambda: d(expert_ids=ids + 5), "expert_ids[0, 0]", "invalid_argument", "expert_ids[0, 0] = 5: must be in [0, moe_expert_num = 2)")
    assert (e.value, e.rule) == ("5", "must be in [0, moe_expert_num = 2)") and isinstance(e, ValueError)
    raises(lambda: d(x=x.float()), "x.dtype", "invalid_dtype", "x.dtype = float32: must be bfloat16 or float16")
    raises(lambda: d(x=x.reshape(2, 2, 16)), "x.dim()", "invalid_shape", "must be 1 or 2")
    raises(lambda: d(x_active_mask=torch.ones(4, dtype=torch.bool).to(torch.int8)), "x_active_mask.dtype", "invalid_dtype",
           "x_active_mask.dtype = int8: must be bool")
    raises(lambda: d(quant_mode=1), "quant_mode", "unsupported", "quant_mode")
    raises(lambda: d(quant_mode=2.0), "quant_mode", "invalid_argument", "must be an integer")
    raises(lambda: d(scales=torch.ones(2, 16)), "scales", "invalid_argument", "scales")
    raises(lambda: d(x=[[1.0]]), "x", "invalid_argument", "must be a torch tensor, a numpy array or None")
    raises(lambda: d(x=x.view(torch.int16).numpy().view(np.uint16)), "x.dtype", "invalid_dtype", "moedist.bfloat16")


def test_reserved_combine_parameters_are_checked_as_on_the_npu(one):
    x, ids, w = inputs()
    d = moedist.npu_moe_distribute_dispatch(x, ids, one, 1, 0, 2)
    c = lambda **kw: moedist.npu_moe_distribute_combine(**{**dict(expand_x=d[0], expert_ids=ids, expand_idx=d[2],
                                                                   ep_send_counts=d[4], expert_scales=w, group_ep=one,
                                                                   ep_world_size=1, ep_rank_id=0, moe_expert_num=2), **kw})
    some = torch.zeros(4, dtype=torch.int32)
    for name in ("activation_scale", "weight_scale", "group_list", "shared_expert_x"):
        raises(lambda: c(**{name: some}), name, "invalid_argument", name)
    raises(lambda: c(out_dtype=1), "out_dtype", "invalid_argument", "out_dtype")
    raises(lambda: c(group_list_type=1), "group_list_type", "invalid_argument", "group_list_type")
    c(tp_send_counts=torch.zeros(1, dtype=torch.int32), expand_scales=d[6])  # accepted, as torch_npu's example passes them


def test_group_names_are_checked(one, job):
    x, ids, w = inputs()
    d = lambda **kw: moedist.npu_moe_distribute_dispatch(**{**dict(x=x, expert_ids=ids, group_ep=one, ep_world_size=1,
                                                                   ep_rank_id=0, moe_expert_num=2), **kw})
    raises(lambda: d(group_ep="hccl_world_group"), "group_ep", "invalid_argument", "is not the name of a moedist group")
    raises(lambda: d(group_ep=""), "group_ep", "invalid_argument", "length [1, 128)")
    raises(lambda: d(group_ep="g" * 128), "group_ep", "invalid_argument", "length [1, 128)")
    raises(lambda: d(ep_world_size=2, moe_expert_num=2), "ep_world_size", "invalid_argument", "must equal the size of group_ep, 1")
    raises(lambda: d(ep_rank_id=1), "ep_rank_id", "invalid_argument", "must be in [0, ep_world_size = 1)")
    ep, tp = moedist.new_group(job + "-tp", 1, 2, tp_world_size=2)
    raises(lambda: d(group_ep=ep.name, group_tp=ep.name, tp_world_size=2, tp_rank_id=1), "group_tp", "invalid_argument",
           "must differ from group_ep")
    raises(lambda: d(group_ep=tp.name), "group_ep", "invalid_argument", "must name an EP group, not a TP group")


def bad_ids_on_rank_1(g, n, job):
    ep, _ = moedist.new_group(job, g, n)
    x, ids, w = inputs()
    try:
        moedist.npu_moe_distribute_dispatch(x, ids + (5 if g == 1 else 0), ep.name, n, g, 2 * n)
    except moedist.ValidationError as e:
        return ("validation", e.parameter, -1)
    except moedist.PeerError as e:
        return ("peer", e.code, e.peer)
    return ("none", "", -1)


def test_a_peers_error_names_the_peer(job):
    results = run_ranks(2, bad_ids_on_rank_1, job)
    assert results == [("peer", "peer_failed", 1), ("validation", "expert_ids[0, 0]", -1)]


def test_version():
    assert moedist.__version__.count(".") == 2 and "transports" in moedist.version
