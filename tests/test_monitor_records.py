"""What the drift monitor records when its rollback does not happen: Production moved (a person
promoted another version) between the pass that judged the version and the rollback."""

from __future__ import annotations

import threading
import time

from mlflow import MlflowClient

from mlproject import registry
from mlproject.monitor import ALERT_TAG, STALE_ALERT_TAG, monitor_alert
from test_monitor import deployed  # noqa: F401 (fixture)
from test_registry import NAME, register_constant, store  # noqa: F401 (fixture)


def test_a_rollback_skipped_because_production_moved_says_so_and_leaves_no_live_alert(deployed, store):
    """The pass is held at the registry lock after judging v2 (its alert tag is the sign), a person
    promotes v3 meanwhile; the rollback is skipped and recorded as such, not as a rollback, and v2's
    alert becomes stale (no alert for `pipelines.status` if v2 is deployed again)."""
    from pipelines import monitor

    cfg, paper, v1, v2 = deployed
    v3 = register_constant(store, 2)
    paper.trades([-150.0, 40.0] * 6)  # 12 trades, losing: the first bad pass
    assert monitor.check(cfg()).action is None
    client, out = MlflowClient(), {}

    def second_pass() -> None:
        try:
            out["result"] = monitor.check(cfg())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread below
            out["error"] = exc

    with registry.registry_lock(cfg().promotion.lock_file):
        worker = threading.Thread(target=second_pass)
        worker.start()
        deadline = time.time() + 60
        while ALERT_TAG not in client.get_model_version(NAME, v2).tags:  # judged v2, waits for the lock
            assert worker.is_alive() and time.time() < deadline, out
            time.sleep(0.1)
        registry.promote(NAME, v3, "a person promoted v3")  # the registry lock is reentrant in this thread
    worker.join(60)
    assert "error" not in out, out
    skipped = f"rollback skipped: Production moved from v{v2} to v{v3} meanwhile"
    result = out["result"]
    assert result.action == skipped and registry.production_version(NAME) == v3
    assert [e["action"] for e in registry.history(NAME)] == ["promote"] * 3  # no rollback event
    tags = client.get_model_version(NAME, v2).tags
    assert ALERT_TAG not in tags and tags[STALE_ALERT_TAG].startswith(f"{skipped}; the alert was: rollback: ")
    assert monitor_alert(NAME) is None
    last = client.get_run(result.run_id).data.tags["monitor.last_action"]
    assert last.startswith(f"{skipped} (breaches: ") and "Sharpe" in last, last
