"""moedist's exceptions: every error the C++ library raises arrives as one of these, with its message."""


class Error(RuntimeError):
    """A moedist error. ``code`` is the ErrorCode's name ("invalid_argument", "timeout", "peer_lost", ...)."""

    def __init__(self, message, code="internal"):
        super().__init__(message)
        self.code = code


class ValidationError(Error, ValueError):
    """An argument breaks a rule: ``parameter`` is the torch_npu parameter name, ``value`` the offending
    value as text, ``rule`` the rule in words. Raised before anything is written."""

    def __init__(self, message, code="invalid_argument", parameter="", value="", rule=""):
        super().__init__(message, code)
        self.parameter = parameter
        self.value = value
        self.rule = rule


class PeerError(Error):
    """A collective step could not complete: ``peer`` is the rank at fault, ``phase`` the step."""

    def __init__(self, message, code="peer_failed", peer=-1, phase=""):
        super().__init__(message, code)
        self.peer = peer
        self.phase = phase
