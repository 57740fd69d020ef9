"""The V2 operators as torch custom ops (torch >= 2.1): torch.ops.moedist.npu_moe_distribute_dispatch_v2 /
_combine_v2 with torch_npu's schemas, fake kernels with torch_npu's static shapes (V2 §1.4), and a
module calling them compiled with torch.compile(dynamic=False, fullgraph=True), giving the eager bits,
with performance_info updated in place through the graph."""
import inspect

import numpy as np
import torch

import moedist
from moedist import _custom_ops
from cases import bits_of, to_mask, to_other, to_tensor
from conftest import run_ranks
from test_v2 import CONFIG, random_v2_case


def test_v2_schemas_match_the_public_functions():
    for op, fn in ((torch.ops.moedist.npu_moe_distribute_dispatch_v2, moedist.npu_moe_distribute_dispatch_v2),
                   (torch.ops.moedist.npu_moe_distribute_combine_v2, moedist.npu_moe_distribute_combine_v2)):
        schema = op.default._schema
        assert [a.name for a in schema.arguments] == list(inspect.signature(fn).parameters)
        perf = next(a for a in schema.arguments if a.name == "performance_info")
        assert perf.alias_info is not None and perf.alias_info.is_write  # written in place
    assert len(torch.ops.moedist.npu_moe_distribute_dispatch_v2.default._schema.returns) == 7


def layer_inputs(case, g):
    r = case["ranks"][g]
    dtype = case["dtype"]
    half = lambda name: None if name not in r else to_tensor(r[name], dtype, "torch")
    other = lambda name: None if name not in r else to_other(r[name], "torch")
    return dict(x=half("x"), ids=other("expert_ids"), scales=other("scales"), weights=other("expert_scales"),
                mask=to_mask(r.get("x_active_mask"), "torch"), experts_out=half("combine_x"), ori_x=half("ori_x"),
                shared_x=half("shared_expert_x"), a1=half("const_expert_alpha_1"), a2=half("const_expert_alpha_2"),
                v=half("const_expert_v"))


def v2_layer(case, g, group_name):
    kw = {name: case[name] for name in CONFIG}
    kw.update(ep_rank_id=g, group_ep=group_name)

    def layer(t, perf):
        out = moedist.npu_moe_distribute_dispatch_v2(
            t["x"], t["ids"], **kw, scales=t["scales"], x_active_mask=t["mask"], expert_scales=t["weights"],
            performance_info=perf, quant_mode=case["quant_mode"], expert_token_nums_type=case["expert_token_nums_type"])
        expand_x, _, assist, _, ep_recv_counts, _, _ = out
        # The experts: the case's outputs, padded to expand_x's static rows.
        rows = torch.zeros((expand_x.shape[0], t["x"].shape[1]), dtype=t["x"].dtype)
        rows[:t["experts_out"].shape[0]] = t["experts_out"]
        y = moedist.npu_moe_distribute_combine_v2(
            rows, t["ids"], assist, ep_recv_counts, t["weights"], **kw, x_active_mask=t["mask"],
            shared_expert_x=t["shared_x"], ori_x=t["ori_x"], const_expert_alpha_1=t["a1"],
            const_expert_alpha_2=t["a2"], const_expert_v=t["v"], performance_info=perf,
            comm_quant_mode=case["comm_quant_mode"])
        return out[:5] + (y,)

    return layer


def compiled_v2_matches_eager(g, n, seeds, job):
    for seed in seeds:
        case = random_v2_case(seed)
        ep, _ = moedist.new_group(f"{job}-{seed}", g, n)
        layer = v2_layer(case, g, ep.get_hccl_comm_name(g))
        t = layer_inputs(case, g)
        perf_eager = torch.zeros(case["ep_world_size"], dtype=torch.int64)
        want = layer(t, perf_eager)
        for backend in ("aot_eager", "inductor") if n == 1 else ("aot_eager",):
            torch._dynamo.reset()
            perf = torch.full((case["ep_world_size"],), -1, dtype=torch.int64)
            got = torch.compile(layer, backend=backend, dynamic=False, fullgraph=True)(t, perf)
            for i, (a, b) in enumerate(zip(got, want)):
                assert a.shape == b.shape and a.dtype == b.dtype, (seed, backend, i)
                np.testing.assert_array_equal(bits_of(a), bits_of(b), err_msg=f"seed {seed} {backend} output {i}")
            assert (perf.numpy() >= 0).all(), (backend, perf)  # raised from -1 through the graph
    return True


def test_v2_compiled_matches_eager_in_one_process(job):
    seeds = [s for s in range(40) if random_v2_case(s)["ep_world_size"] == 1][:2]
    compiled_v2_matches_eager(0, 1, seeds, job)


def test_v2_compiled_matches_eager_over_ranks(job):
    seeds = [s for s in range(60) if random_v2_case(s)["ep_world_size"] == 2][:2]
    run_ranks(2, compiled_v2_matches_eager, seeds, job, timeout=600)


def test_v2_fake_shapes_are_the_kernels_shapes(job):
    case = next(random_v2_case(s) for s in range(50) if random_v2_case(s)["ep_world_size"] == 1)
    ep, _ = moedist.new_group(job, 0, 1)
    t = layer_inputs(case, 0)
    kw = {name: case[name] for name in CONFIG}
    kw.update(ep_rank_id=0, group_ep=ep.get_hccl_comm_name(0))
    real = moedist.npu_moe_distribute_dispatch_v2(t["x"], t["ids"], **kw, scales=t["scales"], x_active_mask=t["mask"],
                                                  quant_mode=case["quant_mode"])
    meta = lambda v: None if v is None else v.to("meta")
    fake = torch.ops.moedist.npu_moe_distribute_dispatch_v2(
        meta(t["x"]), meta(t["ids"]), kw.pop("group_ep"), kw.pop("ep_world_size"), kw.pop("ep_rank_id"),
        kw.pop("moe_expert_num"), **kw, scales=meta(t["scales"]), x_active_mask=meta(t["mask"]),
        quant_mode=case["quant_mode"])
    assert [(tuple(a.shape), a.dtype) for a in fake] == [(tuple(a.shape), a.dtype) for a in real]
    assert _custom_ops.DISPATCH_V2_SCHEMA.startswith("npu_moe_distribute_dispatch_v2(")
