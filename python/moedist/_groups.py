"""Communication domains by name, as torch_npu names HCCL groups.

torch_npu's operators take ``group_ep`` / ``group_tp``, the names of HCCL communicators. moedist's
names are strings too. A name stands for a set of ranks (the EP group or the TP group of a rank) in a
moedist *world*: processes over shared memory (a job), or an MPI communicator. A group is created with
``new_group`` (explicit job, rank and size), ``new_group_from_env`` (the processes of
``moedist launch``), ``new_group_from_mpi`` (an mpi4py communicator), or named from a
torch.distributed process group with ``get_hccl_comm_name`` (as torch_npu's example does). The
operators join the C++ group the first time a name is used with a configuration, and reuse it after.
Threads of a process that use one group share that C++ group: its calls (which run without the GIL)
are serialized by a lock of the group, one call at a time, so each call's results are those of a
single-threaded run of the same calls in the order they took the lock. The calls stay collective:
every rank must make them in the same order. The first use (the join) is not locked: make it from one
thread before others share the group.
"""
import hashlib
import os
from dataclasses import dataclass, field

from . import _moedist
from ._errors import ValidationError

DEFAULT_TIMEOUT_MS = _moedist.default_timeout_ms  # moedist::WaitOptions' default (30 s), as in C++

# The kinds of world, named by the C++ transport registry (moedist._moedist.transports()).
KIND_SHM = _moedist.transport_name(_moedist.TransportId.shm)
KIND_MPI = _moedist.transport_name(_moedist.TransportId.mpi)


def _transport(name):
    """The registry's entry of a transport (a dict: id, name, description, available, why_unavailable)."""
    return next(t for t in _moedist.transports() if t["name"] == name)


@dataclass(frozen=True)
class World:
    kind: str            # KIND_SHM: processes over shared memory; KIND_MPI: an MPI communicator
    job: str             # shm: the job name every process of the world shares; mpi: an id agreed on by broadcast
    rank: int            # this process's rank in the world (= ep_rank_id * max(T, 1) + tp_rank_id)
    size: int
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    comm: object = field(default=None, compare=False, repr=False)  # mpi4py communicator (kind KIND_MPI)


@dataclass(frozen=True)
class Domain:
    world: World
    members: tuple       # world ranks of the group, in group-rank order
    role: str            # "ep", "tp" or "any" (a torch.distributed group: either)


_domains = {}            # name -> Domain
_groups = {}             # (world, configuration) -> _moedist.Group
_torch_world = None      # the World of torch.distributed's default group, once named


def _digest(*parts):
    return hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:12]


def _register(domain):
    name = f"moedist-{domain.role}-{_digest(domain.world.kind, domain.world.job, domain.role, domain.members)}"
    _domains[name] = domain
    return name


class Group:
    """A moedist communication group of this process: its ``name`` goes where torch_npu takes
    ``group_ep`` / ``group_tp``."""

    def __init__(self, domain):
        self.name = _register(domain)
        self.ranks = list(domain.members)
        self._domain = domain

    def get_hccl_comm_name(self, rank=None):
        """The group's name, as torch_npu's ProcessGroup.get_hccl_comm_name(rank) returns the HCCL name."""
        return self.name

    def __repr__(self):
        return f"moedist.Group({self.name!r}, ranks={self.ranks})"


def _check_int(name, value, low=0):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValidationError(f"{name} = {value!r}: must be an integer >= {low}", "invalid_argument", name, repr(value),
                              f"must be an integer >= {low}")


def _pair(world, tp_world_size):
    """This rank's EP group (ranks x*T + lane) and TP group (its T = max(tp_world_size, 1) neighbours)."""
    _check_int("tp_world_size", tp_world_size)
    t = max(tp_world_size, 1)
    if tp_world_size > 2 or world.size % t != 0:
        raise ValidationError(f"tp_world_size = {tp_world_size}: must be 0, 1 or 2 and divide the world size {world.size}",
                              "invalid_argument", "tp_world_size", str(tp_world_size),
                              f"must be 0, 1 or 2 and divide the world size {world.size}")
    lane, ep = world.rank % t, world.rank // t
    ep_members = tuple(x * t + lane for x in range(world.size // t))
    tp_members = tuple(ep * t + i for i in range(t))
    return Group(Domain(world, ep_members, "ep")), Group(Domain(world, tp_members, "tp"))


def new_group(job, rank, world_size, tp_world_size=0, timeout_ms=DEFAULT_TIMEOUT_MS):
    """The (EP group, TP group) of process ``rank`` of ``world_size`` processes that share the job name
    ``job`` on one host (shared memory). Every process calls it with the same job, world size and
    tp_world_size; ranks are ordered as torch_npu's example orders them (rank = ep_rank_id * T + tp_rank_id)."""
    if not isinstance(job, str) or not job:
        raise ValidationError(f"job = {job!r}: must be a non-empty string", "invalid_argument", "job", repr(job),
                              "must be a non-empty string")
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank)
    if rank >= world_size:
        raise ValidationError(f"rank = {rank}: must be < world_size = {world_size}", "invalid_argument", "rank", str(rank),
                              f"must be < world_size = {world_size}")
    return _pair(World(KIND_SHM, job, rank, world_size, timeout_ms), tp_world_size)


def new_group_from_env(tp_world_size=None, timeout_ms=DEFAULT_TIMEOUT_MS):
    """(EP group, TP group) of a process started by ``moedist launch -n N [--tp 2] -- python3 ...``
    (MOEDIST_RANK, MOEDIST_WORLD_SIZE, MOEDIST_JOB, MOEDIST_TP_WORLD_SIZE)."""
    env = _moedist.launch_environment()
    t = env["tp_world_size"] if tp_world_size is None else tp_world_size
    return _pair(World(KIND_SHM, env["job"], env["rank"], env["world_size"], timeout_ms), t)


def new_group_from_mpi(comm=None, tp_world_size=0, timeout_ms=DEFAULT_TIMEOUT_MS):
    """(EP group, TP group) over an mpi4py communicator (default MPI.COMM_WORLD): comm rank g is
    ep_rank_id = g // T, tp_rank_id = g % T. Collective over ``comm``; ranks on one node share memory,
    ranks on other nodes are reached through MPI (docs/mpi.md)."""
    if not _transport(KIND_MPI)["available"]:
        raise ValidationError("new_group_from_mpi: this moedist was built without MPI support", "unsupported", "comm",
                              "MPI", "needs a build with MPI (Debian: libopenmpi-dev)")
    from mpi4py import MPI
    comm = MPI.COMM_WORLD if comm is None else comm
    job = comm.bcast(_moedist.new_job_name() if comm.Get_rank() == 0 else None, root=0)
    return _pair(World(KIND_MPI, job, comm.Get_rank(), comm.Get_size(), timeout_ms, comm), tp_world_size)


def _torch_world_of(dist):
    global _torch_world
    if _torch_world is None:
        box = [_moedist.new_job_name() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)  # collective over the default group: every process names its groups together
        _torch_world = World(KIND_SHM, box[0], dist.get_rank(), dist.get_world_size())
    return _torch_world


def get_hccl_comm_name(group, rank=None):
    """The name to pass as group_ep / group_tp: of a moedist Group, or of a torch.distributed process
    group (its ranks then communicate over shared memory, as processes of one host; the first call is
    collective over torch.distributed's default group). ``rank`` is accepted for torch_npu parity."""
    if isinstance(group, Group):
        return group.name
    import torch.distributed as dist
    if not dist.is_initialized():
        raise ValidationError("get_hccl_comm_name: torch.distributed is not initialized (call init_process_group first)",
                              "invalid_argument", "group", repr(group), "must be a moedist Group or a torch.distributed group")
    world = _torch_world_of(dist)
    if hasattr(dist, "get_process_group_ranks"):
        members = tuple(dist.get_process_group_ranks(group))
    else:  # torch < 2.0
        ranks = dist.distributed_c10d._pg_group_ranks[group]
        members = tuple(sorted(ranks, key=lambda g: ranks[g]))
    return _register(Domain(world, members, "any"))


def _domain(name, parameter):
    if not isinstance(name, str) or not 1 <= len(name) < 128:
        raise ValidationError(f"{parameter} = {name!r}: must be a string of length [1, 128)", "invalid_argument", parameter,
                              repr(name), "must be a string of length [1, 128)")
    domain = _domains.get(name)
    if domain is None:
        raise ValidationError(
            f"{parameter} = {name!r}: is not the name of a moedist group of this process; create groups with "
            "moedist.new_group, new_group_from_env or new_group_from_mpi, or name a torch.distributed group with "
            "moedist.get_hccl_comm_name", "invalid_argument", parameter, repr(name), "must name a moedist group")
    return domain


def group_for(group_ep, group_tp, config):
    """The C++ group of this process for the named groups and configuration (joined on first use)."""
    t = config["tp_world_size"]
    ep = _domain(group_ep, "group_ep")
    if ep.role == "tp":
        raise ValidationError(f"group_ep = {group_ep!r}: names a TP group", "invalid_argument", "group_ep", group_ep,
                              "must name an EP group")
    world = ep.world
    if t == 2:
        if group_tp == group_ep:
            raise ValidationError(f"group_tp = {group_tp!r}: must differ from group_ep", "invalid_argument", "group_tp",
                                  group_tp, "must differ from group_ep")
        tp = _domain(group_tp, "group_tp")
        if tp.world != world or len(tp.members) != 2:
            raise ValidationError(f"group_tp = {group_tp!r}: must name a TP pair of group_ep's world", "invalid_argument",
                                  "group_tp", group_tp, "must name a 2-rank group of the same world as group_ep")
    w = config["ep_world_size"]
    if len(ep.members) != w:
        raise ValidationError(f"ep_world_size = {w}: must equal the size of group_ep, {len(ep.members)}", "invalid_argument",
                              "ep_world_size", str(w), f"must equal the size of group_ep, {len(ep.members)}")
    g = config["ep_rank_id"] * max(t, 1) + config["tp_rank_id"]
    if world.size != w * max(t, 1) or g != world.rank or ep.members[config["ep_rank_id"] % w] != world.rank:
        raise ValidationError(
            f"ep_rank_id = {config['ep_rank_id']}, tp_rank_id = {config['tp_rank_id']}: this process is rank {world.rank} of "
            f"a world of {world.size}, which must be ep_rank_id * max(tp_world_size, 1) + tp_rank_id of "
            f"ep_world_size * max(tp_world_size, 1) = {w * max(t, 1)} ranks", "invalid_argument", "ep_rank_id",
            str(config["ep_rank_id"]), "must place this process at its rank of group_ep's world")
    key = (world, tuple(sorted(config.items())))
    group = _groups.get(key)
    if group is None:
        if world.kind == KIND_MPI:
            from mpi4py import MPI
            group = _moedist.join_mpi(MPI._handleof(world.comm), config, world.timeout_ms)
        else:
            shared = {k: v for k, v in config.items() if k not in ("ep_rank_id", "tp_rank_id")}
            job = f"{world.job}.{_digest(sorted(shared.items()))}"
            group = _moedist.join_shm(config, job, world.timeout_ms)
        _groups[key] = group
    return group
