"""worker_threads of new_group / new_group_from_env / new_group_from_mpi (C++ GroupOptions::worker_threads):
a bad value is a ValidationError naming it, before anything is joined; the C++ group gets the value asked
for; and its results are the oracle's and the 1-thread run's, bit for bit."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import moedist
from moedist import _groups
from cases import check_rank, random_case
from conftest import run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))

# Rows of 4 KiB (bf16) or more, so that the default 16 KiB chunk leaves several chunks per row loop: with
# the random cases' narrow rows every loop would stay on the calling thread.
WIDE = dict(h=2048, max_bs=16)


@pytest.mark.parametrize("bad", [0, -1, 257, 2**40])
def test_out_of_range_is_refused_naming_worker_threads(job, bad):
    before = dict(_groups._domains)
    with pytest.raises(moedist.ValidationError) as info:
        moedist.new_group(job, 0, 1, worker_threads=bad)
    e = info.value
    assert (e.parameter, e.value, e.code) == ("worker_threads", repr(bad), "invalid_argument"), str(e)
    assert "[1, 256]" in e.rule and "[1, 256]" in str(e), str(e)
    assert _groups._domains == before  # no group was named, let alone joined


@pytest.mark.parametrize("bad", [True, 2.0, "2", None])
def test_a_non_integer_is_refused_naming_worker_threads(job, bad):
    with pytest.raises(moedist.ValidationError) as info:
        moedist.new_group(job, 0, 1, worker_threads=bad)
    assert (info.value.parameter, info.value.value) == ("worker_threads", repr(bad)), str(info.value)
    assert "integer" in info.value.rule, str(info.value)


def test_new_group_from_env_checks_worker_threads_first(monkeypatch):
    # No launcher environment: the launcher's own error would come first if the check came after it.
    for name in ("MOEDIST_RANK", "MOEDIST_WORLD_SIZE", "MOEDIST_JOB", "MOEDIST_TP_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(moedist.ValidationError) as info:
        moedist.new_group_from_env(worker_threads=0)
    assert info.value.parameter == "worker_threads" and "[1, 256]" in info.value.rule, str(info.value)


def test_new_group_from_mpi_checks_worker_threads_before_the_communicator():
    # Raised before mpi4py is imported (MPI is not initialized in this process); without MPI the build's
    # refusal names comm instead.
    with pytest.raises(moedist.ValidationError) as info:
        moedist.new_group_from_mpi(worker_threads=257)
    if moedist.has_mpi:
        assert info.value.parameter == "worker_threads" and "[1, 256]" in info.value.rule, str(info.value)
    else:
        assert info.value.parameter == "comm", str(info.value)


def cpp_group_of(ep):
    """The C++ group the calls through ep's name joined (exactly one here)."""
    found = [cpp for cpp, names in _groups._groups.values() if ep.name in names]
    assert len(found) == 1, found
    return found[0]


def each_thread_count(g, n, case, job):
    """Rank g runs the case on groups of 1, 2 and 3 worker threads (check_rank compares each with the
    oracle); returns the outputs of each run."""
    runs = {}
    for threads in (1, 2, 3):
        ep, tp = moedist.new_group(f"{job}-{threads}", g, n, tp_world_size=case["tp_world_size"],
                                   worker_threads=np.int64(threads))
        outputs = []
        check_rank(g, n, case, "torch", g % 2 == 1, groups=(ep, tp), outputs=outputs)
        assert cpp_group_of(ep).worker_threads == threads
        ep.close()
        tp.close()
        runs[threads] = outputs
    return runs


# Seeds whose ranks all have 16 tokens; between them: comm quantization, shared-expert ranks, quant_mode 2
# with and without TP, K = 2, both dtypes.
@pytest.mark.parametrize("tp, seed", [(0, 2), (0, 18), (2, 6), (2, 4)])
def test_results_are_the_same_for_every_thread_count(job, seed, tp):
    case = random_case(seed, ep_world_size=2, tp=tp, **WIDE)
    n = 2 * max(tp, 1)
    for g, runs in enumerate(run_ranks(n, each_thread_count, case, job)):
        assert len(runs[1]) == 8  # dispatch's seven results and combine's
        for threads in (2, 3):
            for i, (one, many) in enumerate(zip(runs[1], runs[threads])):
                assert one.dtype == many.dtype and np.array_equal(one, many), \
                    f"rank {g}, output {i}: {threads} worker threads differ from 1"


@pytest.mark.skipif(not moedist.has_mpi, reason="moedist was built without MPI")
def test_new_group_from_mpi_with_worker_threads():
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun is not in PATH"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    # Two virtual hosts: rows between them go through the node-aware proxies.
    out = subprocess.run([mpirun, "--oversubscribe", "-np", "4", "-x", "MOEDIST_RANKS_PER_NODE=2", "-x", "PYTHONPATH",
                          sys.executable, os.path.join(HERE, "rank_script.py"), "mpi-threads", "3"],
                         capture_output=True, text=True, timeout=300, env=env, start_new_session=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for g in range(4):
        assert f"rank {g}: 2 cases with 3 worker threads match the oracle" in out.stdout, out.stdout


def test_an_open_group_refuses_other_settings_instead_of_ignoring_them(job):
    # A name stands for its members: a second new_group of the same members while the first is open would
    # otherwise get the C++ group joined with the first one's settings.
    ep, tp = moedist.new_group(job, 0, 1, worker_threads=2)
    with ep, tp:
        again, again_tp = moedist.new_group(job, 0, 1, worker_threads=2)  # the same settings: the same group
        assert again.name == ep.name
        for setting, value in (("worker_threads", 3), ("timeout_ms", 1234)):
            with pytest.raises(moedist.ValidationError) as info:
                moedist.new_group(job, 0, 1, **{setting: value})
            e = info.value
            assert (e.parameter, e.value, e.code) == (setting, "1234" if setting == "timeout_ms" else "3",
                                                      "config_mismatch"), str(e)
            assert "close it first" in e.rule, str(e)
    # Closed: the name opens again with the new value.
    ep3, tp3 = moedist.new_group(job, 0, 1, worker_threads=3)
    with ep3, tp3:
        assert ep3.name == ep.name
