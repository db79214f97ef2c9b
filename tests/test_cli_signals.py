"""Stop signals of ``outbox relay`` and ``outbox consume`` (outbox.cli._options.StopSignals).

Each check runs in a subprocess of its own: a handler that deadlocks hangs that process, not the
suite, and the process's exit status is part of what is checked.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Raises SIGTERM at the n-th opcode, line or call run while the main thread is in StopSignals.wait, for
# n = 1, 2, ... until wait() runs out of points: the handler then runs at every instant of the wait,
# including any in which the wait holds a lock (as threading.Event.wait holds its Event's).
_AT_EVERY_POINT = """
import signal, sys
from outbox.cli._options import StopSignals

points = 0
while True:
    points += 1
    seen = 0
    raised = False

    def trace(frame, event, arg):
        global seen, raised
        frame.f_trace_opcodes = True
        seen += 1
        if seen == points and not raised:
            raised = True
            signal.raise_signal(signal.SIGTERM)
        return trace

    with StopSignals("unused") as signals:
        sys.settrace(trace)
        try:
            stopped = any(signals.wait(0.001) for _ in range(5))
        finally:
            sys.settrace(None)
        if not raised:
            break
        # a signal after the last wait's last look is seen by the next wait, at once
        assert stopped or signals.wait(0), f"the signal at point {points} was not seen"
    assert signals.received == "SIGTERM"
print(f"seen at each of {points - 1} points")
"""

_TWICE = """
import signal
from outbox.cli._options import StopSignals

with StopSignals("what a second signal costs") as signals:
    signal.raise_signal(signal.SIGTERM)
    assert signals.wait(5) and signals.received == "SIGTERM"
    signal.raise_signal(signal.SIGINT)
print("still running after a second signal")
"""


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60
    )


def test_a_stop_signal_is_seen_whenever_it_comes() -> None:
    """No instant of the wait deadlocks the handler (it once set a threading.Event from the main thread)."""
    try:
        done = _run(_AT_EVERY_POINT)
    except subprocess.TimeoutExpired:
        raise AssertionError("a signal during StopSignals.wait hung the process") from None
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("seen at each of "), done.stdout


def test_a_second_stop_signal_exits_at_once_saying_what_it_costs() -> None:
    done = _run(_TWICE)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "still running" not in done.stdout
    assert done.stderr == "outbox: second SIGINT: exiting now; what a second signal costs\n"
