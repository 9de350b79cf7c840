"""What a user hits running ``pipelines.collect`` against a bridge that refuses the session: one
line naming the fix and exit code 2, never a traceback.

Real parts: the deployed MES model of ``test_bridge`` (a real pyfunc policy in a sqlite registry,
deployed by ``reconcile``), a real bridge on loopback, ``python -m pipelines.collect`` as a user
runs it.
"""

from __future__ import annotations

from pathlib import Path

from conftest import run_module
from mlproject.bridge.server import Bridge, BridgeThread
from test_bridge import TOKEN, config, deployed  # noqa: F401 - deployed is the module-scoped fixture


def _collect(tmp_path: Path, folder: Path, *sets: str, env: dict[str, str] | None = None):
    """``python -m pipelines.collect`` with the default config (ES) on 30 bars of the fixture."""
    args = [f"continuous_learning.experience_storage={tmp_path / 'buffer'}", f"promotion.deploy_dir={folder / 'deploy'}",
            "bridge.port=0", *sets]
    return run_module(["python", "-m", "pipelines.collect", "--data", str(tmp_path / "bars.csv"), "--bars", "30",
                       *sum((["--set", s] for s in args), [])], tmp_path,
                      env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **(env or {})})


def _one_error_line(stderr: str) -> str:
    """The single ``error:`` line, which must end stderr (the log lines before it are INFO)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().splitlines()[-1] == errors[0], stderr[-3000:]
    return errors[0]


def test_collect_with_the_default_es_config_against_a_deployed_mes_model_says_which_config(deployed, tmp_path):
    folder, bars = deployed[1], deployed[2]
    bars.iloc[:30].reset_index().to_csv(tmp_path / "bars.csv", index=False)
    out = _collect(tmp_path, folder)
    assert out.returncode == 2, out.stderr[-3000:]
    assert _one_error_line(out.stderr) == (
        "error: the deployed model nt8-agent v1 trades MES; this run is configured for ES: "
        "add --config conf/smoke.yaml or --set env.instrument=MES")


def test_collect_with_another_token_than_the_running_bridge_names_the_variable(deployed, tmp_path):
    folder, bars = deployed[1], deployed[2]
    bars.iloc[:30].reset_index().to_csv(tmp_path / "bars.csv", index=False)
    cfg = config(folder, f"continuous_learning.experience_storage={tmp_path / 'bridge-buffer'}")
    with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:
        host, port = thread.bridge.address
        out = _collect(tmp_path, folder, f"bridge.port={port}", "env.instrument=MES",
                       env={"NT8_BRIDGE_TOKEN": "another-token-0123456789"})
    assert out.returncode == 2, out.stderr[-3000:]
    line = _one_error_line(out.stderr)
    assert line.startswith(f"error: the bridge at {host}:{port} refused the token: the collecting shell needs the "
                           "same NT8_BRIDGE_TOKEN as the running bridge"), line
