"""The V2 operators from Python: moedist.npu_moe_distribute_dispatch_v2 / _combine_v2 with torch_npu's
parameter names and results, every output compared with the V2 oracle bit for bit, over ranks as
processes (shared memory), torch and numpy inputs, with (BS,) and (BS, K) masks, zero / copy / const
experts, Sn shared experts, shared_expert_x and performance_info."""
import inspect

import numpy as np
import pytest

import moedist
from moedist import _moedist
from cases import bits_of, random_half_bits, to_mask, to_other, to_tensor
from conftest import run_ranks


def random_v2_case(seed):
    """A random valid V2 case of 1 to 4 ranks (no TP), in the dict form oracle_v2_run takes."""
    rng = np.random.default_rng(seed)
    w = int(rng.integers(1, 5))
    s = int(rng.integers(0, w)) if rng.random() < 0.6 else 0
    sn_choices = [sn for sn in range(1, 5) if s % sn == 0] if s > 0 else [0, 1]
    sn = int(rng.choice(sn_choices))
    e = (w - s) * int(rng.integers(1, 4))
    z, c, q = (int(v) for v in rng.integers(0, 3, size=3)) if rng.random() < 0.7 else (0, 0, 0)
    ids = e + z + c + q
    k = int(rng.integers(1, min(ids, 6) + 1))
    h = int(rng.integers(8, 40))
    dtype = "bfloat16" if rng.random() < 0.5 else "float16"
    quant = 2 if rng.random() < 0.5 else 0
    bs = int(rng.integers(1, 6))
    case = dict(ep_world_size=w, tp_world_size=0, moe_expert_num=e, shared_expert_rank_num=s, shared_expert_num=sn,
                zero_expert_num=z, copy_expert_num=c, const_expert_num=q, global_bs=0, quant_mode=quant,
                expert_token_nums_type=int(rng.integers(0, 2)), comm_quant_mode=2 if rng.random() < 0.3 else 0,
                dtype=dtype, h=h, k=k, ranks=[])
    mask_kind = rng.choice(["none", "tokens", "entries"])
    with_shared_x = s == 0 and rng.random() < 0.5
    for _ in range(w):
        r = dict(x=random_half_bits(rng, (bs, h), dtype),
                 expert_ids=np.stack([rng.permutation(ids)[:k] for _ in range(bs)]).astype(np.int32),
                 expert_scales=rng.uniform(-1, 1, size=(bs, k)).astype(np.float32))
        if quant == 2 and rng.random() < 0.5:
            r["scales"] = rng.uniform(0.5, 2, size=((sn if s else 0) + e, h)).astype(np.float32)
        if mask_kind == "tokens":
            n = int(rng.integers(0, bs + 1))
            r["x_active_mask"] = np.arange(bs) < n
            r["expert_ids"][n:] = -5  # never read
        elif mask_kind == "entries":
            mask = rng.random((bs, k)) < 0.7
            r["x_active_mask"] = mask
            r["expert_ids"][~mask] = ids + 9  # never read
        if c + q > 0 or rng.random() < 0.3:
            r["ori_x"] = random_half_bits(rng, (bs, h), dtype)
        if q > 0:
            for name, scale in (("const_expert_alpha_1", 0.2), ("const_expert_alpha_2", 0.2), ("const_expert_v", 1.0)):
                r[name] = random_half_bits(rng, (q, h), dtype, scale)
        if with_shared_x:
            r["shared_expert_x"] = random_half_bits(rng, (bs, h), dtype)
        case["ranks"].append(r)
    rows = [o["valid_rows"] for o in _moedist.oracle_v2_run(case)]
    for r, n in zip(case["ranks"], rows):
        r["combine_x"] = random_half_bits(rng, (n, h), dtype, 2.0)
    return case


CONFIG = ("ep_world_size", "moe_expert_num", "shared_expert_rank_num", "shared_expert_num", "global_bs",
          "zero_expert_num", "copy_expert_num", "const_expert_num")


def check_v2_rank(g, n, case, kind, strided, job):
    want = _moedist.oracle_v2_run(case)[g]
    ep, _ = moedist.new_group(job, g, n)
    r = case["ranks"][g]
    dtype = case["dtype"]
    kw = {name: case[name] for name in CONFIG}
    kw.update(ep_rank_id=g, group_ep=ep.get_hccl_comm_name(g))
    half = lambda name: None if name not in r else to_tensor(r[name], dtype, kind, strided)
    other = lambda name: None if name not in r else to_other(r[name], kind, strided)
    mask = to_mask(r.get("x_active_mask"), kind, strided)
    perf = to_other(np.zeros(case["ep_world_size"], np.int64), kind)
    out = moedist.npu_moe_distribute_dispatch_v2(
        half("x"), other("expert_ids"), **kw, scales=other("scales"), x_active_mask=mask,
        expert_scales=other("expert_scales"), performance_info=perf, quant_mode=case["quant_mode"],
        expert_token_nums_type=case["expert_token_nums_type"], comm_alg="fullmesh_v1")
    assert len(out) == 7
    expand_x, dynamic_scales, assist, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales = out
    valid, own = want["valid_rows"], want["own_rows"]
    np.testing.assert_array_equal(bits_of(expand_x)[:valid], want["expand_x"], err_msg=f"rank {g} expand_x")
    if case["quant_mode"] == 2:
        np.testing.assert_array_equal(bits_of(dynamic_scales)[:valid], want["dynamic_scales"], err_msg=f"rank {g} dynamic_scales")
    np.testing.assert_array_equal(bits_of(expand_scales)[:valid], want["expand_scales"][:len(expand_scales)],
                                  err_msg=f"rank {g} expand_scales")
    np.testing.assert_array_equal(bits_of(assist)[:3 * own], want["assist_info_for_combine"], err_msg=f"rank {g} assist")
    np.testing.assert_array_equal(bits_of(expert_token_nums), want["expert_token_nums"], err_msg=f"rank {g} expert_token_nums")
    np.testing.assert_array_equal(bits_of(ep_recv_counts), want["ep_recv_counts"], err_msg=f"rank {g} ep_recv_counts")
    # torch_npu's shapes (V2 §1.4)
    bs, k = r["expert_ids"].shape
    cap = _moedist.capacity({**{name: case[name] for name in CONFIG}, "ep_rank_id": g, "tp_world_size": 0,
                             "tp_rank_id": 0, "expert_shard_type": 0}, bs, k, case["h"], case["quant_mode"], 2)
    assert tuple(assist.shape) == (max(bs * k, 128 * cap["A"]),)
    assert tuple(expand_x.shape) == (cap["max_receive_rows"], case["h"]) and tuple(expand_scales.shape) == (cap["A"],)
    assert tuple(tp_recv_counts.shape) == (0,)
    assert (bits_of(perf) >= 0).all()

    y = moedist.npu_moe_distribute_combine_v2(
        half("combine_x"), other("expert_ids"), assist, ep_recv_counts, other("expert_scales"), **kw,
        x_active_mask=mask, shared_expert_x=half("shared_expert_x"), ori_x=half("ori_x"),
        const_expert_alpha_1=half("const_expert_alpha_1"), const_expert_alpha_2=half("const_expert_alpha_2"),
        const_expert_v=half("const_expert_v"), performance_info=perf, comm_quant_mode=case["comm_quant_mode"])
    np.testing.assert_array_equal(bits_of(y), want["combine_out"], err_msg=f"rank {g} combine output")
    return True


def seeds_of(world, want):
    found, seed = [], 0
    while len(found) < want:
        if random_v2_case(seed)["ep_world_size"] == world:
            found.append(seed)
        seed += 1
    return found


def v2_ranks(g, n, seeds, kind, strided, job):
    for seed in seeds:
        check_v2_rank(g, n, random_v2_case(seed), kind, strided, f"{job}-{seed}")
    return True


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_v2_matches_the_oracle(world, kind, job):
    run_ranks(world, v2_ranks, seeds_of(world, 3), kind, world % 2 == 0, job, timeout=300)


def test_v2_signatures_are_torch_npus():
    dispatch = list(inspect.signature(moedist.npu_moe_distribute_dispatch_v2).parameters)
    assert dispatch == ["x", "expert_ids", "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num", "scales",
                        "x_active_mask", "expert_scales", "elastic_info", "performance_info", "group_tp",
                        "tp_world_size", "tp_rank_id", "expert_shard_type", "shared_expert_num",
                        "shared_expert_rank_num", "quant_mode", "global_bs", "expert_token_nums_type", "comm_alg",
                        "zero_expert_num", "copy_expert_num", "const_expert_num", "y_dtype", "x_dtype", "scales_dtype"]
    combine = list(inspect.signature(moedist.npu_moe_distribute_combine_v2).parameters)
    assert combine == ["expand_x", "expert_ids", "assist_info_for_combine", "ep_send_counts", "expert_scales", "group_ep",
                       "ep_world_size", "ep_rank_id", "moe_expert_num", "tp_send_counts", "x_active_mask",
                       "expand_scales", "shared_expert_x", "elastic_info", "ori_x", "const_expert_alpha_1",
                       "const_expert_alpha_2", "const_expert_v", "performance_info", "group_tp", "tp_world_size",
                       "tp_rank_id", "expert_shard_type", "shared_expert_num", "shared_expert_rank_num", "global_bs",
                       "comm_quant_mode", "comm_alg", "zero_expert_num", "copy_expert_num", "const_expert_num"]


def test_v2_refuses_what_it_does_not_implement(job):
    ep, _ = moedist.new_group(job, 0, 1)
    x = np.zeros((2, 8), np.float16)
    ids = np.zeros((2, 1), np.int32)
    kw = dict(group_ep=ep.get_hccl_comm_name(0), ep_world_size=1, ep_rank_id=0, moe_expert_num=2)
    with pytest.raises(moedist.ValidationError, match="elastic scaling is not supported") as e:
        moedist.npu_moe_distribute_dispatch_v2(x, ids, **kw, elastic_info=np.zeros(6, np.int32))
    assert e.value.code == "unsupported" and e.value.parameter == "elastic_info"
    with pytest.raises(moedist.ValidationError, match="y_dtype = 23") as e:
        moedist.npu_moe_distribute_dispatch_v2(x, ids, **kw, y_dtype=23)
    assert e.value.code == "unsupported"
    with pytest.raises(moedist.ValidationError, match="comm_alg") as e:
        moedist.npu_moe_distribute_dispatch_v2(x, ids, **kw, comm_alg="ring")
    assert e.value.parameter == "comm_alg"
