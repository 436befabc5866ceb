"""The shapes of the callbacks and hook objects vdeliver passes around.

For type checking only: the delivery path (vdeliver.cli and what it imports) imports this
module under `if TYPE_CHECKING:` and never at run time, because `typing` costs an import
there.  Nothing here does anything.
"""

from typing import Protocol


class Hook(Protocol):
    """A call with no arguments at a fixed point: a test kills or pauses a delivery there
    (maildir's before_link), or the server reacts to a wake-up (the LMTP daemon's on_wake)."""

    def __call__(self) -> object: ...


class Sink(Protocol):
    """Where a stream of bytes goes, one chunk per call (the Escaper's output)."""

    def __call__(self, data: "bytes | bytearray | memoryview", /) -> object: ...


class Log(Protocol):
    """What a logger offers a module that only reports (vdeliver.log.Logger is one)."""

    def info(self, text: str) -> None: ...

    def warning(self, text: str) -> None: ...

    def error(self, text: str) -> None: ...
