"""The registered operators (torch >= 2.1): torch.ops.moedist.* with torch_npu's schemas, fake kernels
whose static shapes are the real kernels' shapes, torch.compile(dynamic=False, fullgraph=True) with
the inductor and aot_eager backends giving the eager results bit for bit, calls whose results are unused
kept in the graph, and the operator page's graph-mode example (16 processes). Skipped, with the reason,
on torch 1.13, where the public functions run eagerly (the rest of the suite covers them there)."""
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import moedist
from cases import bits_of, random_case, rank_kwargs, to_mask, to_other, to_tensor
from conftest import SOURCE_DIR, run_ranks
from moedist import _custom_ops, _ops

pytestmark = pytest.mark.skipif(_ops._registered_ops is None,  # not collected there (conftest.py)
                                reason=f"torch {torch.__version__} cannot register custom ops (needs torch >= 2.1)")

# torch_npu's parameter lists ([OP-YAML]; contract §1.1, §1.3), in order, with their defaults.
DISPATCH_PARAMETERS = ["x", "expert_ids", "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num", "scales",
                       "x_active_mask", "expert_scales", "group_tp", "tp_world_size", "tp_rank_id", "expert_shard_type",
                       "shared_expert_num", "shared_expert_rank_num", "quant_mode", "global_bs", "expert_token_nums_type"]
COMBINE_PARAMETERS = ["expand_x", "expert_ids", "expand_idx", "ep_send_counts", "expert_scales", "group_ep",
                      "ep_world_size", "ep_rank_id", "moe_expert_num", "tp_send_counts", "x_active_mask",
                      "activation_scale", "weight_scale", "group_list", "expand_scales", "shared_expert_x", "group_tp",
                      "tp_world_size", "tp_rank_id", "expert_shard_type", "shared_expert_num", "shared_expert_rank_num",
                      "global_bs", "out_dtype", "comm_quant_mode", "group_list_type"]


def test_schemas_are_torch_npus_and_match_the_public_functions():
    for op, public, names in ((torch.ops.moedist.npu_moe_distribute_dispatch, moedist.npu_moe_distribute_dispatch,
                               DISPATCH_PARAMETERS),
                              (torch.ops.moedist.npu_moe_distribute_combine, moedist.npu_moe_distribute_combine,
                               COMBINE_PARAMETERS)):
        schema = op.default._schema
        assert [a.name for a in schema.arguments] == names
        signature = inspect.signature(public).parameters
        assert list(signature) == names
        for argument in schema.arguments:
            default = signature[argument.name].default
            if default is inspect.Parameter.empty:
                assert not argument.has_default_value(), argument.name
            else:
                assert argument.default_value == default, argument.name
            assert argument.kwarg_only == (signature[argument.name].kind == inspect.Parameter.KEYWORD_ONLY), argument.name
    assert len(torch.ops.moedist.npu_moe_distribute_dispatch.default._schema.returns) == 7


class Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops a call runs, as torch's dispatcher sees them."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_ops_have_cpu_and_cuda_kernels():
    # CUDA tensors reach the ops' CUDA kernels, the same eager functions, which send them to _cuda.py.
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name in ("npu_moe_distribute_dispatch", "npu_moe_distribute_combine", "npu_moe_distribute_dispatch_v2",
                 "npu_moe_distribute_combine_v2"):
        assert has(f"moedist::{name}", "CUDA") and has(f"moedist::{name}", "CPU"), name


def test_public_functions_go_through_the_registered_ops(job):
    ep, _ = moedist.new_group(job, 0, 1)
    x = torch.randn(3, 16).to(torch.bfloat16)
    ids = torch.tensor([[0], [1], [0]], dtype=torch.int32)
    with Recorder() as seen:
        d = moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 2)
        moedist.npu_moe_distribute_combine(d[0], ids, d[2], d[4], torch.ones(3, 1), ep.name, 1, 0, 2)
    assert "moedist.npu_moe_distribute_dispatch.default" in seen.ops
    assert "moedist.npu_moe_distribute_combine.default" in seen.ops


def call_ops(case, g, group_name, tensors=None):
    """Rank g's dispatch then combine of `case` through the public functions; returns both results."""
    r = case["ranks"][g]
    dtype, kw = case["dtype"], rank_kwargs(case, g)
    x = to_tensor(r["x"], dtype, "torch")
    ids = to_other(r["expert_ids"], "torch")
    mask = to_mask(r.get("x_active_mask"), "torch")
    out = moedist.npu_moe_distribute_dispatch(x, ids, group_name, **kw, scales=to_other(r.get("scales"), "torch"),
                                              x_active_mask=mask, quant_mode=case["quant_mode"],
                                              expert_token_nums_type=case["expert_token_nums_type"])
    weights = to_other(r.get("expert_scales", np.ones(r["expert_ids"].shape, np.float32)), "torch")
    expert_out = out[0].to(x.dtype) if case["quant_mode"] == 2 else out[0]
    y = moedist.npu_moe_distribute_combine(expert_out, ids, out[2], out[4], weights, group_name, **kw,
                                           x_active_mask=mask, comm_quant_mode=case["comm_quant_mode"])
    return out, y


def fake_shapes(case, g, group_name):
    """Shapes and dtypes the fake kernels give rank g's dispatch and combine (nothing runs)."""
    r = case["ranks"][g]
    real_x, real_ids = to_tensor(r["x"], case["dtype"], "torch"), torch.from_numpy(r["expert_ids"])
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        x, ids = mode.from_tensor(real_x), mode.from_tensor(real_ids)
        out = torch.ops.moedist.npu_moe_distribute_dispatch(x, ids, group_name, **rank_kwargs(case, g),
                                                            quant_mode=case["quant_mode"])
        y = torch.ops.moedist.npu_moe_distribute_combine(out[0].to(x.dtype), ids, out[2], out[4], ids.float(), group_name,
                                                         **rank_kwargs(case, g))
        return [(tuple(t.shape), t.dtype) for t in out], (tuple(y.shape), y.dtype)


def shapes_agree(g, n, seeds, job):
    for seed in seeds:
        case = random_case(seed, masks=True)
        ep, tp = moedist.new_group(f"{job}-{seed}", g, n, tp_world_size=case["tp_world_size"])
        fake_dispatch, fake_combine = fake_shapes(case, g, ep.name)
        out, y = call_ops(case, g, ep.name)
        assert [(tuple(t.shape), t.dtype) for t in out] == fake_dispatch, (seed, g)
        assert (tuple(y.shape), y.dtype) == fake_combine, (seed, g)
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fake_shapes_are_the_kernels_shapes(world, job):
    # Random cases with TP off (a TP case needs group_tp, which these plain calls leave out); shared
    # experts, uneven BS with global_bs (where a shared rank may exceed A) and masks among them.
    seeds, seed = [], 0
    while len(seeds) < 6:
        case = random_case(seed, masks=True)
        if case["tp_world_size"] != 2 and case["ep_world_size"] * max(case["tp_world_size"], 1) == world:
            seeds.append(seed)
        seed += 1
    run_ranks(world, shapes_agree, seeds, job)


class MoeLayer(torch.nn.Module):
    """Dispatch, an 'expert' that doubles its rows, combine: the shape of an MoE layer's communication."""

    def __init__(self, group_name, kw, quant_mode):
        super().__init__()
        self.group_name, self.kw, self.quant_mode = group_name, kw, quant_mode

    def forward(self, x, ids, weights, scales, mask):
        d = moedist.npu_moe_distribute_dispatch(x, ids, self.group_name, **self.kw, scales=scales, x_active_mask=mask,
                                                quant_mode=self.quant_mode)
        rows = d[0].to(x.dtype) * 2
        return moedist.npu_moe_distribute_combine(rows, ids, d[2].reshape(ids.shape), d[4], weights, self.group_name,
                                                  **self.kw, x_active_mask=mask)


def compiled_matches_eager(g, n, seed, job, backends):
    case = random_case(seed, masks=True)
    ep, _ = moedist.new_group(job, g, n)
    r = case["ranks"][g]
    x = to_tensor(r["x"], case["dtype"], "torch")
    ids = to_other(r["expert_ids"], "torch")
    weights = to_other(r.get("expert_scales", np.ones(r["expert_ids"].shape, np.float32)), "torch")
    args = (x, ids, weights, to_other(r.get("scales"), "torch"), to_mask(r.get("x_active_mask"), "torch"))
    layer = MoeLayer(ep.name, rank_kwargs(case, g), case["quant_mode"])
    eager = bits_of(layer(*args))
    for backend in backends:
        compiled = torch.compile(layer, backend=backend, dynamic=False, fullgraph=True)
        np.testing.assert_array_equal(bits_of(compiled(*args)), eager, err_msg=f"rank {g} {backend}")
    return True


def test_fullgraph_compile_matches_eager_in_one_process(job):
    seed = next(s for s in range(100) if random_case(s)["ep_world_size"] == 1 and random_case(s)["tp_world_size"] != 2)
    compiled_matches_eager(0, 1, seed, job, ("aot_eager", "inductor"))


def test_fullgraph_compile_matches_eager_over_ranks(job):
    seed = next(s for s in range(200) if random_case(s)["ep_world_size"] == 2 and random_case(s)["tp_world_size"] == 0
                and random_case(s)["shared_expert_rank_num"] == 1)
    run_ranks(2, compiled_matches_eager, seed, job, ("aot_eager",))


def unused_results(g, n, job):
    # Rank 0's compiled function drops dispatch's results; rank 1 calls eagerly and waits for it. Were the
    # call dropped from rank 0's graph, rank 1 would time out.
    ep, _ = moedist.new_group(job, g, n, timeout_ms=20000)
    x = torch.ones(2, 8, dtype=torch.bfloat16)
    ids = torch.tensor([[g], [1 - g]], dtype=torch.int32)

    def step(x, ids):
        moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 2, g, 2)
        return x + 1

    fn = torch.compile(step, backend="aot_eager", dynamic=False, fullgraph=True) if g == 0 else step
    fn(x, ids)
    return True


def test_a_call_whose_results_are_unused_stays_in_the_graph(job):
    run_ranks(2, unused_results, job, timeout=120)


def test_the_ops_refuse_bad_arguments_by_name(job):
    ep, _ = moedist.new_group(job, 0, 1)
    x = torch.zeros(2, 8, dtype=torch.float16)
    ids = torch.tensor([[0], [1]], dtype=torch.int32)
    with pytest.raises(moedist.ValidationError) as info:
        moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 2, quant_mode=True)
    assert info.value.parameter == "quant_mode"
    with pytest.raises(moedist.ValidationError) as info:
        moedist.npu_moe_distribute_dispatch(x, ids, 7, 1, 0, 2)
    assert info.value.parameter == "group_ep"
    with pytest.raises(moedist.ValidationError) as info:  # the fake refuses what it cannot shape, by name
        with torch._subclasses.fake_tensor.FakeTensorMode():
            torch.ops.moedist.npu_moe_distribute_dispatch(torch.empty(2, 8, 1), torch.empty(2, 1, dtype=torch.int32),
                                                          ep.name, 1, 0, 2)
    assert info.value.parameter == "x.dim()"
    with pytest.raises(moedist.ValidationError) as info:
        with torch._subclasses.fake_tensor.FakeTensorMode():
            torch.ops.moedist.npu_moe_distribute_dispatch(torch.empty(2, 8), torch.empty(3, 1, dtype=torch.int32), ep.name,
                                                          1, 0, 2)
    assert (info.value.parameter, info.value.rule) == ("expert_ids.shape", "must have BS = x.shape[0] = 2 rows")


def test_meta_tensors_give_the_static_shapes_without_running(job):
    # As torch ops do on the meta device: shapes only, no group joined, nothing sent.
    ep, _ = moedist.new_group(job, 0, 1)
    x = torch.empty(3, 16, dtype=torch.bfloat16, device="meta")
    ids = torch.empty(3, 2, dtype=torch.int32, device="meta")
    out = moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 4, quant_mode=2)
    assert all(t.device.type == "meta" for t in out)
    assert [tuple(t.shape) for t in out] == [(6, 16), (6,), (6,), (4,), (4,), (0,), (6,)]
    assert out[0].dtype == torch.int8
    y = moedist.npu_moe_distribute_combine(out[0].to(torch.bfloat16), ids, out[2], out[4], ids.float(), ep.name, 1, 0, 4)
    assert y.device.type == "meta" and tuple(y.shape) == (3, 16) and y.dtype == torch.bfloat16
    assert not any(key[0] == ep._domain.world for key in moedist._groups._groups)  # nothing joined


def test_torchair_backends():
    import moedist.torchair as torchair
    assert torchair.get_npu_backend() in torchair.BACKENDS
    config = torchair.CompilerConfig()
    config.backend = "aot_eager"
    assert torchair.get_npu_backend(compiler_config=config) == "aot_eager"
    config.backend = "npu"
    with pytest.raises(moedist.ValidationError) as info:
        torchair.get_npu_backend(compiler_config=config)
    assert info.value.parameter == "compiler_config.backend"
    assert "must be one of inductor, aot_eager, eager" in info.value.rule
    with pytest.raises(moedist.ValidationError) as info:
        torchair.get_npu_backend(custom_decompositions={"op": "decomposition"})
    assert (info.value.parameter, info.value.code) == ("custom_decompositions", "unsupported")
    assert "must be empty" in info.value.rule


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_the_operator_pages_graph_example(backend):
    env = dict(os.environ, MOEDIST_TORCHAIR_BACKEND=backend, TORCHINDUCTOR_COMPILE_THREADS="1",
               MOEDIST_EXAMPLE_PORT=str(50011 if backend == "inductor" else 50012))
    out = subprocess.run([sys.executable, os.path.join(SOURCE_DIR, "examples", "torch_npu_graph_example.py")],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in range(16):
        assert f"rank {rank} epid {rank} tpid 0: compiled combine output matches the reference bit for bit" in out.stdout
    assert out.stdout.rstrip().endswith("run npu success.")
