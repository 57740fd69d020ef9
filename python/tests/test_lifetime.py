"""Group lifetime: Group.close(), ``with``, and the release of open groups at interpreter exit. After close
every call that names the group raises a ValidationError saying it is closed, and the extension's C++
group, kept by anyone, raises a moedist Error; nothing crashes, also with a call running on another
thread or a daemon thread still calling at exit."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import moedist
from moedist import _groups
from conftest import run_ranks


def call(name, bs=2):
    x = np.ones((bs, 8), np.float16)
    ids = np.array([[i % 2] for i in range(bs)], np.int32)
    return moedist.npu_moe_distribute_dispatch(x, ids, name, 1, 0, 2)


def cpp_groups_of(name):
    return [cpp for cpp, names in _groups._groups.values() if name in names]


def test_close_releases_the_cpp_group_and_later_calls_are_refused(job):
    ep, tp = moedist.new_group(job, 0, 1)
    assert not ep.closed and "closed" not in repr(ep)
    assert int(call(ep.name)[4][-1]) == 2
    [cpp] = cpp_groups_of(ep.name)
    ep.close()
    assert ep.closed and "closed" in repr(ep) and cpp.closed
    assert cpp_groups_of(ep.name) == []
    with pytest.raises(moedist.ValidationError, match="this group was closed") as e:
        call(ep.name)
    assert e.value.parameter == "group_ep" and e.value.value == repr(ep.name)
    for use in (cpp.traffic, lambda: cpp.config):  # the extension's group, kept past close
        with pytest.raises(moedist.Error, match="traffic on a closed group|config on a closed group"):
            use()
    ep.close()  # again: nothing to do
    assert not tp.closed


def test_with_closes_at_the_end_of_the_block_also_on_an_error(job):
    ep, _ = moedist.new_group(job, 0, 1)
    with ep as entered:
        assert entered is ep
        call(ep.name)
    assert ep.closed
    other, _ = moedist.new_group(job + "-b", 0, 1)
    with pytest.raises(KeyError):
        with other:
            call(other.name)
            raise KeyError("inside the block")
    assert other.closed and cpp_groups_of(other.name) == []


def test_a_name_is_its_members_so_making_the_group_again_reopens_it(job):
    ep, _ = moedist.new_group(job, 0, 1)
    same, _ = moedist.new_group(job, 0, 1)
    assert same.name == ep.name
    call(ep.name)
    same.close()
    assert ep.closed  # the same members, the same name: closed with it
    again, _ = moedist.new_group(job, 0, 1)
    assert not ep.closed and not again.closed
    assert int(call(ep.name)[4][-1]) == 2  # a new C++ group
    again.close()


def tp_pair(rank, n, job):
    ep, tp = moedist.new_group(job, rank, n, tp_world_size=2)
    x = np.ones((2, 8), np.float16)
    ids = np.array([[0], [0]], np.int32)
    moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 1, group_tp=tp.name, tp_world_size=2, tp_rank_id=rank)
    [cpp] = cpp_groups_of(ep.name)
    assert cpp_groups_of(tp.name) == [cpp]  # one C++ group serves both names
    ep.close()
    assert cpp.closed and cpp_groups_of(tp.name) == []
    assert not tp.closed  # the TP name stays open ...
    with pytest.raises(moedist.ValidationError, match="closed") as e:  # ... but its partner here is closed
        moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 1, group_tp=tp.name, tp_world_size=2, tp_rank_id=rank)
    assert e.value.parameter == "group_ep"
    return True


def test_closing_the_ep_group_of_a_tp_pair_releases_the_cpp_group_both_names_use(job):
    assert run_ranks(2, tp_pair, job) == [True, True]


def run_script(body, timeout=120):
    """Runs `body` in a fresh interpreter (a crash there is an exit status here, not a dead pytest)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, PYTHONFAULTHANDLER="1"))
    assert out.returncode == 0, f"exit status {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


PRELUDE = """
    import os, threading, numpy as np, moedist
    from moedist import _groups
    ep, _ = moedist.new_group("exit-%d" % os.getpid(), 0, 1)
    x = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float16)
    ids = np.array([[i % 8, (i + 1) % 8] for i in range(256)], np.int32)
    def call():
        return moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 8)
    """


def test_close_while_another_thread_calls_waits_for_that_call_and_never_crashes():
    out = run_script(PRELUDE + """
    call()
    [cpp] = [g for g, names in _groups._groups.values() if ep.name in names]
    results, started = [], threading.Event()
    def worker():
        started.set()
        try:
            while True:
                results.append(int(call()[4][-1]))
        except moedist.ValidationError as e:  # the name is closed
            results.append(e.parameter)
        except moedist.Error as e:  # the C++ group, taken just before close, is closed
            results.append("closed" if "on a closed group" in str(e) else repr(e))
    th = threading.Thread(target=worker)
    th.start()
    started.wait()
    while not results:
        pass
    ep.close()
    th.join(60)
    assert not th.is_alive() and cpp.closed
    assert results[-1] in ("group_ep", "closed") and set(results[:-1]) == {512}, results[-3:]
    print("closed under a running thread after", len(results) - 1, "calls")
    """)
    assert "closed under a running thread" in out


def test_open_groups_are_released_at_exit_before_handlers_registered_earlier():
    out = run_script("""
    import atexit
    seen = []
    atexit.register(lambda: print("at exit, the C++ group was closed:", seen[0].closed))
    """ + PRELUDE + """
    call()
    seen.append(next(iter(_groups._groups.values()))[0])
    """)
    assert "at exit, the C++ group was closed: True" in out


def test_exit_with_a_daemon_thread_still_calling_does_not_crash():
    out = run_script(PRELUDE + """
    call()
    def worker():
        while True:
            call()
    threading.Thread(target=worker, daemon=True).start()
    import time; time.sleep(0.5)
    print("exiting with a daemon thread in its calls")
    """)
    assert "exiting with a daemon thread" in out
