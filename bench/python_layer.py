"""What the Python layer adds to each operator call: the time of a call of the public functions (and, on
torch >= 2.1, of the registered op as a compiled graph calls it, and of a whole module compiled with
torch.compile) less the time the C++ group spent in the call, which the extension measures around
Group::dispatch / Group::combine (Group.call_ns; it includes waiting for the peer, and writing the results
into the call's fresh output tensors). Two ranks over shared memory, one process each; the modes run in
alternating rounds, so that load drifts on a shared machine touch every mode alike.

  PYTHONPATH=build/release/python /usr/bin/python3 bench/python_layer.py            # torch 1.13 (Debian)
  PYTHONPATH=build/release/python build/venv-torch2/bin/python bench/python_layer.py  # torch 2.13

Prints one JSON object: the configuration, torch's version, and for rank 0 per mode and operator the
p50, mean and p99 of the call in µs, the p50 of the C++ time ("cpp_p50_us"), the p50 and mean of the
time added per call ("added_p50_us", "added_mean_us": call less C++ time, sample by sample) and, within
it, the p50 of the time spent zeroing dispatch's rows past the valid ones ("fill_p50_us", Group.fill_ns:
work per byte of A * H, not per call). Modes: "eager" (the public functions), "op"
(torch.ops.moedist.*.default with every argument, as inductor's generated code calls it: what each
operator costs inside a compiled graph), "compiled" (a module of dispatch + combine under torch.compile:
one round trip, which includes torch.compile's own per-call work) and "compiled x + 1" (a compiled
module without moedist: that work alone). "op stand-in" and "compiled stand-in" are "op" and "compiled"
with stand-in operators of the same schemas and fakes whose kernels return results made beforehand:
what torch itself spends on such an operator, which no implementation of it can avoid."""
import argparse
import json
import multiprocessing
import os
import statistics
import time
import uuid

import torch

import moedist
from moedist import _groups, _ops


def inputs(rank, bs, h, k, experts):
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(bs, h, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(bs)]).to(torch.int32)
    weights = torch.rand(bs, k, generator=gen)
    return x, ids, weights


def standin_ops(dispatch_results, combine_result):
    """torch.ops.moedist_standin.{dispatch,combine}: moedist's two schemas and fakes, with CPU kernels that
    return the given results as they are."""
    from moedist import _custom_ops
    lib = torch.library.Library("moedist_standin", "DEF")
    ops = []
    for name, schema, fake, result in (
            ("npu_moe_distribute_dispatch", _custom_ops.DISPATCH_SCHEMA, _custom_ops._dispatch_fake,
             tuple(dispatch_results)),
            ("npu_moe_distribute_combine", _custom_ops.COMBINE_SCHEMA, _custom_ops._combine_fake, combine_result)):
        lib.define(schema)
        lib.impl(name, lambda *a, result=result, **k: result, "CPU")
        _custom_ops._register_fake(f"moedist_standin::{name}", fake, lib)
        op = getattr(torch.ops.moedist_standin, name).default
        _custom_ops._mark_side_effects(op)
        ops.append(op)
    standin_ops.library = lib  # kept alive with the process
    return ops


class StandInLayer(torch.nn.Module):
    """The compiled mode's module with the stand-ins in place of moedist's operators."""

    def __init__(self, ops, group_ep, kw):
        super().__init__()
        self.ops, self.group_ep, self.kw = ops, group_ep, kw

    def forward(self, x, ids, weights):
        d = self.ops[0](x, ids, self.group_ep, **self.kw)
        return self.ops[1](d[0], ids, d[2], d[4], weights, self.group_ep, **self.kw)


def rank_main(rank, args, job, queue):
    torch.set_num_threads(1)
    ep, _ = moedist.new_group(job, rank, 2)
    x, ids, weights = inputs(rank, args.bs, args.h, args.k, args.experts)
    kw = dict(ep_world_size=2, ep_rank_id=rank, moe_expert_num=args.experts)
    dispatch, combine = moedist.npu_moe_distribute_dispatch, moedist.npu_moe_distribute_combine
    dispatch(x, ids, ep.name, **kw)  # joins the group
    config = {key: 0 for key in _groups.CONFIG_KEYS}
    config.update(kw, shared_expert_num=1)
    group = _groups.group_for(ep.name, "", config)
    perf = time.perf_counter_ns

    def timed(call_dispatch, call_combine):
        """One dispatch + combine: (dispatch's µs, its C++ µs, its zero fill µs, combine's µs, its C++ µs)."""
        c0, f0 = group.call_ns, group.fill_ns
        t0 = perf()
        d = call_dispatch()
        t1 = perf()
        c1, f1 = group.call_ns, group.fill_ns
        t2 = perf()
        call_combine(d)
        t3 = perf()
        c2 = group.call_ns
        return (t1 - t0) / 1e3, (c1 - c0) / 1e3, (f1 - f0) / 1e3, (t3 - t2) / 1e3, (c2 - c1) / 1e3

    modes = {"eager": lambda: timed(lambda: dispatch(x, ids, ep.name, **kw),
                                     lambda d: combine(d[0], ids, d[2], d[4], weights, ep.name, **kw))}
    if _ops._registered_ops is not None:
        op_dispatch = torch.ops.moedist.npu_moe_distribute_dispatch.default
        op_combine = torch.ops.moedist.npu_moe_distribute_combine.default
        dispatch_defaults = dict(scales=None, x_active_mask=None, expert_scales=None, group_tp="", tp_world_size=0,
                                 tp_rank_id=0, expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0,
                                 quant_mode=0, global_bs=0, expert_token_nums_type=1)
        combine_defaults = dict(tp_send_counts=None, x_active_mask=None, activation_scale=None, weight_scale=None,
                                group_list=None, expand_scales=None, shared_expert_x=None, group_tp="", tp_world_size=0,
                                tp_rank_id=0, expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0,
                                global_bs=0, out_dtype=0, comm_quant_mode=0, group_list_type=0)
        w = (2, rank, args.experts)
        modes["op"] = lambda: timed(lambda: op_dispatch(x, ids, ep.name, *w, **dispatch_defaults),
                                    lambda d: op_combine(d[0], ids, d[2], d[4], weights, ep.name, *w, **combine_defaults))

        class Layer(torch.nn.Module):
            def forward(self, x, ids, weights):
                d = moedist.npu_moe_distribute_dispatch(x, ids, ep.name, **kw)
                return moedist.npu_moe_distribute_combine(d[0], ids, d[2], d[4], weights, ep.name, **kw)

        compiled = torch.compile(Layer(), backend=args.backend, dynamic=False, fullgraph=True)

        def round_trip():
            c0, f0 = group.call_ns, group.fill_ns
            t0 = perf()
            compiled(x, ids, weights)
            t1 = perf()
            return (t1 - t0) / 1e3, (group.call_ns - c0) / 1e3, (group.fill_ns - f0) / 1e3

        # What torch.compile itself costs per call of a compiled module, with no moedist in it.
        empty_graph = torch.compile(lambda x, ids, weights: x + 1, backend=args.backend, dynamic=False, fullgraph=True)

        def baseline():
            t0 = perf()
            empty_graph(x, ids, weights)
            return (perf() - t0) / 1e3, 0.0, 0.0

        d = dispatch(x, ids, ep.name, **kw)
        eager_out = combine(d[0], ids, d[2], d[4], weights, ep.name, **kw)
        assert torch.equal(compiled(x, ids, weights).view(torch.int16), eager_out.view(torch.int16))

        # torch's own floor for these two operators: stand-ins registered with the very schemas and fakes,
        # whose kernels only hand back results made beforehand (no arguments read, nothing allocated, no
        # communication), called as the op and compiled as the module above.
        standin = standin_ops(d, eager_out)
        standin_compiled = torch.compile(StandInLayer(standin, ep.name, kw), backend=args.backend, dynamic=False,
                                         fullgraph=True)

        def standin_round_trip():
            t0 = perf()
            standin_compiled(x, ids, weights)
            return (perf() - t0) / 1e3, 0.0, 0.0

        def standin_op():
            t0 = perf()
            r = standin[0](x, ids, ep.name, *w, **dispatch_defaults)
            t1 = perf()
            standin[1](r[0], ids, r[2], r[4], weights, ep.name, *w, **combine_defaults)
            t2 = perf()
            return (t1 - t0) / 1e3, 0.0, 0.0, (t2 - t1) / 1e3, 0.0

        modes["op stand-in"] = standin_op
        modes["compiled"] = round_trip
        modes["compiled stand-in"] = standin_round_trip
        modes["compiled x + 1"] = baseline
    samples = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, fn in modes.items():  # the same order on both ranks: the calls are collective
            for _ in range(args.warmup):
                fn()
            for _ in range(args.calls):
                samples[name].append(fn())
    queue.put((rank, samples))


def summary(calls, cpp, fill=None):
    ordered = sorted(calls)
    added = [c - p for c, p in zip(calls, cpp)]
    out = {"p50_us": round(statistics.median(calls), 2), "mean_us": round(statistics.fmean(calls), 2),
           "p99_us": round(ordered[int(0.99 * (len(ordered) - 1))], 2), "cpp_p50_us": round(statistics.median(cpp), 2),
           "added_p50_us": round(statistics.median(added), 2), "added_mean_us": round(statistics.fmean(added), 2)}
    if fill is not None:
        out["fill_p50_us"] = round(statistics.median(fill), 2)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bs", type=int, default=1)
    parser.add_argument("--h", type=int, default=7168)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled mode")
    args = parser.parse_args()
    job = f"python-layer-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, args, job, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    report = {"torch": torch.__version__, "W": 2, "BS": args.bs, "H": args.h, "K": args.k, "E": args.experts,
              "calls_per_mode": args.rounds * args.calls, "rank0": {}}
    for name, values in results[0].items():
        if name.startswith("compiled"):
            calls, cpp, fill = zip(*values)
            key = "call" if name == "compiled x + 1" else "dispatch+combine"
            report["rank0"][name] = {key: summary(calls, cpp, fill)}
        else:
            d_calls, d_cpp, d_fill, c_calls, c_cpp = zip(*values)
            report["rank0"][name] = {"dispatch": summary(d_calls, d_cpp, d_fill), "combine": summary(c_calls, c_cpp)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
