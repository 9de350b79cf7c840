"""Named crash points for fault-injection tests.

``fault_point("promote:stage-moved")`` ends the process on the spot, as ``kill -9`` would (no
cleanup, no ``finally``), when the environment variable :data:`FAULT_ENV` names that point.
Unset (always, outside the tests) it is one dictionary lookup. The tests run a command once per
point and check that one reconcile restores a consistent registry and deployment.
"""

from __future__ import annotations

import os

FAULT_ENV = "NT8_FAULT_AT"
KILLED_EXIT_CODE = 137
"""What a shell reports for a process killed by SIGKILL (128 + 9)."""


def fault_point(name: str) -> None:
    """Die here, without cleanup, if ``$NT8_FAULT_AT`` is ``name``."""
    if os.environ.get(FAULT_ENV) == name:
        os._exit(KILLED_EXIT_CODE)


DELAY_ENV = "NT8_FAULT_DELAY_S"


def fault_delay(name: str) -> None:
    """Sleep ``$NT8_FAULT_DELAY_S`` seconds here if ``$NT8_FAULT_AT`` is ``name`` (a slow part,
    for the tests that check nothing else waits for it)."""
    if os.environ.get(FAULT_ENV) == name:
        import time

        time.sleep(float(os.environ.get(DELAY_ENV, "0.02")))
