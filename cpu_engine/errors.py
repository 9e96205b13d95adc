"""Every error the CPU engine raises.

    EngineError
    ├── CheckpointError        the checkpoint directory cannot be served (missing file, unsupported model)
    └── RequestRejected        one request cannot be accepted; the engine and other requests are unaffected
        ├── RequestTooLarge    it can never fit (context length or KV-token budget)
        └── EngineOverloaded   it could fit, but the wait queue is full right now

Each class names the limit it is about in its message, so callers can pass the message on unchanged.
"""


class EngineError(Exception):
    """Base class of the CPU engine's errors."""


class CheckpointError(EngineError):
    """The checkpoint cannot be loaded or is not a supported Llama-family model."""


class RequestRejected(EngineError):
    """A request was refused before it started; nothing was allocated for it."""


class RequestTooLarge(RequestRejected):
    """The request can never fit within the engine's limits."""


class EngineOverloaded(RequestRejected):
    """The request could fit but the engine's wait queue is full."""
