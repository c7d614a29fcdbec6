"""Ctrl-C and SIGTERM as KeyboardInterrupt in the main thread, and never lost.

    with interrupts.caught():   # pipeline.cli main: handlers in, the old ones back at the end
        ...                     # raises KeyboardInterrupt("SIGINT") / ("SIGTERM")

Python runs a signal handler between two bytecodes of the main thread, wherever that is.
When it is inside a finalizer or weakref callback that the garbage collector runs, Python
prints "Exception ignored in ..." and drops the KeyboardInterrupt; inside a `__hash__`,
`__eq__` or `__getattr__` that C code calls and whose errors it clears, it vanishes without
a word. TensorFlow and SQLAlchemy have many such places, and a worker told to stop trained
on. So the handler also records the signal, and `check()` raises it again: every fit calls
it after each batch (`pipeline.train.StopOnSignal`). Python's "Exception ignored in ..."
traceback for such a lost interrupt is not printed: it is not lost.
"""

from __future__ import annotations

import contextlib
import signal
import sys

_received: str | None = None  # the name of the signal caught in `caught()`, if one came


def _raise(signum, frame):
    global _received
    _received = signal.Signals(signum).name
    raise KeyboardInterrupt(_received)


def pending() -> str | None:
    """The name of the signal caught in `caught()`, if one came (an error raised after it is its
    echo: TensorFlow's scope exits raise their own error over a KeyboardInterrupt)."""
    return _received


def check() -> None:
    """Raise KeyboardInterrupt again if a signal came: the first one may have been lost."""
    if _received:
        raise KeyboardInterrupt(_received)


@contextlib.contextmanager
def caught():
    """SIGINT and SIGTERM raise KeyboardInterrupt (also when the process started with SIGINT
    ignored), and one Python drops (in a finalizer) prints nothing; afterwards the previous
    handlers and `sys.unraisablehook` come back and the signal is forgotten."""
    global _received
    previous = {signum: signal.signal(signum, _raise) for signum in (signal.SIGINT, signal.SIGTERM)}
    unraisable = sys.unraisablehook

    def hook(event):
        if not (_received and isinstance(event.exc_value, KeyboardInterrupt)):
            unraisable(event)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        _received = None
        sys.unraisablehook = unraisable
        for signum, handler in previous.items():
            signal.signal(signum, handler)
