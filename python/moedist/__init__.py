"""moedist: torch_npu's MoE dispatch and combine operators (and their V2 pair) on CPUs.

Code written for ``torch_npu.npu_moe_distribute_dispatch`` / ``npu_moe_distribute_combine`` runs on CPUs
by changing the import: the same parameters, defaults and results, bit for bit the Ascend semantics.
Groups (``group_ep`` / ``group_tp``) are named with ``get_hccl_comm_name`` (of a moedist group or a
torch.distributed group) or created with ``new_group`` / ``new_group_from_env`` / ``new_group_from_mpi``.
A group name stands for its members, as an HCCL communicator does: a world may hold any number of groups.
A group's resources live until ``Group.close()``, the end of a ``with`` block over it, or interpreter exit.
Tensors are torch tensors on the CPU (bfloat16 or float16, contiguous or not, viewed without a copy;
bool masks too) or numpy arrays (float16; bfloat16 as uint16 bit patterns wrapped by ``moedist.bfloat16``).
In a build with the CUDA backend, both pairs also take torch CUDA tensors (``_cuda.py``, docs/cuda.md):
they run on the caller's current stream, and ``synchronize(group)`` raises what only the GPU saw.
Ints are taken as torch takes them (numpy integers, 0-d integer tensors, ``__index__``), bools refused."""
from . import _moedist
from ._errors import Error, PeerError, ValidationError
from ._groups import Group, get_hccl_comm_name, new_group, new_group_from_env, new_group_from_mpi, synchronize
from ._ops import npu_moe_distribute_combine, npu_moe_distribute_dispatch
from ._ops_v2 import npu_moe_distribute_combine_v2, npu_moe_distribute_dispatch_v2
from ._tensors import BFloat16Array, bfloat16

__version__ = _moedist.version.split(" ")[0]
version = _moedist.version       # with the transports and MPI support of this build
has_mpi = _moedist.has_mpi
has_cuda = _moedist.has_cuda     # built with the CUDA backend: the operators take torch CUDA tensors

__all__ = [
    "npu_moe_distribute_dispatch", "npu_moe_distribute_combine", "npu_moe_distribute_dispatch_v2",
    "npu_moe_distribute_combine_v2", "get_hccl_comm_name", "new_group", "new_group_from_env",
    "new_group_from_mpi", "Group", "synchronize", "bfloat16", "BFloat16Array", "Error", "ValidationError", "PeerError",
    "has_mpi", "has_cuda",
    "version", "__version__",
]
