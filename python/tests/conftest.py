"""Helpers of the Python package's tests: ranks as forked processes, job names, where the tree is."""
import multiprocessing
import os
import traceback
import uuid

import pytest

SOURCE_DIR = os.environ.get("MOEDIST_SOURCE_DIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BUILD_DIR = os.environ.get("MOEDIST_BUILD_DIR", os.path.join(SOURCE_DIR, "build", "release"))


def new_job():
    return f"pytest-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def run_ranks(n, target, *args, timeout=180):
    """Runs target(rank, n, *args) in n forked processes; returns the results in rank order. A rank that
    raises or dies fails the test with its traceback."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def main(rank):
        try:
            queue.put((rank, True, target(rank, n, *args)))
        except BaseException:  # noqa: B036 - the parent reports it
            queue.put((rank, False, traceback.format_exc()))

    procs = [ctx.Process(target=main, args=(r,)) for r in range(n)]
    for p in procs:
        p.start()
    results, failures = {}, []
    try:
        for _ in range(n):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if failures:
        pytest.fail("\n".join(failures))
    return [results[r] for r in range(n)]


@pytest.fixture
def job():
    return new_job()


def _torch_registers_ops():
    from moedist import _ops
    return _ops._registered_ops is not None


# The registered operators exist from torch 2.1 on. Under torch 1.13 their tests are not collected
# rather than skipped (a skip fails ctest's python.pytest, where only a build without MPI may skip);
# scripts/python_torch2.sh runs them under torch 2.13.
collect_ignore = [] if _torch_registers_ops() else ["test_custom_ops.py", "test_custom_ops_v2.py"]


def pytest_report_header(config):
    if collect_ignore:
        import torch
        return f"moedist: test_custom_ops.py and test_custom_ops_v2.py not collected: torch {torch.__version__} has no custom ops (the torch 2 suite runs it)"
    return None
