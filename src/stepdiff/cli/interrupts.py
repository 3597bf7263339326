"""Ctrl-C and SIGTERM during a command: the first Ctrl-C stops gracefully, the second aborts; SIGTERM aborts."""

from __future__ import annotations

import contextlib
import signal
import sys


class Terminated(BaseException):
    """SIGTERM during a command: abort like a second Ctrl-C (a BaseException, so no library swallows it)."""




@contextlib.contextmanager
def _signal_handler(signum: int, handler):
    """``handler`` for ``signum`` while the block runs, then the previous one again; off the main thread (where
    Python cannot handle signals) the block just runs."""
    try:
        previous = signal.signal(signum, handler)
    except ValueError:  # not the main thread: no signal handling
        yield
        return
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _two_step_ctrl_c(stopping, stop, message: str):
    """First Ctrl-C: ``stop()`` and print ``message``. Second (``stopping()`` is true): abort with KeyboardInterrupt."""

    def handler(signum, frame):
        if stopping():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stop()
        print(f"\nstepdiff: {message} (Ctrl-C again to abort)", file=sys.stderr)

    return _signal_handler(signal.SIGINT, handler)


def _graceful_interrupt(token, stop_output: str = "denoised"):
    """First Ctrl-C: stop after the current step and keep the image (finished in a few more steps with
    ``--stop-output finish``, the default). Second: abort, writing nothing."""
    from ..finishing import parse_interrupt_output

    policy, steps = parse_interrupt_output(stop_output)
    message = "stopping after this step"
    if policy == "finish":
        message += f", then finishing the picture in {steps} step{'s' if steps > 1 else ''} at most"
    return _two_step_ctrl_c(lambda: token.cancelled, lambda: token.cancel("interrupted by Ctrl-C"), message)


def _terminate_aborts():
    """SIGTERM raises Terminated, so a run is taken back and reported like a second Ctrl-C (exit 143)."""

    def handler(signum, frame):
        raise Terminated

    return _signal_handler(signal.SIGTERM, handler)


