"""One rank of a job started outside pytest: `moedist launch -n N -- python3 rank_script.py env SEED...` or
`mpirun -np N python3 rank_script.py mpi SEED...`. Joins its groups from the launcher's environment or
from MPI_COMM_WORLD (mpi4py), runs the random case of each seed (its world size must be N) and compares
every output with the oracle. Prints "rank G: N cases match the oracle"; exits 1 on a difference.
`mpirun -np 4 python3 rank_script.py mpi-split` runs fixed cases on MPI sub-communicators instead;
`mpirun -np 4 python3 rank_script.py mpi-threads N` fixed wide cases on groups of N worker threads."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moedist  # noqa: E402
from cases import check_rank, random_case  # noqa: E402

mode, seeds = sys.argv[1], [int(s) for s in sys.argv[2:]]
if mode == "mpi-split":
    # Two disjoint sub-communicators of one configuration at once ({0, 1} and {2, 3} from comm.Split), then
    # groups over part of MPI_COMM_WORLD ({0, 2} and {1, 3}: the EP lanes of tp_world_size 2, used without
    # TP), beside them.
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    g = world.Get_rank()
    sub = world.Split(color=g // 2, key=g)
    ep, tp = moedist.new_group_from_mpi(sub)
    case = random_case(7, ep_world_size=2, tp=0, data_seed=g // 2)
    check_rank(sub.Get_rank(), 2, case, "numpy", False, groups=(ep, tp))
    lane_ep, _ = moedist.new_group_from_mpi(world, tp_world_size=2)
    lane_case = random_case(8, ep_world_size=2, tp=0, data_seed=g % 2)
    check_rank(g // 2, 2, lane_case, "torch", True, groups=(lane_ep, None))
    check_rank(sub.Get_rank(), 2, case, "torch", True, groups=(ep, tp))  # the first group still works
    print(f"rank {g}: 3 cases match the oracle", flush=True)
    sys.exit(0)
if mode == "mpi-threads":
    # Rows wide enough for the row loops to be split between the threads (test_worker_threads.py's WIDE).
    from mpi4py import MPI
    from moedist import _groups
    threads, g = seeds[0], MPI.COMM_WORLD.Get_rank()
    for seed, t in ((9, 0), (6, 2)):  # quant_mode 2 and comm quantization, a shared-expert rank; TP
        case = random_case(seed, ep_world_size=4 // max(t, 1), tp=t, h=2048, max_bs=16)
        ep, tp = moedist.new_group_from_mpi(tp_world_size=t, worker_threads=threads)
        check_rank(g, 4, case, "torch", g % 2 == 1, groups=(ep, tp))
        joined = [cpp.worker_threads for cpp, names in _groups._groups.values() if ep.name in names]
        if joined != [threads]:
            sys.exit(f"rank {g}: seed {seed} joined C++ groups of {joined} worker threads, not [{threads}]")
    print(f"rank {g}: 2 cases with {threads} worker threads match the oracle", flush=True)
    sys.exit(0)
count = 0
for seed in seeds:
    case = random_case(seed)
    t = case["tp_world_size"]
    if mode == "env":
        groups = moedist.new_group_from_env(tp_world_size=t)
    else:
        groups = moedist.new_group_from_mpi(tp_world_size=t)
    g = groups[0]._domain.world.rank
    n = groups[0]._domain.world.size
    if n != case["ep_world_size"] * max(t, 1):
        sys.exit(f"rank {g}: seed {seed} makes a case of {case['ep_world_size'] * max(t, 1)} ranks, not {n}")
    check_rank(g, n, case, "torch" if seed % 2 else "numpy", seed % 3 == 1, groups=groups)
    count += 1
print(f"rank {g}: {count} cases match the oracle", flush=True)
