#!/usr/bin/env python3
"""Prints the table of docs/performance.md's CUDA section from one run's JSON files.

Usage: cuda_report.py CUDA_BENCH_JSON [TORCH_EAGER_JSON]. Ratios are between numbers measured in the
same run on the same card: time over the HBM byte floor (bytes / the copy bandwidth measured then), and
the PyTorch eager time over moedist's single-rank time.
"""
import json
import sys


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__)
        return 2
    bench = json.load(open(sys.argv[1]))
    torch = json.load(open(sys.argv[2])) if len(sys.argv) == 3 else None
    print(f"device: {bench['device']}; copy bandwidth {bench['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s; "
          f"{bench['tokens']} tokens, H {bench['h']}, K {bench['k']}, {bench['experts']} experts, bf16")
    print("| ranks on the GPU | call | ms | floor ms | × floor | PyTorch eager ms | eager / moedist |")
    print("|---|---|---|---|---|---|---|")
    eager = {"dispatch quant_mode 2": torch and torch["dispatch_ms"], "combine": torch and torch["combine_ms"]}
    for r in bench["results"]:
        e = eager.get(r["call"]) if r["ranks"] == 1 else None
        eager_cols = f"{e:.3f} | {e / r['ms']:.1f}×" if e else "– | –"
        # Ranks sharing the GPU without MPS take turns by time slices: their times are latencies of that
        # sharing, not kernel speed against the floor.
        ratio = f"{r['ms'] / r['floor_ms']:.2f}" if r["ranks"] == 1 else "(time-sliced)"
        print(f"| {r['ranks']} | {r['call']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | {ratio} | {eager_cols} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
