"""Communication domains by name, as torch_npu names HCCL groups.

torch_npu's operators take ``group_ep`` / ``group_tp``, the names of HCCL communicators. moedist's
names are strings too. A name stands for a list of members -- ranks of a moedist *world* in group-rank
order -- and, like an HCCL communicator, is its members whatever the world around them: a world may hold
any number of groups, of any member lists. A world is processes over shared memory (a job), or an MPI
communicator. A group is created with ``new_group`` (explicit job, rank and size), ``new_group_from_env``
(the processes of ``moedist launch``), ``new_group_from_mpi`` (an mpi4py communicator, MPI_COMM_WORLD or
a sub-communicator such as one of ``comm.Split``), or named from a torch.distributed process group with
``get_hccl_comm_name`` (as torch_npu's example does; the torch world is one world, over shared memory).

A call places this process at position ``ep_rank_id`` of group_ep (which has ``ep_world_size``
members) and, with tp_world_size 2, at position ``tp_rank_id`` of group_tp (two members). The C++ group
it joins holds group_ep's members and, with TP, the members of the EP group of this process's TP peer:
its rank ep_rank_id * max(T, 1) + tp_rank_id is the process at position ep_rank_id of the EP group of
TP lane tp_rank_id. Over shared memory its job name is the world's job plus a digest of those members
and of the configuration all ranks share, so that disjoint groups never meet and the same group always
meets under the same name; over MPI its members form a communicator of their own (MPI_Comm_create_group).
With TP and torch.distributed groups, a process knows its own EP and TP groups only: the first call of
a configuration exchanges the EP member lists (and ep_rank_id and the shared configuration, checked
alike) between the two TP peers with ``all_gather_object`` over group_tp's torch group. That first call
is collective anyway (it joins the C++ group); every check of this process's own arguments comes before
it, so a peer that raises a ValidationError before the exchange and exits ends it at once, while one
that stays alive leaves its TP peer waiting for the torch group's timeout.

The operators join the C++ group the first time a name is used with a configuration, and reuse it after.
Threads of a process that use one group share that C++ group: its calls (which run without the GIL)
are serialized by a lock of the group, one call at a time, so each call's results are those of a
single-threaded run of the same calls in the order they took the lock. The calls stay collective:
every rank must make them in the same order. The first use (the join) is not locked: make it from one
thread before others share the group.

A group's C++ groups (its buffers, shared memory and connections) live until ``Group.close()``, the end
of a ``with`` block over the group, or interpreter exit, whichever comes first (see ``Group.close``).
"""
from __future__ import annotations

import atexit
import hashlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Dict, Iterator, List, Mapping, NoReturn, Optional, Set, Tuple, Type

from . import _moedist
from ._errors import ValidationError
from ._integers import Integer, integer

DEFAULT_TIMEOUT_MS = _moedist.default_timeout_ms  # moedist::WaitOptions' default (30 s), as in C++
MAX_WORKER_THREADS = _moedist.max_worker_threads  # moedist::GroupOptions::kMaxWorkerThreads (256)

# The kinds of world, named by the C++ transport registry (moedist._moedist.transports()).
KIND_SHM = _moedist.transport_name(_moedist.TransportId.shm)
KIND_MPI = _moedist.transport_name(_moedist.TransportId.mpi)

# The configuration every rank of a C++ group shares (the rest, ep_rank_id and tp_rank_id, is per rank).
_PER_RANK = ("ep_rank_id", "tp_rank_id")
# The longest world job name kept readable in a C++ group's job name; the digest covers all of it.
_JOB_PREFIX = 40


def _transport(name: str) -> Dict[str, Any]:
    """The registry's entry of a transport (a dict: id, name, description, available, why_unavailable)."""
    return next(t for t in _moedist.transports() if t["name"] == name)


@dataclass(frozen=True)
class World:
    kind: str            # KIND_SHM: processes over shared memory; KIND_MPI: an MPI communicator
    job: str             # shm: the job name every process of the world shares; mpi: an id agreed on by broadcast
    rank: int            # this process's rank in the world
    size: int
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    worker_threads: int = 1  # GroupOptions::worker_threads of the C++ groups this process joins in the world
    # CudaGroupOptions::max_bs of the CUDA groups this process joins in the world (None: from the first call)
    max_bs: Optional[int] = None
    comm: Any = field(default=None, compare=False, repr=False)  # mpi4py communicator (kind KIND_MPI)


@dataclass(frozen=True)
class Domain:
    world: World
    members: Tuple[int, ...]  # world ranks of the group, in group-rank order
    role: str            # "ep", "tp" or "any" (a torch.distributed group: either)
    # Groups of new_group*: the EP member lists of every TP lane of the world, from which the EP group of
    # a TP peer is known without asking it.
    lanes: Tuple[Tuple[int, ...], ...] = ()
    # A torch.distributed group: the TP peers' exchange goes over it (an object, neither compared nor hashed).
    torch_group: Any = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        """The name of the group: its members in its world (two groups of the same members share it)."""
        return f"moedist-{self.role}-{_digest(self.world.kind, self.world.job, self.role, self.members)}"


# (world, EP members, TP members, configuration, CUDA device: None for the CPU group)
_GroupKey = Tuple[World, Tuple[int, ...], Tuple[int, ...], Tuple[Tuple[str, int], ...], Optional[int]]

_domains: Dict[str, Domain] = {}   # name -> Domain
_closed: Set[str] = set()          # names closed by Group.close() (until a group of that name is made again)
# (world, EP members, TP members, configuration) -> the C++ group, and the names (group_ep, group_tp)
# whose calls use it, in the order the groups were joined.
_groups: Dict[_GroupKey, Tuple[Any, Tuple[str, ...]]] = {}  # _moedist.Group, or _moedist.CudaGroup (_cuda.py)
# The configuration's keys, in the order of _resolved's keys.
CONFIG_KEYS = ("ep_world_size", "ep_rank_id", "moe_expert_num", "tp_world_size", "tp_rank_id", "expert_shard_type",
               "shared_expert_num", "shared_expert_rank_num", "global_bs")
# (group_ep, group_tp, configuration values in CONFIG_KEYS' order) of a call already resolved -> its C++
# group: later calls skip the checks and lookups (emptied by close()). The extension's fast path looks
# calls up in this very dict (set_resolved_calls below): it is emptied, never rebound.
_resolved: Dict[Tuple[object, object, Tuple[int, ...]], _moedist.Group] = {}
_moedist.set_resolved_calls(_resolved)
_lock = threading.Lock()           # guards _domains, _closed and _groups against Group.close() on another thread
_torch_world: Optional[Tuple[Any, World]] = None  # (torch.distributed's default group, its World), once named


def _digest(*parts: object) -> str:
    return hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:16]


def _refuse(parameter: str, value: object, rule: str, code: str = "invalid_argument") -> NoReturn:
    raise ValidationError(f"{parameter} = {value}: {rule}", code, parameter, str(value), rule)


def _register(domain: Domain) -> str:
    with _lock:
        # A name stands for its members and is shared by every Group of them: while it is open, its
        # per-process settings stay those it was opened with, and asking for others is refused rather
        # than ignored (the C++ groups already joined under the name keep theirs).
        open_domain = None if domain.name in _closed else _domains.get(domain.name)
        if open_domain is not None:
            for setting in ("timeout_ms", "worker_threads", "max_bs"):
                held, asked = getattr(open_domain.world, setting), getattr(domain.world, setting)
                if held != asked:
                    _refuse(setting, asked, f"group {domain.name} of these members is open with {setting} = "
                            f"{held}; close it first to open it with another value", "config_mismatch")
        _domains[domain.name] = domain
        _closed.discard(domain.name)
    return domain.name


class Group:
    """A moedist communication group of this process: its ``name`` goes where torch_npu takes
    ``group_ep`` / ``group_tp``.

    A group holds C++ groups (buffers, shared memory, connections: joined by the first call of each
    configuration) until it is closed: by ``close()``, at the end of a ``with`` block over it, or at
    interpreter exit. ``with`` returns the group itself::

        ep, tp = moedist.new_group(job, rank, world_size, tp_world_size=2)
        with ep, tp:
            moedist.npu_moe_distribute_dispatch(x, ids, ep.name, ..., group_tp=tp.name, ...)
    """

    name: str
    ranks: List[int]

    def __init__(self, domain: Domain) -> None:
        self.name = _register(domain)
        self.ranks = list(domain.members)
        self._domain = domain

    def get_hccl_comm_name(self, rank: Optional[Integer] = None) -> str:
        """The group's name, as torch_npu's ProcessGroup.get_hccl_comm_name(rank) returns the HCCL name."""
        if rank is not None:
            integer("rank", rank, 0)
        return self.name

    @property
    def closed(self) -> bool:
        """Whether the group's name is closed (by this object or another one of the same name)."""
        with _lock:
            return self.name in _closed

    def close(self) -> None:
        """Releases the C++ groups this group's calls use, and closes its name: a later call that passes
        it as group_ep or group_tp raises a ValidationError saying that it is closed.

        Close is local to this process; close a group on every rank, after the last collective call on it
        (a peer still in a call that needs this rank gets a PeerError when its wait times out). A C++ group
        joined through an EP group and a TP group together (tp_world_size = 2) serves both names: closing
        either one releases it, so close the pair together (``with ep, tp:``). The other name stays open:
        calls that pair it with a group that is still open join a new C++ group. A name stands for its
        members, so every Group of the same members in the same world (``new_group`` called twice with
        the same arguments) shares it and is closed with it; creating the group again reopens the name.
        A call running on another thread finishes before its C++ group is released; a call that starts
        after close raises. Closing a closed group does nothing."""
        with _lock:
            _closed.add(self.name)
            _resolved.clear()
            _resolved_cuda.clear()
            doomed = [key for key, (_, names) in _groups.items() if self.name in names]
            released = [_groups.pop(key)[0] for key in doomed]
        for cpp in reversed(released):
            cpp.close(wait=True)

    def __enter__(self) -> Group:
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], error: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"moedist.Group({self.name!r}, ranks={self.ranks}{', closed' if self.closed else ''})"


def _release_at_exit() -> None:
    """Releases every C++ group still open, the last joined first, while the interpreter (and mpi4py's MPI)
    is whole. A group that a (daemon) thread is still using is left to that call and the process's exit:
    nothing is destroyed under a running call."""
    with _lock:
        released = [cpp for cpp, _ in _groups.values()]
        _groups.clear()
        _resolved.clear()
        _resolved_cuda.clear()
    for cpp in reversed(released):
        cpp.close(wait=False)


def _pair(world: World, tp_world_size: Integer) -> Tuple[Group, Group]:
    """This rank's EP group (ranks x*T + lane) and TP group (its T = max(tp_world_size, 1) neighbours)."""
    tp_world_size = integer("tp_world_size", tp_world_size, 0)
    t = max(tp_world_size, 1)
    if tp_world_size > 2 or world.size % t != 0:
        _refuse("tp_world_size", tp_world_size, f"must be 0, 1 or 2 and divide the world size {world.size}")
    lanes = tuple(tuple(x * t + lane for x in range(world.size // t)) for lane in range(t))
    lane, ep = world.rank % t, world.rank // t
    tp_members = tuple(ep * t + i for i in range(t))
    return Group(Domain(world, lanes[lane], "ep", lanes)), Group(Domain(world, tp_members, "tp", lanes))


def new_group(job: str, rank: Integer, world_size: Integer, tp_world_size: Integer = 0,
              timeout_ms: Integer = DEFAULT_TIMEOUT_MS, worker_threads: Integer = 1,
              max_bs: Optional[Integer] = None) -> Tuple[Group, Group]:
    """The (EP group, TP group) of process ``rank`` of ``world_size`` processes that share the job name
    ``job`` on one host (shared memory). Every process calls it with the same job, world size and
    tp_world_size; ranks are ordered as torch_npu's example orders them (rank = ep_rank_id * T + tp_rank_id).

    ``worker_threads`` (1 to 256) is the number of threads this process's calls on the groups use for
    their row work (C++ ``GroupOptions::worker_threads``): the calling thread plus worker_threads - 1
    threads each C++ group starts. Results are bit-identical for every value; processes may differ in it.

    ``max_bs`` is the most tokens this process passes in one call on CUDA tensors (the CUDA group's
    buffers are sized for it, C++ ``CudaGroupOptions::max_bs``); None: global_bs / ep_world_size when the
    call's global_bs is not 0, else the BS of the first call on CUDA tensors. CPU calls ignore it."""
    if not isinstance(job, str) or not job:
        _refuse("job", repr(job), "must be a non-empty string")
    world_size = integer("world_size", world_size, 1)
    rank = integer("rank", rank, 0)
    if rank >= world_size:
        _refuse("rank", rank, f"must be < world_size = {world_size}")
    world = World(KIND_SHM, job, rank, world_size, _timeout(timeout_ms), _worker_threads(worker_threads),
                  _max_bs(max_bs))
    return _pair(world, tp_world_size)


def _timeout(timeout_ms: Integer) -> int:
    return integer("timeout_ms", timeout_ms, 1, 2**62)


def _worker_threads(worker_threads: Integer) -> int:
    return integer("worker_threads", worker_threads, 1, MAX_WORKER_THREADS)


def _max_bs(max_bs: Optional[Integer]) -> Optional[int]:
    return None if max_bs is None else integer("max_bs", max_bs, 1, 2**30)


def new_group_from_env(tp_world_size: Optional[Integer] = None, timeout_ms: Integer = DEFAULT_TIMEOUT_MS,
                       worker_threads: Integer = 1, max_bs: Optional[Integer] = None) -> Tuple[Group, Group]:
    """(EP group, TP group) of a process started by ``moedist launch -n N [--tp 2] -- python3 ...``
    (MOEDIST_RANK, MOEDIST_WORLD_SIZE, MOEDIST_JOB, MOEDIST_TP_WORLD_SIZE). ``worker_threads``,
    ``max_bs``: as ``new_group``'s."""
    timeout_ms, worker_threads, cuda_max_bs = _timeout(timeout_ms), _worker_threads(worker_threads), _max_bs(max_bs)
    env = _moedist.launch_environment()
    t = env["tp_world_size"] if tp_world_size is None else tp_world_size
    return _pair(World(KIND_SHM, env["job"], env["rank"], env["world_size"], timeout_ms, worker_threads, cuda_max_bs), t)


def new_group_from_mpi(comm: Any = None, tp_world_size: Integer = 0, timeout_ms: Integer = DEFAULT_TIMEOUT_MS,
                       worker_threads: Integer = 1, max_bs: Optional[Integer] = None) -> Tuple[Group, Group]:
    """(EP group, TP group) over an mpi4py communicator (default MPI.COMM_WORLD; any sub-communicator,
    e.g. of ``comm.Split``, is a world of its own): comm rank g is ep_rank_id = g // T, tp_rank_id = g % T.
    Collective over ``comm``; ranks on one node share memory, ranks on other nodes are reached through
    MPI (docs/mpi.md). ``worker_threads``: as ``new_group``'s (C++ ``MpiOptions::group``); ``max_bs``: as
    ``new_group``'s (a CUDA group's ranks must share one host)."""
    if not _transport(KIND_MPI)["available"]:
        _refuse("comm", "MPI", "needs a build with MPI (Debian: libopenmpi-dev)", "unsupported")
    # Checked before the communicator is touched: a bad value raises here, not inside a collective.
    timeout_ms, worker_threads, cuda_max_bs = _timeout(timeout_ms), _worker_threads(worker_threads), _max_bs(max_bs)
    from mpi4py import MPI
    comm = MPI.COMM_WORLD if comm is None else comm
    if not isinstance(comm, MPI.Comm) or comm == MPI.COMM_NULL:
        _refuse("comm", repr(comm), "must be an mpi4py communicator this process belongs to")
    job = comm.bcast(_moedist.new_job_name() if comm.Get_rank() == 0 else None, root=0)
    world = World(KIND_MPI, job, comm.Get_rank(), comm.Get_size(), timeout_ms, worker_threads, cuda_max_bs, comm)
    return _pair(world, tp_world_size)


def _torch_world_of(dist: Any) -> World:
    """The World of torch.distributed's default group (named once per default group, by a broadcast
    over it: every process names its groups together, as torch_npu's example does)."""
    global _torch_world
    default = dist.group.WORLD
    if _torch_world is None or _torch_world[0] is not default:
        box: List[Any] = [_moedist.new_job_name() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        _torch_world = (default, World(KIND_SHM, box[0], dist.get_rank(), dist.get_world_size()))
    return _torch_world[1]


def _torch_members(dist: Any, group: Any) -> Tuple[int, ...]:
    """World ranks of a torch.distributed group, in group-rank order."""
    if group is None or group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        return ()
    if hasattr(dist, "get_process_group_ranks"):
        return tuple(dist.get_process_group_ranks(group))
    ranks = dist.distributed_c10d._pg_group_ranks.get(group)  # torch < 2.0
    if ranks is None:
        _refuse("group", repr(group), "must be a moedist Group or a torch.distributed process group")
    return tuple(sorted(ranks, key=lambda g: ranks[g]))


def get_hccl_comm_name(group: Any, rank: Optional[Integer] = None) -> str:
    """The name to pass as group_ep / group_tp: of a moedist Group, or of a torch.distributed process
    group this process belongs to (its ranks then communicate over shared memory, as processes of one
    host; the first call is collective over torch.distributed's default group). The name stands for the
    group's members: two groups of the same ranks have the same name. ``rank`` is accepted for torch_npu
    parity."""
    if isinstance(group, Group):
        return group.get_hccl_comm_name(rank)
    if rank is not None:
        integer("rank", rank, 0)
    import torch.distributed as dist
    if not dist.is_initialized():
        _refuse("group", repr(group), "torch.distributed is not initialized (call init_process_group first); "
                "must be a moedist Group or a torch.distributed group")
    world = _torch_world_of(dist)
    members = _torch_members(dist, group)
    if world.rank not in members:
        _refuse("group", repr(group), f"this process (rank {world.rank} of torch.distributed) is not a member of the group")
    return _register(Domain(world, members, "any", torch_group=dist.group.WORLD if group is None else group))


def _domain(name: object, parameter: str) -> Domain:
    if not isinstance(name, str) or not 1 <= len(name) < 128:
        _refuse(parameter, repr(name), "must be a string of length [1, 128)")
    with _lock:
        domain, closed = _domains.get(name), name in _closed
    if closed:
        _refuse(parameter, repr(name), "must name an open group: this group was closed (Group.close(), the end of a "
                "with block over it); create it again to use it")
    if domain is None:
        raise ValidationError(
            f"{parameter} = {name!r}: is not the name of a moedist group of this process; create groups with "
            "moedist.new_group, new_group_from_env or new_group_from_mpi, or name a torch.distributed group with "
            "moedist.get_hccl_comm_name", "invalid_argument", parameter, repr(name), "must name a moedist group")
    return domain


def _check_position(parameter: str, position: int, domain: Domain, group_parameter: str, world: World) -> None:
    """This process must be the member at `position` of the group."""
    if domain.members[position] != world.rank:
        where = (f"at position {domain.members.index(world.rank)}" if world.rank in domain.members else "not a member")
        _refuse(parameter, position, f"must be this process's position in {group_parameter} (world ranks "
                f"{list(domain.members)}): this process is world rank {world.rank}, {where}")


def _peer_lane(ep: Domain, tp: Domain, config: Mapping[str, int]) -> Tuple[int, ...]:
    """The EP members of the TP peer's lane (TP peers share ep_rank_id): from the lanes of a
    new_group* partition, or asked of the peer over group_tp's torch group."""
    e, t = config["ep_rank_id"], config["tp_rank_id"]
    peer = tp.members[1 - t]
    if tp.torch_group is None:
        if len(ep.lanes) != 2 or tp.lanes != ep.lanes:
            _refuse("group_tp", repr(tp.name), "must be the TP group of the same moedist.new_group* call as "
                    "group_ep (made with tp_world_size = 2), or a torch.distributed group")
        return next(lane for lane in ep.lanes if peer in lane)
    import torch.distributed as dist
    shared = sorted((k, v) for k, v in config.items() if k not in _PER_RANK)
    mine = (e, ep.members, shared)
    both: List[Any] = [None, None]
    dist.all_gather_object(both, mine, group=tp.torch_group)  # in group_tp's order: tp_rank_id
    peer_e, peer_members, peer_shared = both[1 - t]
    if peer_e != e:
        _refuse("ep_rank_id", e, f"must equal the TP peer's (world rank {peer}), which calls with ep_rank_id = {peer_e}")
    if peer_shared != shared:
        diff = next(f"{k} = {v} here, {dict(peer_shared).get(k)} there" for k, v in shared if dict(peer_shared).get(k) != v)
        _refuse("group_tp", repr(tp.name), f"the TP peer (world rank {peer}) must call with the same configuration: {diff}")
    return tuple(peer_members)


def _cpp_members(ep: Domain, tp: Optional[Domain], config: Mapping[str, int]) -> Tuple[int, ...]:
    """World ranks of the C++ group, in C++ rank order (ep_rank_id * max(T, 1) + tp_rank_id)."""
    if config["tp_world_size"] != 2 or tp is None:
        return ep.members
    t = config["tp_rank_id"]
    lanes = {t: ep.members, 1 - t: _peer_lane(ep, tp, config)}
    w = config["ep_world_size"]
    if len(lanes[1 - t]) != w:
        _refuse("group_tp", repr(tp.name), f"the TP peer's EP group must have ep_world_size = {w} members, not "
                f"{len(lanes[1 - t])}")
    members = tuple(lanes[lane][x] for x in range(w) for lane in (0, 1))
    if len(set(members)) != 2 * w:
        _refuse("group_tp", repr(tp.name), f"the EP groups of the two TP lanes must be disjoint: {list(lanes[0])} "
                f"and {list(lanes[1])}")
    if members[2 * config["ep_rank_id"] + 1 - t] != tp.members[1 - t]:
        _refuse("group_tp", repr(tp.name), "the TP peer must be at position ep_rank_id of its own EP group")
    if ep.torch_group is not None:
        _agree_over_ep(ep, tp, t, members)
    return members


def _agree_over_ep(ep: Domain, tp: Domain, t: int, members: Tuple[int, ...]) -> None:
    """Every member of a torch group_ep must be in the same TP lane and have found the same C++ group; a
    layout that breaks this (TP pairs that cross EP groups) would leave the join waiting for ranks that
    meet elsewhere. Every member sees the same gathered list, so every member raises alike."""
    import torch.distributed as dist
    views: List[Any] = [None] * len(ep.members)
    dist.all_gather_object(views, (t, members), group=ep.torch_group)
    lanes = sorted({lane for lane, _ in views})
    if len(lanes) != 1:
        _refuse("tp_rank_id", t, f"must be the same on every member of group_ep (world ranks {list(ep.members)}), whose "
                f"tp_rank_ids are {[lane for lane, _ in views]}: an EP group is one TP lane")
    if any(found != members for _, found in views):
        _refuse("group_tp", repr(tp.name), "the TP groups of group_ep's members must pair it with one "
                f"other EP group; they pair it with {sorted({tuple(found[1 - t::2]) for _, found in views})}")


def group_for(group_ep: object, group_tp: object, config: Dict[str, int]) -> _moedist.Group:
    """The C++ group of this process for the named groups and configuration (joined on first use). A
    call's names and configuration, once resolved, are looked up directly (_resolved) until a close()."""
    call = (group_ep, group_tp, tuple(config[key] for key in CONFIG_KEYS))
    group = _resolved.get(call)
    if group is not None:
        return group
    group = _resolve(group_ep, group_tp, config)
    with _lock:
        if not _closed.intersection((group_ep, group_tp)):
            _resolved[call] = group
    return group


@dataclass(frozen=True)
class _Placement:
    """Where a call's C++ group is: its world, its key in _groups, its EP and TP domains and the names its
    calls use."""
    world: World
    key: _GroupKey
    ep: Domain
    tp: Optional[Domain]
    names: Tuple[object, ...]


def _placement(group_ep: object, group_tp: object, config: Dict[str, int], device: Optional[int]) -> _Placement:
    """The placement of the C++ group (of CUDA device `device`, or the CPU group) of a call's names and
    configuration; every mistake in them named. Local: no collective runs here (the members of a torch
    group with TP are found by one, _cpp_members, only for a group not yet joined)."""
    t = config["tp_world_size"]
    ep = _domain(group_ep, "group_ep")
    if ep.role == "tp":
        _refuse("group_ep", repr(group_ep), "must name an EP group, not a TP group")
    tp: Optional[Domain] = None
    if t == 2:
        if group_tp == group_ep:
            _refuse("group_tp", repr(group_tp), "must differ from group_ep")
        tp = _domain(group_tp, "group_tp")
        if tp.role == "ep":
            _refuse("group_tp", repr(group_tp), "must name a TP group, not an EP group")
        if tp.world != ep.world:
            _refuse("group_tp", repr(group_tp), "must name a group of the same world as group_ep")
    _moedist.validate_config(config)
    world = ep.world
    w = config["ep_world_size"]
    if len(ep.members) != w:
        _refuse("ep_world_size", w, f"must equal the size of group_ep, {len(ep.members)}")
    _check_position("ep_rank_id", config["ep_rank_id"], ep, "group_ep", world)
    if tp is not None:
        if len(tp.members) != 2:
            _refuse("group_tp", repr(group_tp), f"must name a group of 2 ranks with tp_world_size = 2, not {len(tp.members)}")
        _check_position("tp_rank_id", config["tp_rank_id"], tp, "group_tp", world)
    key = (world, ep.members, tp.members if tp is not None else (), tuple(sorted(config.items())), device)
    names = (group_ep, group_tp) if t == 2 else (group_ep,)
    return _Placement(world, key, ep, tp, names)


def _keep(key: _GroupKey, group: Any, names: Tuple[object, ...], group_ep: object) -> None:
    """Files a joined C++ group under its key, unless one of its names was closed during the join (then
    the group is released and the closed name raises)."""
    with _lock:
        closed = _closed.intersection(names)
        if not closed:
            _groups[key] = (group, tuple(str(n) for n in names))
    if closed:  # closed by another thread during the join
        group.close(wait=True)
        _domain(next(iter(closed)), "group_ep" if group_ep in closed else "group_tp")
    # Released at exit before every atexit handler registered earlier (the last registered runs first),
    # e.g. of a module imported for the join, while what the groups use is still whole. (mpi4py finalizes
    # MPI later still, in Py_AtExit, after the interpreter's finalization.)
    atexit.unregister(_release_at_exit)
    atexit.register(_release_at_exit)


def _job_of(world: World, members: Tuple[int, ...], config: Dict[str, int], kind: str = "") -> str:
    """The job name of a C++ group over shared memory: the same on every member, distinct for other
    members, configurations or kinds of group."""
    shared = sorted((k, v) for k, v in config.items() if k not in _PER_RANK)
    digest = _digest(world.job, members, shared, kind) if kind else _digest(world.job, members, shared)
    return f"{world.job[:_JOB_PREFIX]}.{kind + '.' if kind else ''}{digest}"


def _resolve(group_ep: object, group_tp: object, config: Dict[str, int]) -> _moedist.Group:
    at = _placement(group_ep, group_tp, config, None)
    with _lock:
        entry = _groups.get(at.key)
    if entry is not None:
        group: _moedist.Group = entry[0]
        return group
    members = _cpp_members(at.ep, at.tp, config)
    world = at.world
    if world.kind == KIND_MPI:
        group = _join_mpi(world, members, config)
    else:
        group = _moedist.join_shm(config, _job_of(world, members, config), world.timeout_ms, world.worker_threads)
    _keep(at.key, group, at.names, group_ep)
    return group


# (group_ep, group_tp, configuration values, device) of a call on CUDA tensors already resolved -> its
# CUDA group (emptied by close(), with _resolved).
_resolved_cuda: Dict[Tuple[object, object, Tuple[int, ...], int], Any] = {}


def cuda_group_for(group_ep: object, group_tp: object, config: Dict[str, int], device: int, bs: int, k: int,
                   h: int) -> Any:
    """The CUDA group (_moedist.CudaGroup) of this process for the named groups, the configuration and
    CUDA device `device`, joined on first use for the call's shape (K, H; BS unless max_bs or global_bs
    says more: _cuda.py)."""
    call = (group_ep, group_tp, tuple(config[key] for key in CONFIG_KEYS), device)
    group = _resolved_cuda.get(call)
    if group is not None:
        return group
    if not _moedist.has_cuda:
        _refuse("x.device", f"cuda:{device}", "needs moedist built with the CUDA backend (a CUDA compiler at build "
                "time: docs/cuda.md)", "unsupported")
    at = _placement(group_ep, group_tp, config, device)
    with _lock:
        entry = _groups.get(at.key)
        # A CUDA group of these members and configuration on another device: its bootstrap (the job name,
        # the same on every rank whatever its device) is in use.
        other = next((key[4] for key in _groups if key[:4] == at.key[:4] and key[4] not in (None, device)), None)
    if entry is not None:
        group = entry[0]
    else:
        if other is not None:
            _refuse("x.device", f"cuda:{device}", f"must be cuda:{other}, where this process's CUDA group of "
                    f"{group_ep} and this configuration is (one device per rank; close the group to move it)")
        members = _cpp_members(at.ep, at.tp, config)
        world = at.world
        if world.kind == KIND_MPI:
            _require_one_host(world, members)
        w, global_bs = config["ep_world_size"], config["global_bs"]
        max_bs = world.max_bs if world.max_bs is not None else (global_bs // w if global_bs else max(bs, 1))
        group = _moedist.CudaGroup.join(config, _job_of(world, members, config, "cuda"), device, max_bs, k, h,
                                        world.timeout_ms)
        _keep(at.key, group, at.names, group_ep)
    with _lock:
        if not _closed.intersection((group_ep, group_tp)):
            _resolved_cuda[call] = group
    return group


def _require_one_host(world: World, members: Tuple[int, ...]) -> None:
    """A CUDA group's ranks reach each other through CUDA IPC: its members in an MPI world must be on one
    node. Collective over the members only (as the join is): a communicator of theirs, as _join_mpi makes."""
    from mpi4py import MPI
    with _members_comm(world, members) as comm:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        spread = node.Get_size() != comm.Get_size()
        node.Free()
    if spread:
        _refuse("group_ep", "ranks on several nodes", "the ranks of a CUDA group must be processes of one host (CUDA "
                "IPC); groups across hosts take CPU tensors", "unsupported")


def synchronize(group: Any, stream: Optional[int] = None) -> None:
    """Waits for this process's calls on CUDA tensors of the group (a Group or a group's name) and raises
    the first error the GPU recorded for them (ValidationError, PeerError). ``stream``: the stream to wait
    for, as an int (torch's ``cuda_stream``); default the stream of each CUDA group's latest call. Does
    nothing for a group that made no call on CUDA tensors."""
    name = group.name if isinstance(group, Group) else group
    _domain(name, "group")
    with _lock:
        cuda_groups = [cpp for key, (cpp, names) in _groups.items() if key[4] is not None and name in names]
    for cpp in cuda_groups:
        cpp.synchronize(stream)


@contextmanager
def _members_comm(world: World, members: Tuple[int, ...]) -> Iterator[Any]:
    """The world's communicator when the group is all of it, else one of the members alone
    (MPI_Comm_create_group: collective over the members only, as the join is), freed afterwards."""
    if members == tuple(range(world.size)):
        yield world.comm
        return
    everyone = world.comm.Get_group()
    chosen = everyone.Incl(list(members))
    comm = world.comm.Create_group(chosen)
    try:
        yield comm
    finally:
        comm.Free()
        chosen.Free()
        everyone.Free()


def _join_mpi(world: World, members: Tuple[int, ...], config: Dict[str, int]) -> _moedist.Group:
    """Joins over a communicator of the members (_members_comm; join_mpi works on a duplicate of its own)."""
    from mpi4py import MPI
    with _members_comm(world, members) as comm:
        return _moedist.join_mpi(MPI._handleof(comm), config, world.timeout_ms, world.worker_threads)
