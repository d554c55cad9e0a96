"""Ctrl-C (SIGINT) and SIGTERM during training.

The first signal only records a request: the training loop finishes the step it is in, writes a
checkpoint and raises `TrainingInterrupted`. A second signal raises `StoppedAtOnce` wherever the
program is; a checkpoint being written is then abandoned (its temporary directory removed), so the
checkpoints already written stay as they were. The command line turns both into a one-line message
and the conventional exit status, 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """The shell's status for a process ended by signal `signum`."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class TrainingInterrupted(Exception):
    """Training stopped at a step boundary on a signal, after writing `checkpoint`."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"interrupted by {signal_name(signum)} at step {step}; checkpoint {checkpoint}")


class StoppedAtOnce(BaseException):
    """A second signal: stop now, without a checkpoint. A BaseException, like KeyboardInterrupt, so
    that no `except Exception` on the way out swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped at once by a second {signal_name(signum)}")


class StopRequests:
    """Context manager that routes SIGINT and SIGTERM to a stop request (`signum`, None until one
    arrives). Installs its handlers only in the main thread (Python delivers signals there); the
    previous handlers are restored on exit."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be restored
                signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise StoppedAtOnce(signum)
        self.signum = signum
        log.warning("%s: stopping after this step with a checkpoint (%s again stops at once)",
                    signal_name(signum), "Ctrl-C" if signum == signal.SIGINT else "the signal")
