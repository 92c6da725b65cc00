"""`within(seconds, fn)`: run `fn` with a deadline that works in any thread.

Signal-based timeouts (`signal.alarm`) only work in the main thread; rewards run in worker
threads too. Here a timer thread raises an exception in the calling thread at its next
bytecode. It can interrupt Python code (a runaway sympy simplification, a regex loop written
in Python), not a single long C call.

Test: `pytest tests/test_rewards_math.py -k within`.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class _Deadline(BaseException):
    """Raised inside a thread whose call ran past its deadline (BaseException, so math-verify's
    `except Exception` handlers let it through)."""


def within(seconds: float | None, fn: Callable[[], T]) -> tuple[bool, T | None]:
    """(True, fn()) if `fn` returns within `seconds`, else (False, None); any thread.

    A timer thread raises `_Deadline` in the calling thread once the time is up. The lock and
    the `done` flag make sure it can only land while `fn` runs or just after, inside the `try`:
    once `done` is set no exception is sent, and one sent but not yet raised is withdrawn.
    """
    if not seconds:
        return True, fn()
    thread_id = threading.get_ident()
    lock = threading.Lock()
    done = False

    def expire() -> None:
        with lock:
            if not done:
                _async_raise(thread_id, _Deadline)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    try:
        timer.start()
        try:
            return True, fn()
        finally:
            with lock:
                done = True
                _async_raise(thread_id, None)
            timer.cancel()
    except _Deadline:
        return False, None


def _async_raise(thread_id: int, exception: type[BaseException] | None) -> None:
    """Raise `exception` in thread `thread_id` at its next bytecode (None: withdraw it)."""
    target = ctypes.py_object(exception) if exception is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), target)
