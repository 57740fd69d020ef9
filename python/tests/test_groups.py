"""Groups are their members, as HCCL communicators are: several EP groups inside one torch.distributed
world (the issue's 16 processes as two EP groups of 8), groups of any member lists and configurations
side by side, TP pairs from torch groups in any layout, and MPI sub-communicators. Every dispatch and
combine is checked bit for bit against the oracle (cases.check_rank)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import moedist
from cases import check_rank, random_case
from conftest import run_ranks
from test_processes import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


class Named:
    """A torch.distributed group as check_rank takes groups: with get_hccl_comm_name(rank)."""

    def __init__(self, group):
        self.group = group

    def get_hccl_comm_name(self, rank):
        return moedist.get_hccl_comm_name(self.group, rank)


def init(g, n, port):
    dist.init_process_group(backend="gloo", rank=g, world_size=n, init_method=f"tcp://127.0.0.1:{port}")


def groups_of(g, member_lists):
    """Every process makes every group (torch requires it); returns this process's group of each list."""
    made = [dist.new_group(backend="gloo", ranks=ranks) for ranks in member_lists]
    return [group for group, ranks in zip(made, member_lists) if g in ranks]


def wrong_mask_is_refused(name, case, position, tp_world_size=0):
    """A bool mask one entry too long, on a torch group: moedist.ValidationError naming x_active_mask
    (the bool tensor reaches the operator's validation)."""
    r = case["ranks"][position]
    mask = torch.ones(r["x"].shape[0] + 1, dtype=torch.bool)
    x = torch.from_numpy(r["x"].view(np.int16)).view(torch.bfloat16 if case["dtype"] == "bfloat16" else torch.float16)
    with pytest.raises(moedist.ValidationError) as info:
        moedist.npu_moe_distribute_dispatch(x, torch.from_numpy(r["expert_ids"]), name, case["ep_world_size"], position,
                                            case["moe_expert_num"], x_active_mask=mask, tp_world_size=tp_world_size,
                                            shared_expert_rank_num=case["shared_expert_rank_num"], global_bs=case["global_bs"])
    assert info.value.parameter.startswith("x_active_mask"), str(info.value)


# ---- the case: 16 processes, tp_world_size 1, EP groups of the even and of the odd ranks ----

def two_groups_of_eight(g, n, port):
    init(g, n, port)
    tp_world_size, ep_world_size = 2, 8  # the split the operator page's get_new_group makes for tp = 2
    ep_lists = [[x * tp_world_size + i for x in range(ep_world_size)] for i in range(tp_world_size)]
    (ep_group,) = groups_of(g, ep_lists)
    lane = g % 2
    # One configuration for both groups, different data: disjoint groups of one configuration must not meet.
    case = random_case(3, ep_world_size=8, tp=1, data_seed=lane)
    # Every int argument a numpy integer, as the code has them (from np.arange).
    valid = check_rank(g // 2, 8, case, "torch", g % 4 == 1, groups=(Named(ep_group), None), ints=np.int64)
    dist.destroy_process_group()
    return lane, valid


def test_sixteen_processes_two_ep_groups_of_eight():
    results = run_ranks(16, two_groups_of_eight, free_port(), timeout=400)
    assert [lane for lane, _ in results] == [g % 2 for g in range(16)]


# ---- groups of several member lists and configurations in one world ----

def mixed_groups(g, n, port):
    init(g, n, port)
    evens, odds, pair = [0, 2, 4], [1, 3, 5], [0, 1]
    mine = groups_of(g, [evens, odds, pair])
    three = Named(mine[0])
    case3 = random_case(5, ep_world_size=3, tp=0, data_seed=g % 2)
    position = g // 2
    wrong_mask_is_refused(three.get_hccl_comm_name(g), case3, position)  # all ranks alike: the group stays usable
    check_rank(position, 3, case3, "torch", g % 2 == 1, groups=(three, None), ints=lambda v: torch.tensor(v))
    if g in pair:  # a later group of other members and another configuration, beside the first
        case2 = random_case(11, ep_world_size=2, tp=0)
        check_rank(g, 2, case2, "numpy", False, groups=(Named(mine[1]), None), ints=np.int32)
    check_rank(position, 3, case3, "numpy", True, groups=(three, None))  # the first groups still work
    dist.destroy_process_group()
    return True


def test_several_groups_of_any_members_and_configuration_in_one_world():
    run_ranks(6, mixed_groups, free_port(), timeout=300)


# ---- TP pairs from torch groups, in a layout other than the operator page's ----

def tp_pairs_across_contiguous_ep_groups(g, n, port):
    init(g, n, port)
    # EP groups {0, 1} and {2, 3}; TP pairs {0, 2} and {1, 3}: TP lane t is the EP group {2t, 2t + 1}.
    ep_group, tp_group = groups_of(g, [[0, 1], [2, 3], [0, 2], [1, 3]])
    ep_rank_id, tp_rank_id = g % 2, g // 2
    case = random_case(7, ep_world_size=2, tp=2)
    check_rank(ep_rank_id * 2 + tp_rank_id, 4, case, "torch", g == 3, groups=(Named(ep_group), Named(tp_group)))
    dist.destroy_process_group()
    return True


def test_tp_world_size_2_from_torch_groups_in_another_layout():
    run_ranks(4, tp_pairs_across_contiguous_ep_groups, free_port())


def tp_pairs_that_cross_lanes(g, n, port):
    init(g, n, port)
    # EP groups {0, 3} and {1, 2} with TP pairs {0, 1} and {2, 3}: 0 and 3 would be in different TP lanes.
    ep_group, tp_group = groups_of(g, [[0, 3], [1, 2], [0, 1], [2, 3]])
    ep_rank_id, tp_rank_id = dist.get_rank(ep_group), dist.get_rank(tp_group)
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    ids = torch.zeros(1, 1, dtype=torch.int32)
    try:
        moedist.npu_moe_distribute_dispatch(x, ids, moedist.get_hccl_comm_name(ep_group), 2, ep_rank_id, 2,
                                            group_tp=moedist.get_hccl_comm_name(tp_group), tp_world_size=2,
                                            tp_rank_id=tp_rank_id)
    except moedist.ValidationError as e:
        return e.parameter, e.rule
    finally:
        dist.destroy_process_group()
    return "", "no error"


def test_tp_pairs_that_cross_ep_lanes_are_named_on_every_rank():
    for parameter, rule in run_ranks(4, tp_pairs_that_cross_lanes, free_port()):
        assert parameter == "tp_rank_id" and "an EP group is one TP lane" in rule, (parameter, rule)


def positions_and_the_world_group(g, n, port):
    init(g, n, port)
    made = [dist.new_group(backend="gloo", ranks=ranks) for ranks in ([0, 2], [1, 3])]
    group = made[g % 2]
    name = moedist.get_hccl_comm_name(group)
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    ids = torch.zeros(1, 1, dtype=torch.int32)
    errors = []
    for kw in (dict(ep_world_size=2, ep_rank_id=1 - g // 2), dict(ep_world_size=4, ep_rank_id=g)):
        with pytest.raises(moedist.ValidationError) as info:
            moedist.npu_moe_distribute_dispatch(x, ids, name, moe_expert_num=kw["ep_world_size"], **kw)
        errors.append((info.value.parameter, info.value.rule))
    with pytest.raises(moedist.ValidationError) as info:  # torch's stand-in for a group this process is not in
        moedist.get_hccl_comm_name(made[1 - g % 2])
    errors.append((info.value.parameter, info.value.rule))
    # The default group, as None or as dist.group.WORLD, is the whole world.
    assert moedist.get_hccl_comm_name(None) == moedist.get_hccl_comm_name(dist.group.WORLD)
    check_rank(g, 4, random_case(9, ep_world_size=4, tp=0), "torch", False, groups=(Named(None), None))
    dist.destroy_process_group()
    return errors


def test_positions_sizes_and_membership_are_named_and_the_world_group_works():
    for g, errors in enumerate(run_ranks(4, positions_and_the_world_group, free_port())):
        (p1, r1), (p2, r2), (p3, r3) = errors
        assert p1 == "ep_rank_id" and f"this process is world rank {g}, at position {g // 2}" in r1, r1
        assert p2 == "ep_world_size" and "must equal the size of group_ep, 2" in r2, r2
        assert p3 == "group" and f"this process (rank {g} of torch.distributed) is not a member" in r3, r3


# ---- moedist.new_group: an EP lane of a TP world used without TP, beside the TP group ----

def lane_and_tp_groups(g, n, job):
    ep, tp = moedist.new_group(job, g, n, tp_world_size=2)
    lane_case = random_case(8, ep_world_size=2, tp=0, data_seed=g % 2)
    check_rank(g // 2, 2, lane_case, "numpy", False, groups=(ep, None))  # the C++ group of ranks {g % 2, g % 2 + 2}
    check_rank(g, n, random_case(7, ep_world_size=2, tp=2), "torch", True, groups=(ep, tp))  # all four, with TP
    return True


def test_an_ep_lane_without_tp_beside_the_tp_group(job):
    run_ranks(4, lane_and_tp_groups, job)


def test_tp_group_mistakes_are_named(job):
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    ids = torch.zeros(1, 1, dtype=torch.int32)
    ep, tp = moedist.new_group(job, 0, 2, tp_world_size=2)
    other_ep, other_tp = moedist.new_group(job + "-other", 0, 2, tp_world_size=2)
    plain_ep, plain_tp = moedist.new_group(job + "-plain", 0, 2)
    d = lambda **kw: moedist.npu_moe_distribute_dispatch(**{**dict(x=x, expert_ids=ids, group_ep=ep.name, ep_world_size=1,
                                                                   ep_rank_id=0, moe_expert_num=1, group_tp=tp.name,
                                                                   tp_world_size=2, tp_rank_id=0), **kw})
    cases = [
        (dict(tp_rank_id=1), "tp_rank_id", "this process is world rank 0, at position 0"),
        (dict(group_tp=other_tp.name), "group_tp", "must name a group of the same world as group_ep"),
        (dict(group_tp=other_ep.name), "group_tp", "must name a TP group, not an EP group"),
        (dict(group_ep=plain_ep.name, group_tp=plain_tp.name, ep_world_size=2, moe_expert_num=2), "group_tp",
         "must name a group of 2 ranks with tp_world_size = 2, not 1"),
        (dict(group_tp=""), "group_tp", "must be a string of length [1, 128)"),
    ]
    for kw, parameter, rule in cases:
        with pytest.raises(moedist.ValidationError) as info:
            d(**kw)
        assert info.value.parameter == parameter and rule in info.value.rule, (kw, str(info.value))


# ---- MPI: disjoint sub-communicators at once, and a group over part of a communicator ----

@pytest.mark.skipif(not moedist.has_mpi, reason="moedist was built without MPI")
def test_mpi_sub_communicators():
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun is not in PATH"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    out = subprocess.run([mpirun, "--oversubscribe", "-np", "4", "-x", "PYTHONPATH", sys.executable,
                          os.path.join(HERE, "rank_script.py"), "mpi-split"], capture_output=True, text=True, timeout=300,
                         env=env, start_new_session=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for g in range(4):
        assert f"rank {g}: 3 cases match the oracle" in out.stdout, out.stdout
