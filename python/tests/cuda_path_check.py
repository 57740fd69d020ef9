"""The package's CUDA path, bit for bit against the oracle: moedist.npu_moe_distribute_dispatch / _combine
on CUDA tensors (_cuda.py) down to the kernels, random cases of 1 to 4 ranks (forked processes), two
calls per group, and the typed errors (host-visible ones, and a bad id that only the kernels see,
raised by synchronize). Prints "cuda_path_check: N cases, 0 failures: PASS" when everything held.

  python3 cuda_path_check.py emulated   (ctest python.cuda_emulated) with PYTHONPATH at the emulated twin
      of the package, <build>/python-cuda-emulated: the extension with the CUDA group's kernels compiled
      for the CPU and a fake CUDA runtime (tests/cuda_emulation). Its "device" arrays are the fake
      runtime's memory, exported through DLPack as CUDA tensors of device 0 (EmulatedDeviceArray, with a
      Backend of their own), so that the calls take the path torch CUDA tensors take.
  python3 cuda_path_check.py torch      on a GPU (scripts/gpu_session.sh --python), torch CUDA tensors on
      the current device, on torch's current stream."""
import contextlib
import multiprocessing
import os
import sys
import traceback
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moedist  # noqa: E402
from moedist import _cuda, _moedist  # noqa: E402
from cases import rank_kwargs, random_case  # noqa: E402
from test_v2 import CONFIG as V2_CONFIG, random_v2_case  # noqa: E402

MODE = sys.argv[1] if len(sys.argv) > 1 else "emulated"

if MODE == "emulated":
    Device = _moedist.EmulatedDeviceArray

    class EmulatedBackend(_cuda.Backend):
        """The fake runtime's arrays: device 0, the legacy default stream (the fake runs work when enqueued)."""

        def stream(self, device):
            return 0

        def empty(self, shape, dtype, like):
            return Device.empty(tuple(shape), dtype)

        def dtype(self, t):
            return t.dtype

    _cuda.register_backend(Device, EmulatedBackend())

    def on_device(array, dtype):
        return None if array is None else Device.from_numpy(np.ascontiguousarray(array), dtype)

    def bits(t):
        return t.numpy()

    def dtype_of(t):
        return t.dtype

    def on_stream(call):
        return contextlib.nullcontext()
else:
    import torch

    Device = torch.Tensor

    def on_device(array, dtype):
        if array is None:
            return None
        a = np.ascontiguousarray(array)
        t = torch.from_numpy(a.view(np.int16)).view(getattr(torch, dtype)) if dtype in ("bfloat16", "float16") \
            else torch.from_numpy(a.copy())
        return t.cuda()

    def bits(t):
        t = t.cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()

    def dtype_of(t):
        return str(t.dtype).rsplit(".", 1)[-1]

    def on_stream(call):
        """Odd calls on a stream of their own: the group orders them after the previous call's stream."""
        return torch.cuda.stream(torch.cuda.Stream()) if call % 2 else contextlib.nullcontext()


def _rank_main(rank, n, queue, target, args):
    try:
        queue.put((rank, target(rank, n, *args)))
    except BaseException:  # noqa: B036 - reported by the parent
        queue.put((rank, "FAILED\n" + traceback.format_exc()))


def run_ranks(n, target, *args, timeout=300):
    """target(rank, n, *args) in n processes (forked; spawned with torch CUDA, which a fork cannot
    inherit); each rank's "ok" or its traceback."""
    ctx = multiprocessing.get_context("fork" if MODE == "emulated" else "spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, n, queue, target, args)) for r in range(n)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(n):
            rank, value = queue.get(timeout=timeout)
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results.get(r, "FAILED: no answer") for r in range(n)]


V1_DTYPES = lambda quant_mode, half: (  # noqa: E731 - dispatch's seven outputs, by the names of Backend.empty
    "int8" if quant_mode == 2 else half, "float32", "int32", "int64", "int32", "int32", "float32")


def check_dispatch_outputs(g, call, case, r, out, want, kw):
    """Every output of one V1 dispatch against the oracle: shapes and dtypes (torch_npu's), valid rows."""
    t = case["tp_world_size"]
    bs, k = r["expert_ids"].shape
    cap = _moedist.capacity(kw, bs, k, case["h"], case["quant_mode"])
    rows = cap["max_receive_rows"]
    shapes = [(rows, case["h"]), (rows,), (bs * k,), (cap["local_expert_num"],), (cap["ep_recv_counts_len"],), (t,),
              (rows,)]
    assert [tuple(o.shape) for o in out] == shapes, ([tuple(o.shape) for o in out], shapes)
    assert [dtype_of(o) for o in out] == list(V1_DTYPES(case["quant_mode"], case["dtype"])), [dtype_of(o) for o in out]
    expand_x, dynamic_scales, expand_idx, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales = out
    valid = want["valid_rows"]
    np.testing.assert_array_equal(bits(expand_x)[:valid], want["expand_x"], err_msg=f"rank {g} call {call} expand_x")
    if case["quant_mode"] == 2:
        np.testing.assert_array_equal(bits(dynamic_scales)[:valid], want["dynamic_scales"],
                                      err_msg=f"rank {g} call {call} dynamic_scales")
    if "expert_scales" in r:
        np.testing.assert_array_equal(bits(expand_scales)[:valid], want["expand_scales"],
                                      err_msg=f"rank {g} call {call} expand_scales")
    else:
        assert not bits(expand_scales).any(), "expand_scales without expert_scales must be zero"
    for name, got in (("expand_idx", expand_idx), ("expert_token_nums", expert_token_nums),
                      ("ep_recv_counts", ep_recv_counts)):
        np.testing.assert_array_equal(bits(got), want[name], err_msg=f"rank {g} call {call} {name}")
    if t == 2:
        np.testing.assert_array_equal(bits(tp_recv_counts), want["tp_recv_counts"],
                                      err_msg=f"rank {g} call {call} tp_recv_counts")


def check_case(g, n, seed, shape, job, calls):
    """Rank g: `calls` dispatch + combine pairs of random_case(seed) on CUDA tensors, one group, other
    data in every call (the same configuration); each output against the oracle, and the first call's
    outputs again after the last call (results outlive the next call)."""
    cases = [random_case(seed, data_seed=call, **shape) for call in range(calls)]
    t = cases[0]["tp_world_size"]
    ep, tp = moedist.new_group(job, g, n, tp_world_size=t)
    names = dict(group_ep=ep.name, group_tp=tp.name if t == 2 else "")
    kw = rank_kwargs(cases[0], g)
    kept = []
    for call, case in enumerate(cases):
        want = _moedist.oracle_run(case)[g]
        r = case["ranks"][g]
        dtype = case["dtype"]
        with on_stream(call):
            out = moedist.npu_moe_distribute_dispatch(
                on_device(r["x"], dtype), on_device(r["expert_ids"], "int32"), **names, **kw,
                scales=on_device(r.get("scales"), "float32"),
                expert_scales=on_device(r.get("expert_scales"), "float32"), quant_mode=case["quant_mode"],
                expert_token_nums_type=case["expert_token_nums_type"])
            weights = r.get("expert_scales")
            if weights is None:
                weights = np.ones(r["expert_ids"].shape, np.float32)
            y = moedist.npu_moe_distribute_combine(
                on_device(r["combine_x"], dtype), on_device(r["expert_ids"], "int32"), out[2], out[4],
                on_device(weights, "float32"), **names, **kw, tp_send_counts=out[5],
                comm_quant_mode=case["comm_quant_mode"])
        moedist.synchronize(ep)  # waits for the stream of the latest call, whichever it was
        assert all(isinstance(o, Device) and _cuda.on_cuda(o) for o in out), [type(o) for o in out]
        check_dispatch_outputs(g, call, case, r, out, want, kw)
        if MODE == "torch" and call == 0:  # the registered op's CUDA kernel, called as a compiled graph calls it
            op_out = torch.ops.moedist.npu_moe_distribute_dispatch(  # noqa: F821 - imported in torch mode
                on_device(r["x"], dtype), on_device(r["expert_ids"], "int32"), names["group_ep"], kw["ep_world_size"],
                kw["ep_rank_id"], kw["moe_expert_num"], scales=on_device(r.get("scales"), "float32"),
                expert_scales=on_device(r.get("expert_scales"), "float32"), group_tp=names["group_tp"],
                tp_world_size=kw["tp_world_size"], tp_rank_id=kw["tp_rank_id"],
                shared_expert_rank_num=kw["shared_expert_rank_num"], quant_mode=case["quant_mode"],
                global_bs=kw["global_bs"], expert_token_nums_type=case["expert_token_nums_type"])
            op_y = torch.ops.moedist.npu_moe_distribute_combine(  # noqa: F821
                on_device(r["combine_x"], dtype), on_device(r["expert_ids"], "int32"), op_out[2], op_out[4],
                on_device(r.get("expert_scales", np.ones(r["expert_ids"].shape, np.float32)), "float32"),
                names["group_ep"], kw["ep_world_size"], kw["ep_rank_id"], kw["moe_expert_num"],
                tp_send_counts=op_out[5], group_tp=names["group_tp"], tp_world_size=kw["tp_world_size"],
                tp_rank_id=kw["tp_rank_id"], shared_expert_rank_num=kw["shared_expert_rank_num"],
                global_bs=kw["global_bs"], comm_quant_mode=case["comm_quant_mode"])
            moedist.synchronize(ep)
            check_dispatch_outputs(g, "0 (the op)", case, r, op_out, want, kw)
            np.testing.assert_array_equal(bits(op_y), want["combine_out"], err_msg=f"rank {g}: the op's combine output")
        assert isinstance(y, Device) and tuple(y.shape) == r["x"].shape and dtype_of(y) == dtype, (type(y), y.shape)
        np.testing.assert_array_equal(bits(y), want["combine_out"], err_msg=f"rank {g} call {call} combine output")
        kept.append((case, r, out, want, y))
    case, r, out, want, y = kept[0]
    check_dispatch_outputs(g, "0 (after the last)", case, r, out, want, kw)
    np.testing.assert_array_equal(bits(y), want["combine_out"], err_msg=f"rank {g} call 0's combine output, later")
    moedist.synchronize(ep)  # nothing failed on the "GPU"
    ep.close()
    tp.close()
    return "ok"


def check_v2_case(g, n, case, job, calls):
    """Rank g: `calls` dispatch_v2 + combine_v2 pairs of a V2 case (masks, special experts, Sn shared
    experts, ori_x, shared_expert_x, performance_info) on CUDA tensors, each output against the V2 oracle."""
    want = _moedist.oracle_v2_run(case)[g]
    ep, _ = moedist.new_group(job, g, n)
    r = case["ranks"][g]
    dtype = case["dtype"]
    kw = {name: case[name] for name in V2_CONFIG}
    kw.update(ep_rank_id=g, group_ep=ep.name)
    half = lambda name: on_device(r.get(name), dtype)  # noqa: E731
    other = lambda name, kind: on_device(r.get(name), kind)  # noqa: E731
    mask = r.get("x_active_mask")
    for call in range(calls):
        dev_mask = on_device(mask, "bool") if mask is not None else None
        perf = on_device(np.zeros(case["ep_world_size"], np.int64), "int64")
        out = moedist.npu_moe_distribute_dispatch_v2(
            half("x"), other("expert_ids", "int32"), **kw, scales=other("scales", "float32"), x_active_mask=dev_mask,
            expert_scales=other("expert_scales", "float32"), performance_info=perf, quant_mode=case["quant_mode"],
            expert_token_nums_type=case["expert_token_nums_type"], comm_alg="fullmesh_v1")
        assert all(isinstance(o, Device) and _cuda.on_cuda(o) for o in out), [type(o) for o in out]
        expand_x, dynamic_scales, assist, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales = out
        valid, own = want["valid_rows"], want["own_rows"]
        np.testing.assert_array_equal(bits(expand_x)[:valid], want["expand_x"], err_msg=f"rank {g} call {call} expand_x")
        if case["quant_mode"] == 2:
            np.testing.assert_array_equal(bits(dynamic_scales)[:valid], want["dynamic_scales"],
                                          err_msg=f"rank {g} dynamic_scales")
        n_scales = min(valid, expand_scales.shape[0])
        np.testing.assert_array_equal(bits(expand_scales)[:n_scales], want["expand_scales"][:n_scales],
                                      err_msg=f"rank {g} expand_scales")
        np.testing.assert_array_equal(bits(assist)[:3 * own], want["assist_info_for_combine"], err_msg=f"rank {g} assist")
        for name, got in (("expert_token_nums", expert_token_nums), ("ep_recv_counts", ep_recv_counts)):
            np.testing.assert_array_equal(bits(got), want[name], err_msg=f"rank {g} call {call} {name}")
        bs, k = r["expert_ids"].shape
        cap = _moedist.capacity({**{name: case[name] for name in V2_CONFIG}, "ep_rank_id": g, "tp_world_size": 0,
                                 "tp_rank_id": 0, "expert_shard_type": 0}, bs, k, case["h"], case["quant_mode"], 2)
        assert tuple(assist.shape) == (max(bs * k, 128 * cap["A"]),) and tuple(tp_recv_counts.shape) == (0,)
        assert tuple(expand_scales.shape) == (cap["A"],)
        y = moedist.npu_moe_distribute_combine_v2(
            half("combine_x"), other("expert_ids", "int32"), assist, ep_recv_counts, other("expert_scales", "float32"),
            **kw, x_active_mask=dev_mask, shared_expert_x=half("shared_expert_x"), ori_x=half("ori_x"),
            const_expert_alpha_1=half("const_expert_alpha_1"), const_expert_alpha_2=half("const_expert_alpha_2"),
            const_expert_v=half("const_expert_v"), performance_info=perf, comm_quant_mode=case["comm_quant_mode"])
        if MODE == "torch" and case["const_expert_num"] > 0:  # exp on a GPU: within 2 ulps (docs/cuda.md)
            diff = np.abs(bits(y).astype(np.int32) - want["combine_out"].astype(np.int32))
            assert diff.max(initial=0) <= 2, f"rank {g} combine output: {diff.max()} ulps"
        else:
            np.testing.assert_array_equal(bits(y), want["combine_out"], err_msg=f"rank {g} call {call} combine output")
        moedist.synchronize(ep)
        assert (bits(perf) >= 0).all()
    ep.close()
    return "ok"


def seeds_of(world, want, **shape):
    """Seeds of random cases (cases.py, without token masks) of `world` ranks; `shape`: h / max_bs to fix."""
    found, seed = [], 0
    while len(found) < want:
        case = random_case(seed, **shape)
        if case["ep_world_size"] * max(case["tp_world_size"], 1) == world:
            found.append(seed)
        seed += 1
    return found


def expect(error, parameter, fn):
    try:
        fn()
    except error as e:
        assert parameter is None or e.parameter == parameter, (parameter, str(e))
        return str(e)
    raise AssertionError(f"no {error.__name__} naming {parameter}")


def check_errors(g, n, job):
    """Typed errors of the CUDA path, on 2 ranks: host-visible ones, raised before anything is enqueued
    (the first call still joins the CUDA group), and an error only the kernels see, raised by
    synchronize (on the rank that made it: its own; on its peer: peer_failed); then the group is made
    anew under the same name and works. Emulated only: a build without the CUDA backend, the group's
    calls from a second device, and a result copy that fails after the kernels were enqueued."""
    ep, tp = moedist.new_group(job, g, n, max_bs=4)
    kw = dict(ep_world_size=2, ep_rank_id=g, moe_expert_num=4)
    rng = np.random.default_rng(g)
    x = rng.integers(0, 2**15, (4, 16)).astype(np.uint16)
    ids = np.stack([rng.permutation(4)[:2] for _ in range(4)]).astype(np.int32)
    call = lambda x_, ids_: moedist.npu_moe_distribute_dispatch(x_, ids_, ep.name, **kw)  # noqa: E731
    if MODE == "emulated":
        # A build without the CUDA backend refuses CUDA tensors by name. The check is the package's; this
        # extension has the backend, so the package is shown one that has not.
        _moedist.has_cuda = False
        try:
            message = expect(moedist.ValidationError, "x.device",
                             lambda: call(on_device(x, "bfloat16"), on_device(ids, "int32")))
        finally:
            _moedist.has_cuda = True
        assert "CUDA backend" in message and "cuda:0" in message, message
    # A tensor of the call in host memory (a numpy array; a torch CPU tensor through DLPack), or on
    # another device than x's: named.
    import torch
    for host_ids in (ids, torch.from_numpy(ids)):
        message = expect(moedist.ValidationError, "expert_ids.device",
                         lambda: moedist.npu_moe_distribute_dispatch(on_device(x, "bfloat16"), host_ids, ep.name, **kw))
        assert "cpu" in message and "CUDA" in message, message
    if MODE == "emulated":  # an array claiming device 1, beside x on device 0
        message = expect(moedist.ValidationError, "expert_ids.device",
                         lambda: moedist.npu_moe_distribute_dispatch(on_device(x, "bfloat16"),
                                                                     Device.from_numpy(ids, "int32", 1), ep.name, **kw))
        assert "cuda:1" in message and "cuda:0" in message, message
    # More tokens than the group's max_bs.
    wide = rng.integers(0, 2**15, (5, 16)).astype(np.uint16)
    wide_ids = np.stack([rng.permutation(4)[:2] for _ in range(5)]).astype(np.int32)
    expect(moedist.ValidationError, "x.shape[0]",
           lambda: moedist.npu_moe_distribute_dispatch(on_device(wide, "bfloat16"), on_device(wide_ids, "int32"),
                                                       ep.name, **kw))
    # A good call, then one with an expert id out of range on rank 1: the kernels record it; synchronize
    # raises it, typed, on both ranks; the group stays failed.
    out = moedist.npu_moe_distribute_dispatch(on_device(x, "bfloat16"), on_device(ids, "int32"), ep.name, **kw)
    moedist.synchronize(ep.name, stream=0 if MODE == "emulated" else None)
    good_counts = bits(out[4])
    assert good_counts.sum() > 0
    if MODE == "emulated":  # the group's calls from another device of this rank: named, nothing enqueued
        message = expect(moedist.ValidationError, "x.device",
                         lambda: call(Device.from_numpy(x, "bfloat16", 1), Device.from_numpy(ids, "int32", 1)))
        assert "cuda:1" in message and "must be cuda:0" in message, message
    bad = ids.copy()
    if g == 1:
        bad[2, 1] = 7
    moedist.npu_moe_distribute_dispatch(on_device(x, "bfloat16"), on_device(bad, "int32"), ep.name, **kw)
    if g == 1:
        message = expect(moedist.ValidationError, "expert_ids[2, 1]", lambda: moedist.synchronize(ep))
    else:
        message = expect(moedist.PeerError, None, lambda: moedist.synchronize(ep))
        assert "peer_failed" in message or "rank 1" in message, message
    expect(moedist.Error, None,  # the group stays failed
           lambda: moedist.npu_moe_distribute_dispatch(on_device(x, "bfloat16"), on_device(ids, "int32"), ep.name, **kw))
    ep.close()
    # A closed group's name is refused; made anew, it joins a new CUDA group that works.
    expect(moedist.ValidationError, "group_ep",
           lambda: moedist.npu_moe_distribute_dispatch(on_device(x, "bfloat16"), on_device(ids, "int32"), ep.name, **kw))
    ep, tp = moedist.new_group(job, g, n, max_bs=4)
    out = moedist.npu_moe_distribute_dispatch(on_device(x, "bfloat16"), on_device(ids, "int32"), ep.name, **kw)
    moedist.synchronize(ep)
    np.testing.assert_array_equal(bits(out[4]), good_counts, err_msg=f"rank {g}: the new group's ep_recv_counts")
    if MODE == "emulated":
        # A result copy that fails once the kernels are enqueued (the fake runtime refuses device-to-device
        # copies) raises, and the group then refuses every call, saying why, on every rank.
        os.environ["MOEDIST_FAKE_CUDA_REFUSE_DEVICE_COPIES"] = "1"
        try:
            message = expect(moedist.Error, None, lambda: call(on_device(x, "bfloat16"), on_device(ids, "int32")))
        finally:
            del os.environ["MOEDIST_FAKE_CUDA_REFUSE_DEVICE_COPIES"]
        assert "copying a dispatch's results failed" in message and "expand_x" in message, message
        message = expect(moedist.Error, None, lambda: call(on_device(x, "bfloat16"), on_device(ids, "int32")))
        assert "unusable" in message, message
    ep.close()
    return "ok"


def main():
    if MODE == "emulated":
        assert _moedist.cuda_emulated, "run with PYTHONPATH at <build>/python-cuda-emulated"
    else:
        assert MODE == "torch" and moedist.has_cuda and torch.cuda.is_available(), "torch mode needs a GPU"  # noqa: F821
    failures, runs = [], 0
    wide = dict(h=2048, max_bs=8)  # rows of several vector steps, more tokens
    for world, count, shape in ((1, 2, {}), (2, 6, {}), (3, 3, {}), (4, 3, {}), (2, 2, wide), (4, 1, wide)):
        for seed in seeds_of(world, count, **shape):
            job = f"cuda-path-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            results = run_ranks(world, check_case, seed, shape, job, 2)
            runs += 1
            failures += [f"W{world} case {runs}: rank {g}: {r}" for g, r in enumerate(results) if r != "ok"]
    v2_seed, v2_runs = 0, 0
    while v2_runs < 12:
        case = random_v2_case(v2_seed)
        v2_seed += 1
        job = f"cuda-path-v2-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        results = run_ranks(case["ep_world_size"], check_v2_case, case, job, 2)
        v2_runs += 1
        runs += 1
        failures += [f"V2 seed {v2_seed - 1}: rank {g}: {r}" for g, r in enumerate(results) if r != "ok"]
    results = run_ranks(2, check_errors, f"cuda-path-errors-{uuid.uuid4().hex[:8]}")
    failures += [f"errors: rank {g}: {r}" for g, r in enumerate(results) if r != "ok"]
    for f in failures:
        print(f)
    print(f"cuda_path_check ({MODE}): {runs} cases, {len(failures)} failures: {'PASS' if not failures else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
