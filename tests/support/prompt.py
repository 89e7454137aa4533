"""Children of the tests that stand for a program started at a shell prompt."""

from __future__ import annotations

import signal


def as_at_a_prompt() -> None:
    """SIGINT as a shell prompt leaves it, for `Popen(preexec_fn=...)`: a test run started in the
    background (nohup, a CI runner's job) hands its children SIGINT ignored, and Python then
    never raises KeyboardInterrupt, so the Ctrl-C the tests stand for would not arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
