"""Webhook receiver for teams on an ``mlflow server``: redeploy when the production alias moves.

    python -m registry_hooks.webhook serve --port 8765 --secret "$NT8_WEBHOOK_SECRET"
    python -m registry_hooks.webhook register --url http://127.0.0.1:8765/webhook --secret "$NT8_WEBHOOK_SECRET"

MLflow fires no event for stage transitions, but ``promote`` and ``rollback`` also move the
alias ``production``, which fires ``model_version_alias.created`` (and ``.deleted``). The
receiver checks ``X-MLflow-Signature`` (``v1,`` + base64 HMAC-SHA256 of
``"{delivery_id}.{timestamp}.{payload}"`` with the shared secret) and rejects stale timestamps
(replay), then runs :func:`registry_hooks.reconcile.reconcile`, which reads the registry itself:
the payload only says *that* something changed, never *what* to deploy.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
MAX_SKEW_S = 300
"""Requests whose X-MLflow-Timestamp is further than this from now are rejected (replays)."""


def signature(secret: str, delivery_id: str, timestamp: str, payload: str) -> str:
    """MLflow's webhook signature (mlflow/webhooks/delivery.py: _generate_hmac_signature)."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{payload}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: Any, body: str, now: float | None = None) -> str | None:
    """None if the request is authentic and fresh, else why not."""
    sent = headers.get("X-MLflow-Signature", "")
    timestamp = headers.get("X-MLflow-Timestamp", "")
    delivery = headers.get("X-MLflow-Delivery-Id", "")
    if not sent or not timestamp or not delivery:
        return "missing signature headers"
    try:
        age = abs((now or time.time()) - int(timestamp))
    except ValueError:
        return "bad timestamp"
    if age > MAX_SKEW_S:
        return f"stale timestamp ({age:.0f} s old)"
    if not hmac.compare_digest(sent, signature(secret, delivery, timestamp, body)):
        return "signature mismatch"
    return None


class Receiver:
    """Verifies deliveries and reconciles; one reconcile at a time."""

    def __init__(self, secret: str, model_name: str, deploy_dir: str, keep_releases: int = 3) -> None:
        self.secret, self.model_name, self.deploy_dir, self.keep = secret, model_name, deploy_dir, keep_releases
        self._lock = threading.Lock()
        self.deployments = 0

    def handle(self, headers: Any, body: str) -> tuple[int, str]:
        """(HTTP status, message) for one delivery."""
        from registry_hooks.reconcile import reconcile

        problem = verify(self.secret, headers, body)
        if problem:
            log.warning("rejected webhook delivery: %s", problem)
            return 401, problem
        try:
            event = json.loads(body)
        except json.JSONDecodeError:
            return 400, "body is not JSON"
        data = event.get("data", {})
        kind = f"{event.get('entity')}.{event.get('action')}"
        if kind not in EVENTS or data.get("alias") != "production" or data.get("name") != self.model_name:
            return 200, f"ignored {kind} for {data.get('name')}@{data.get('alias')}"
        with self._lock:
            result = reconcile(self.model_name, self.deploy_dir, self.keep)
            self.deployments += int(result.changed)
        return 200, f"reconciled: version {result.version} deployed{' (changed)' if result.changed else ''}"


def make_server(receiver: Receiver, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """An HTTP server answering POST /webhook with ``receiver`` (port 0: any free port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") != "/webhook":
                self._answer(404, "POST /webhook")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode("utf-8", "replace")
            try:
                status, message = receiver.handle(self.headers, body)
            except Exception as exc:  # noqa: BLE001 - answer 500, keep serving
                log.exception("reconcile after webhook failed")
                status, message = 500, str(exc)
            self._answer(status, message)

        def _answer(self, status: int, message: str) -> None:
            data = json.dumps({"status": status, "message": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("webhook %s", fmt % args)

    return ThreadingHTTPServer((host, port), Handler)


def register(url: str, secret: str, name: str = "nt8-production-deploy") -> Any:
    """Register the receiver with the tracking server (``MlflowClient.create_webhook``)."""
    from mlflow import MlflowClient

    return MlflowClient().create_webhook(name=name, url=url, events=list(EVENTS), secret=secret,
                                         description="redeploy when the production alias moves")


def build_parser() -> argparse.ArgumentParser:
    from pipelines.cli import base_parser

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("command", choices=("serve", "register"))
    parser.add_argument("--secret", required=True, help="shared secret (the same for serve and register)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--url", default="", help="register: the receiver's URL")
    return parser


def _cli(cfg: Any, args: argparse.Namespace) -> None:
    from mlproject.tracking import setup_tracking

    setup_tracking(cfg)
    p = cfg.promotion
    if args.command == "register":
        hook = register(args.url or f"http://{args.host}:{args.port}/webhook", args.secret)
        log.info("registered webhook %s -> %s", hook.webhook_id, hook.url)
        return
    server = make_server(Receiver(args.secret, p.model_name, p.deploy_dir, p.keep_releases), args.host, args.port)
    log.info("listening on http://%s:%d/webhook for %s", args.host, server.server_port, ", ".join(EVENTS))
    server.serve_forever()


if __name__ == "__main__":
    from pipelines.cli import run_cli

    run_cli(build_parser(), _cli)
