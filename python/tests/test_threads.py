"""Threads of one process sharing a group: the C++ group is cached per (world, members, config) and the GIL is
released during its calls, so concurrent calls on it must be serialized, never overlap. Without the
group's lock the calls below overlap and corrupt each other (wrong rows, spurious ValidationError or
PeerError); with it every round trip equals its single-threaded run."""
import threading

import numpy as np
import pytest
import torch

import moedist
from cases import bits_of


@pytest.fixture
def one(job):
    ep, _ = moedist.new_group(job, 0, 1)
    return ep.get_hccl_comm_name(0)


def round_trip(group, seed, bs=64, h=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bs, h, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(bs)]).to(torch.int32)
    w = torch.rand(bs, 2, generator=g)
    d = moedist.npu_moe_distribute_dispatch(x, ids, group, 1, 0, 8, expert_scales=w)
    y = moedist.npu_moe_distribute_combine(d[0], ids, d[2], d[4], w, group, 1, 0, 8)
    return [bits_of(t).copy() for t in d] + [bits_of(y).copy()]


def test_two_threads_on_one_group_get_the_single_threaded_results(one):
    seeds = {0: [100 + i for i in range(150)], 1: [200 + i for i in range(150)]}
    want = {s: round_trip(one, s) for ss in seeds.values() for s in ss}
    got, errors = {}, []
    start = threading.Barrier(2)

    def worker(t):
        try:
            start.wait()
            for s in seeds[t]:
                got[s] = round_trip(one, s)
        except Exception as e:  # reported below, with the seed's thread
            errors.append(f"thread {t}: {e!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert errors == []
    for s, outputs in want.items():
        for i, (a, b) in enumerate(zip(outputs, got[s])):
            np.testing.assert_array_equal(a, b, err_msg=f"seed {s}, output {i}")
