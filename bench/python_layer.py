"""What the Python layer adds to a dispatch + combine: the public functions (and, on torch >= 2.1, a module
compiled with torch.compile) against the extension's own calls with their arguments ready, measured side
by side in one run. Two ranks over shared memory, one process each; every mode runs in alternating
rounds, so that load drifts on a shared machine touch every mode alike, and the report takes medians.

  PYTHONPATH=build/release/python /usr/bin/python3 bench/python_layer.py            # torch 1.13 (Debian)
  PYTHONPATH=build/release/python build/venv-torch2/bin/python bench/python_layer.py  # torch 2.13

Prints one JSON object: the configuration, torch's version, and per mode the p50, mean and p99 of a
dispatch + combine in µs, and the p50 added over the extension's calls ("added_us")."""
import argparse
import json
import multiprocessing
import os
import statistics
import time
import uuid

import numpy as np
import torch

import moedist
from moedist import _groups, _ops


def inputs(rank, bs, h, k, experts):
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(bs, h, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(bs)]).to(torch.int32)
    weights = torch.rand(bs, k, generator=gen)
    return x, ids, weights


def rank_main(rank, args, job, queue):
    torch.set_num_threads(1)
    ep, _ = moedist.new_group(job, rank, 2)
    x, ids, weights = inputs(rank, args.bs, args.h, args.k, args.experts)
    kw = dict(ep_world_size=2, ep_rank_id=rank, moe_expert_num=args.experts)

    def public():
        d = moedist.npu_moe_distribute_dispatch(x, ids, ep.name, **kw)
        return moedist.npu_moe_distribute_combine(d[0], ids, d[2], d[4], weights, ep.name, **kw)

    # The extension's calls with everything ready: the group joined, the tensors as the extension reads
    # them (numpy views of the same memory), the results as it returns them.
    public()  # joins the group
    config = dict(kw, tp_world_size=0, tp_rank_id=0, expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0,
                  global_bs=0)
    group = _groups.group_for(ep.name, "", config)
    xb = x.view(torch.int16).numpy().view(np.uint16)
    idn, wn = ids.numpy(), weights.numpy()
    bf16 = {"x": moedist._moedist.ViewAs.bfloat16}
    bf16_combine = {"expand_x": moedist._moedist.ViewAs.bfloat16}

    def extension():
        d = group.dispatch(x=xb, expert_ids=idn, scales=None, x_active_mask=None, expert_scales=None, quant_mode=0,
                           expert_token_nums_type=1, views=bf16)
        return group.combine(expand_x=d[0], expert_ids=idn, expand_idx=d[2], ep_send_counts=d[4], expert_scales=wn,
                             tp_send_counts=None, x_active_mask=None, activation_scale=None, weight_scale=None,
                             group_list=None, expand_scales=None, shared_expert_x=None, out_dtype=0, comm_quant_mode=0,
                             group_list_type=0, views=bf16_combine)

    modes = {"extension": extension, "public": public}
    if _ops._registered_ops is not None:
        class Layer(torch.nn.Module):
            def forward(self, x, ids, weights):
                d = moedist.npu_moe_distribute_dispatch(x, ids, ep.name, **kw)
                return moedist.npu_moe_distribute_combine(d[0], ids, d[2], d[4], weights, ep.name, **kw)

        compiled = torch.compile(Layer(), backend=args.backend, dynamic=False, fullgraph=True)
        modes["compiled"] = lambda: compiled(x, ids, weights)
        assert torch.equal(compiled(x, ids, weights).view(torch.int16), public().view(torch.int16))
    samples = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, fn in modes.items():  # the same order on both ranks: the calls are collective
            for _ in range(args.warmup):
                fn()
            for _ in range(args.calls):
                start = time.perf_counter_ns()
                fn()
                samples[name].append((time.perf_counter_ns() - start) / 1000.0)
    queue.put((rank, samples))


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
    samples = results[0]
    base = statistics.median(samples["extension"])
    for name, values in samples.items():
        median = statistics.median(values)
        ordered = sorted(values)
        report["rank0"][name] = {"p50_us": round(median, 2), "mean_us": round(statistics.fmean(values), 2),
                                 "p99_us": round(ordered[int(0.99 * (len(ordered) - 1))], 2),
                                 "added_us": round(median - base, 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
