"""moedist's exceptions: every error the C++ library raises arrives as one of these, with its message."""


class Error(RuntimeError):
    """A moedist error. ``code`` is the ErrorCode's name ("invalid_argument", "timeout", "peer_lost", ...)."""

    code: str

    def __init__(self, message: str, code: str = "internal") -> None:
        super().__init__(message)
        self.code = code


class ValidationError(Error, ValueError):
    """An argument breaks a rule: ``parameter`` is the torch_npu parameter name, ``value`` the offending
    value as text, ``rule`` the rule in words. Raised before anything is written."""

    parameter: str
    value: str
    rule: str

    def __init__(self, message: str, code: str = "invalid_argument", parameter: str = "", value: str = "",
                 rule: str = "") -> None:
        super().__init__(message, code)
        self.parameter = parameter
        self.value = value
        self.rule = rule


class PeerError(Error):
    """A collective step could not complete: ``peer`` is the rank at fault, ``phase`` the step."""

    peer: int
    phase: str

    def __init__(self, message: str, code: str = "peer_failed", peer: int = -1, phase: str = "") -> None:
        super().__init__(message, code)
        self.peer = peer
        self.phase = phase
