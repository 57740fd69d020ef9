"""torchair's entry points, for programs written for torch_npu's graph mode to run on CPUs.

torch_npu's graph mode compiles a module with ``torch.compile(model, backend=torchair.get_npu_backend(),
dynamic=False)``. Here ``import moedist.torchair as torchair`` gives a ``get_npu_backend()`` that returns a
CPU backend of torch.compile: inductor by default, or the one a CompilerConfig (or the environment variable
MOEDIST_TORCHAIR_BACKEND) names. The operators inside the module are moedist's registered ops
(torch.ops.moedist.*), which every backend runs as they are. Needs torch >= 2.1."""
from __future__ import annotations

import os
from typing import Mapping, Optional

from ._errors import ValidationError

# torch.compile's CPU backends this module hands out: inductor generates code, aot_eager traces through
# AOTAutograd and runs the graph eagerly, eager runs what dynamo captured as it is.
BACKENDS = ("inductor", "aot_eager", "eager")


class CompilerConfig:
    """What torchair.CompilerConfig configures on the NPU; here only which CPU backend compiles:
    ``backend`` is one of BACKENDS (default: MOEDIST_TORCHAIR_BACKEND, else inductor)."""

    def __init__(self) -> None:
        self.backend = os.environ.get("MOEDIST_TORCHAIR_BACKEND", "inductor")


def get_npu_backend(*, compiler_config: Optional[CompilerConfig] = None,
                    custom_decompositions: Optional[Mapping[object, object]] = None) -> str:
    """The torch.compile backend for a module calling moedist's operators (a backend name torch.compile
    takes). ``custom_decompositions``, torchair's hook for the NPU graph compiler, has no CPU counterpart
    and must be empty."""
    config = compiler_config if compiler_config is not None else CompilerConfig()
    if config.backend not in BACKENDS:
        raise ValidationError(f"compiler_config.backend = {config.backend!r}: must be one of {', '.join(BACKENDS)}",
                              "invalid_argument", "compiler_config.backend", repr(config.backend),
                              f"must be one of {', '.join(BACKENDS)}")
    if custom_decompositions:
        raise ValidationError("custom_decompositions: torchair's NPU graph decompositions have no CPU counterpart",
                              "unsupported", "custom_decompositions", f"{len(custom_decompositions)} entries",
                              "must be empty: the CPU backends compile moedist's operators as they are")
    return config.backend
