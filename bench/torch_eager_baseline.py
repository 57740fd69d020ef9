#!/usr/bin/env python3
"""The PyTorch eager equivalent of moedist's fused CUDA dispatch and combine, on one GPU.

Dispatch: a stable argsort of the routing entries by expert, index_select of the token rows, per-row
amax, scale and round to int8 (dynamic per-token quantization, quant_mode 2). Combine: the weighted
expert rows summed into their tokens with index_add_ in fp32, then rounded to bf16. The same shape and
timing method as bench/cuda_bench.cpp (CUDA events around batches of 10 back-to-back calls, median of
--iters batches after --warmup calls); random inputs,
never zeros. Exit 77 where torch or a CUDA device is missing.
"""
import argparse
import json
import sys


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--h", type=int, default=7168)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    try:
        import torch
    except ImportError as e:
        print(f"SKIPPED: torch is not importable ({e})")
        return 77
    if not torch.cuda.is_available():
        print("SKIPPED: torch sees no CUDA device")
        return 77
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    x = (torch.rand(a.tokens, a.h, device=dev, generator=g) * 8 - 4).to(torch.bfloat16)
    ids = torch.rand(a.tokens, a.experts, device=dev, generator=g).topk(a.k, dim=1).indices.to(torch.int32)
    weights = torch.rand(a.tokens, a.k, device=dev, generator=g) - 0.5

    def dispatch():
        order = torch.argsort(ids.flatten().long(), stable=True)
        rows = torch.index_select(x, 0, order // a.k).float()
        ds = 127.0 / rows.abs().amax(dim=1, keepdim=True)
        q = torch.round(rows * ds).to(torch.int8)
        return q, (1.0 / ds).squeeze(1), order

    _, _, order = dispatch()
    expert_out = (torch.rand(a.tokens * a.k, a.h, device=dev, generator=g) * 8 - 4).to(torch.bfloat16)

    def combine():
        acc = torch.zeros(a.tokens, a.h, device=dev, dtype=torch.float32)
        acc.index_add_(0, order // a.k, expert_out.float() * weights.flatten()[order][:, None])
        return acc.to(torch.bfloat16)

    batch = 10  # as moedist_cuda_bench: batches of back-to-back calls, median of the per-call times

    def timed(fn):
        for _ in range(a.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(a.iters):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(batch):
                fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / batch)
        times.sort()
        return times[len(times) // 2]

    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": a.tokens, "h": a.h, "k": a.k,
              "experts": a.experts, "iters": a.iters, "dispatch_ms": timed(dispatch), "combine_ms": timed(combine)}
    print(f"torch eager on {result['device']} (torch {result['torch']}): dispatch {result['dispatch_ms']:.3f} ms, "
          f"combine {result['combine_ms']:.3f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
