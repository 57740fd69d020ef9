"""The package across processes the ways users start them: torch.multiprocessing with torch.distributed
groups (named by get_hccl_comm_name), `moedist launch` (new_group_from_env), mpirun with mpi4py
(new_group_from_mpi, also across virtual hosts) and the operator page's example. pip install: test_packaging.py."""
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch.distributed as dist

import moedist
from cases import check_rank, random_case, seeds_for
from conftest import BUILD_DIR, SOURCE_DIR, run_ranks  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_rank(g, n, case, port):
    dist.init_process_group(backend="gloo", rank=g, world_size=n, init_method=f"tcp://127.0.0.1:{port}")
    t = max(case["tp_world_size"], 1)
    ep_group = tp_group = None
    for i in range(t):  # the operator page's split: EP groups [x * T + i], TP groups [x * T, x * T + 1]
        ranks = [x * t + i for x in range(n // t)]
        group = dist.new_group(backend="gloo", ranks=ranks)
        if g in ranks:
            ep_group = group
    for x in range(n // t):
        ranks = [x * t + i for i in range(t)]
        group = dist.new_group(backend="gloo", ranks=ranks)
        if g in ranks:
            tp_group = group

    class Named:  # what check_rank expects of a group: get_hccl_comm_name(rank)
        def __init__(self, group):
            self.group = group

        def get_hccl_comm_name(self, rank):
            return moedist.get_hccl_comm_name(self.group, rank)

    valid = check_rank(g, n, case, "torch", g % 2 == 1, groups=(Named(ep_group), Named(tp_group)))
    dist.destroy_process_group()
    return valid


@pytest.mark.parametrize("tp", [0, 2])
def test_torch_distributed_groups(tp):
    seed = seeds_for(4, 1, tp)[0]
    run_ranks(4, torch_rank, random_case(seed), free_port())


def test_moedist_launch_environment():
    cli = os.path.join(BUILD_DIR, "tools", "moedist")
    seeds = seeds_for(4, 3)
    out = subprocess.run([cli, "launch", "-n", "4", "--", sys.executable, os.path.join(HERE, "rank_script.py"), "env",
                          *map(str, seeds)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for g in range(4):
        assert f"rank {g}: 3 cases match the oracle" in out.stdout, out.stdout


@pytest.mark.skipif(not moedist.has_mpi, reason="moedist was built without MPI")
@pytest.mark.parametrize("ranks_per_node", [4, 2], ids=["one host", "two virtual hosts"])
def test_mpi4py_communicator(ranks_per_node):
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun is not in PATH"
    seeds = seeds_for(4, 3, tp=0) + seeds_for(4, 1, tp=2)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    out = subprocess.run([mpirun, "--oversubscribe", "-np", "4", "-x", f"MOEDIST_RANKS_PER_NODE={ranks_per_node}", "-x",
                          "PYTHONPATH", sys.executable, os.path.join(HERE, "rank_script.py"), "mpi", *map(str, seeds)],
                         capture_output=True, text=True, timeout=300, env=env,
                         start_new_session=True)  # mpirun in its own process group (CMakeLists.txt: MOEDIST_TEST_MPIRUN)
    assert out.returncode == 0, out.stdout + out.stderr
    for g in range(4):
        assert f"rank {g}: 4 cases match the oracle" in out.stdout, out.stdout


def test_the_operator_pages_example_runs_and_matches_its_reference():
    out = subprocess.run([sys.executable, os.path.join(SOURCE_DIR, "examples", "torch_npu_example.py")], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in range(16):
        assert f"rank {rank} epid {rank} tpid 0: combine output matches the reference bit for bit" in out.stdout, out.stdout
    assert out.stdout.rstrip().endswith("run npu success.")

