"""The V1 token mask as an inference engine's MC2 dispatcher passes it: a 1-D bool x_active_mask (padding
tokens false) on dispatch and combine, global_bs = 0, expand_idx handed back as dispatch's (BS, K)
copy; through torch.distributed groups and in one process, torch and numpy masks, contiguous and
strided. Every output is compared with the oracle bit for bit (cases.check_rank), which zeroes the
inactive tokens' combine rows and expand_idx entries."""
import numpy as np
import pytest
import torch
import torch.distributed as dist

import moedist
from cases import check_rank, random_case
from conftest import run_ranks
from test_processes import free_port


def masked_seeds(world, want, tp=None):
    """Seeds whose masked case has `world` ranks (T == tp when given) and some rank with padding."""
    found, seed = [], 0
    while len(found) < want:
        case = random_case(seed, masks=True)
        t = case["tp_world_size"]
        padded = any("x_active_mask" in r and not r["x_active_mask"].all() for r in case["ranks"])
        if padded and case["ep_world_size"] * max(t, 1) == world and (tp is None or t == tp):
            found.append(seed)
        seed += 1
    return found


def engine_rank(g, n, seeds, port):
    dist.init_process_group(backend="gloo", rank=g, world_size=n, init_method=f"tcp://127.0.0.1:{port}")
    for seed in seeds:
        case = random_case(seed, masks=True)
        t = max(case["tp_world_size"], 1)
        groups = [dist.new_group(backend="gloo", ranks=[x * t + i for x in range(n // t)]) for i in range(t)]
        pairs = [dist.new_group(backend="gloo", ranks=[x * t + i for i in range(t)]) for x in range(n // t)]

        class Named:
            def __init__(self, group):
                self.group = group

            def get_hccl_comm_name(self, rank):
                return moedist.get_hccl_comm_name(self.group, rank)

        check_rank(g, n, case, "torch", g % 2 == 1, groups=(Named(groups[g % t]), Named(pairs[g // t])))
    dist.destroy_process_group()
    return True


@pytest.mark.parametrize("tp", [0, 2])
def test_masked_calls_over_torch_distributed_groups(tp):
    run_ranks(4, engine_rank, masked_seeds(4, 2, tp), free_port(), timeout=300)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_masked_calls_in_one_process(kind, strided, job):
    for seed in masked_seeds(1, 4):
        check_rank(0, 1, random_case(seed, ep_world_size=1, tp=0, masks=True), kind, strided,
                   groups=moedist.new_group(f"{job}-{seed}", 0, 1))


def test_the_engine_pattern_padding_rows_come_back_zero(job):
    """Four tokens, the last one padding, global_bs 0: only three are sent, combine's padding row is zero."""
    ep, _ = moedist.new_group(job, 0, 1)
    name = ep.get_hccl_comm_name(0)
    x = torch.randn(4, 32).to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [9, 9]], dtype=torch.int32)  # padding ids are never read
    mask = torch.tensor([True, True, True, False])
    out = moedist.npu_moe_distribute_dispatch(x, ids, name, 1, 0, 4, x_active_mask=mask)
    expand_x, _, expand_idx, expert_token_nums, ep_recv_counts = out[:5]
    assert int(ep_recv_counts[-1]) == 6 and expert_token_nums.tolist() == [1, 2, 2, 1]
    assert expand_idx.tolist()[6:] == [0, 0]
    weights = torch.full((4, 2), 0.5)
    y = moedist.npu_moe_distribute_combine(expand_x, ids, expand_idx.reshape(4, 2), ep_recv_counts, weights, name, 1, 0, 4,
                                           x_active_mask=mask)
    assert torch.equal(y[3], torch.zeros(32, dtype=torch.bfloat16))
    assert torch.equal(y[:3], (x[:3].float() * 0.5 + x[:3].float() * 0.5).to(torch.bfloat16))


def test_mask_rules_are_named(job):
    ep, _ = moedist.new_group(job, 0, 1)
    name = ep.get_hccl_comm_name(0)
    x = torch.zeros(3, 8, dtype=torch.float16)
    ids = torch.tensor([[0], [1], [0]], dtype=torch.int32)

    def refused(mask, parameter, rule):
        with pytest.raises(moedist.ValidationError) as info:
            moedist.npu_moe_distribute_dispatch(x, ids, name, 1, 0, 2, x_active_mask=mask)
        assert info.value.parameter == parameter and rule in info.value.rule, str(info.value)

    refused(torch.tensor([True, False, True]), "x_active_mask[2]", "every true must come before every false")
    refused(np.array([False, True, True]), "x_active_mask[1]", "every true must come before every false")
    refused(torch.ones(3, 1, dtype=torch.bool), "x_active_mask.shape", "a (BS, K) mask is a V2 operator's")
    refused(torch.ones(3, dtype=torch.int32), "x_active_mask.dtype", "must be bool")
    # A numpy bool mask is read as such (not refused for its dtype) and works.
    out = moedist.npu_moe_distribute_dispatch(x, ids, name, 1, 0, 2, x_active_mask=np.array([True, True, False]))
    assert int(out[4][-1]) == 2
