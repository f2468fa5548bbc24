"""Killing a process at a chosen moment: resume tests SIGKILL a real CLI run mid-way."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds (fails if it exits first or ``timeout`` passes)."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, "the process finished before it could be killed"
            assert time.monotonic() < deadline, "timed out waiting to kill the process"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
