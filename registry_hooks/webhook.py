"""Webhook receiver for teams on an ``mlflow server``: redeploy when the production alias moves.

    python -m registry_hooks.webhook serve --port 8765 --secret "$NT8_WEBHOOK_SECRET"
    python -m registry_hooks.webhook register --url http://127.0.0.1:8765/webhook --secret "$NT8_WEBHOOK_SECRET"

``register`` creates the webhook, then has the server send test deliveries (MLflow's
``test_webhook`` API, each on a new connection so that several server workers answer) and fails,
deleting the webhook, unless they reach the receiver and it accepts their signature. The usual
failure: ``mlflow server`` started without ``MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY``, whose workers
then cannot read each other's webhook secrets (see :data:`KEY_FIX`).

MLflow fires no event for stage transitions, but ``promote`` and ``rollback`` also move the
alias ``production``, which fires ``model_version_alias.created`` (and ``.deleted``). The
receiver checks ``X-MLflow-Signature`` (``v1,`` + base64 HMAC-SHA256 of
``"{delivery_id}.{timestamp}.{payload}"`` with the shared secret) and rejects stale timestamps
(replay), then runs :func:`mlproject.deploy.reconcile`, which reads the registry itself:
the payload only says *that* something changed, never *what* to deploy.

The server is Starlette on uvicorn (both come with MLflow): asyncio, so a stalled client costs a
socket, not a thread. Every malformed request gets a 4xx before any work: a body over
:data:`MAX_BODY_BYTES` is refused from its Content-Length without reading it, a body that does
not arrive within :data:`BODY_TIMEOUT_S` gets 408, bad encodings, non-object and too deeply
nested JSON get 400, a bad or missing signature 401. A secret shorter than :data:`MIN_SECRET_LEN`
is refused at start.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from typing import Any

from mlproject.cli import base_parser, run_cli
from mlproject.deploy import reconcile
from mlproject.tracking import setup_tracking

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
"""MLflow's alias events are a few hundred bytes; anything larger is refused unread (413)."""
BODY_TIMEOUT_S = 10.0
"""A body that has not fully arrived by then is answered 408 and the connection closed."""
MIN_SECRET_LEN = 16
"""Shared secrets shorter than this (the empty one included) are refused at start."""
BACKLOG = 2048
"""Listen backlog: bursts of connections queue instead of being reset."""
HEADER_TIMEOUT_S = 10.0
"""A connection that has not sent a whole request head by then (after it opened, or after its
previous response) is closed: idle and slow-header sockets do not stay open."""
MAX_CONNECTIONS = 1000
"""Open connections beyond this are answered 503 (uvicorn's ``limit_concurrency``)."""
EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
DEPLOYED_ALIASES = ("production", "staging")
"""Aliases whose moves change the deploy directory (Production, and Staging's shadow deployment)."""
MAX_SKEW_S = 300
"""Requests whose X-MLflow-Timestamp is further than this from now are rejected (replays)."""
KEY_FIX = ("start every `mlflow server` worker with the same MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY, a Fernet key "
           "kept across restarts (export MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=$(python -c 'from cryptography.fernet "
           "import Fernet; print(Fernet.generate_key().decode())') before `mlflow server`), then register again")
"""Without that variable each server worker (4 by default) encrypts webhook secrets with a key of
its own (mlflow/store/model_registry/dbmodels/models.py: EncryptedString), so a webhook stored by
one worker cannot be read by the others: their deliveries fail with cryptography's InvalidToken."""
PROBES = 8
"""Test deliveries ``register`` asks the server for (and reads of the webhook back, and listings of
all webhooks), each on a new connection: connections are spread over the server's workers, so
some of them land on workers that did not store the webhook."""
TEST_PAYLOAD = {"name": "example_model", "alias": "example_alias"}
"""What MLflow's test delivery carries (mlflow/webhooks/types.py: ModelVersionAliasCreatedPayload.example)."""


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
    # Bytes, not str: compare_digest refuses non-ASCII strings (a forged header is a 401, not a 500).
    expected = signature(secret, delivery, timestamp, body).encode()
    if not hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), expected):
        return "signature mismatch"
    return None


def check_secret(secret: str) -> str:
    """The secret, or ValueError when it is too short to sign anything."""
    if len(secret) < MIN_SECRET_LEN:
        raise ValueError(f"--secret: a shared secret of at least {MIN_SECRET_LEN} characters is required "
                         f"(got {len(secret)}); generate one with: python -c 'import secrets; print(secrets.token_hex(32))'")
    return secret


class Receiver:
    """Verifies deliveries and reconciles; one reconcile at a time."""

    def __init__(self, secret: str, model_name: str, deploy_dir: str, keep_releases: int = 3,
                 lock_file: str | None = None) -> None:
        self.secret = check_secret(secret)
        self.model_name, self.deploy_dir, self.keep, self.lock_file = model_name, deploy_dir, keep_releases, lock_file
        self._lock = threading.Lock()
        self.deployments = 0

    def handle(self, headers: Any, body: str) -> tuple[int, str]:
        """(HTTP status, message) for one delivery."""
        problem = verify(self.secret, headers, body)
        if problem:
            log.warning("rejected webhook delivery: %s", problem)
            return 401, problem
        try:
            event = json.loads(body)
        except json.JSONDecodeError:
            return 400, "body is not JSON"
        except RecursionError:  # json's decoder recurses per level: a signed "[[[[..." 30,000 deep
            return 400, "body is JSON nested too deeply"
        if not isinstance(event, dict) or not isinstance(event.get("data", {}), dict):
            return 400, "body is not an MLflow webhook event (a JSON object with an object 'data')"
        data = event.get("data", {})
        kind = f"{event.get('entity')}.{event.get('action')}"
        if kind in EVENTS and {k: data.get(k) for k in TEST_PAYLOAD} == TEST_PAYLOAD:
            return 200, f"test delivery received ({kind}): nothing to deploy"
        if kind not in EVENTS or data.get("alias") not in DEPLOYED_ALIASES or data.get("name") != self.model_name:
            return 200, f"ignored {kind} for {data.get('name')}@{data.get('alias')}"
        with self._lock:
            result = reconcile(self.model_name, self.deploy_dir, self.keep, lock_file=self.lock_file)
            self.deployments += int(result.changed)
        shadow = f"; Staging v{result.shadow} shadow-deployed" if result.shadow else ""
        return 200, f"reconciled: version {result.version} deployed{' (changed)' if result.changed else ''}{shadow}"


def make_app(receiver: Receiver) -> Any:
    """The ASGI app: POST /webhook -> ``receiver``; every malformed request a 4xx."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.routing import Route

    async def webhook(request: Request) -> Any:
        body = await _read_body(request)
        if not isinstance(body, str):
            return body  # the 4xx of a malformed request
        try:
            status, message = await run_in_threadpool(receiver.handle, request.headers, body)
        except Exception as exc:  # noqa: BLE001 - answer 500 with the reason, keep serving
            log.exception("reconcile after webhook failed")
            status, message = 500, f"{type(exc).__name__}: {exc}"
        return _answer(status, message)

    return Starlette(routes=[Route("/webhook", webhook, methods=["POST"])])


def _answer(status: int, message: str, close: bool = False) -> Any:
    """The JSON answer ``{"status", "message"}``. ``close``: the body was not (fully) read, so the
    connection cannot carry another request."""
    from starlette.responses import JSONResponse

    return JSONResponse({"status": status, "message": message}, status_code=status,
                        headers={"connection": "close"} if close else None)


async def _read_body(request: Any) -> Any:
    """The request's body as text, or the 4xx answer when its length is missing or too large
    (refused unread), it does not arrive in time, or it is not UTF-8."""
    from starlette.requests import ClientDisconnect

    refused = _length_refusal(request.headers.get("content-length"))
    if refused is not None:
        return refused
    try:
        raw = await asyncio.wait_for(request.body(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        return _answer(408, f"body not received within {BODY_TIMEOUT_S:g} s", close=True)
    except ClientDisconnect:
        return _answer(400, "client went away")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _answer(400, "body is not UTF-8")


def _length_refusal(length: str | None) -> Any:
    """The answer to a missing, malformed or too large Content-Length; None when the body may be read."""
    if length is None:
        return _answer(411, "Content-Length required", close=True)
    if not length.isdigit():
        return _answer(400, "bad Content-Length", close=True)
    if int(length) > MAX_BODY_BYTES:
        return _answer(413, f"body over {MAX_BODY_BYTES} bytes", close=True)
    return None


def _deadline_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol with a request-head deadline. uvicorn times out only the idle time
    after a response (keep-alive), so a socket that connects and sends nothing, or half a
    request line, stayed open for good; this closes it ``header_timeout`` seconds after it opened
    (or after its previous response), unless a whole request head has arrived."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return type("HeaderDeadlineProtocol", (_HeaderDeadline, H11Protocol), {"_header_timeout": header_timeout})


class _HeaderDeadline:
    """The request-head deadline of :func:`_deadline_protocol`, mixed in before uvicorn's
    H11Protocol (which is imported only when a server is made); ``_header_timeout`` is set there."""

    _header_timeout: float
    _deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self._header_timeout, self.timeout_keep_alive_handler)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        # No new request cycle began: still waiting for a whole head (or between requests).
        if self.cycle is before and (before is None or before.response_complete):
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class WebhookServer:
    """uvicorn serving :func:`make_app` (``port=0``: any free port). ``serve_forever()`` blocks;
    ``start()`` runs it in a thread and returns once it listens; ``shutdown()`` stops it."""

    def __init__(self, receiver: Receiver, host: str = "127.0.0.1", port: int = 8765,
                 header_timeout: float = HEADER_TIMEOUT_S) -> None:
        import uvicorn

        config = uvicorn.Config(make_app(receiver), host=host, port=port, backlog=BACKLOG, log_level="warning",
                                timeout_keep_alive=5, lifespan="off", http=_deadline_protocol(header_timeout),
                                limit_concurrency=MAX_CONNECTIONS)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def server_port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    def serve_forever(self) -> None:
        self.server.run()

    def start(self, timeout: float = 30.0) -> WebhookServer:
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("the webhook server did not start")
            time.sleep(0.02)
        return self

    def shutdown(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def make_server(receiver: Receiver, host: str = "127.0.0.1", port: int = 8765,
                header_timeout: float = HEADER_TIMEOUT_S) -> WebhookServer:
    """A started-on-demand server for ``receiver`` (see :class:`WebhookServer`)."""
    return WebhookServer(receiver, host, port, header_timeout)


class DeliveryError(ValueError):
    """The tracking server could not deliver a test event to the receiver; says how to fix it."""


def _rest(creds: Any, method: str, path: str, pinned: bool = False, **kwargs: Any) -> Any:
    """One request to the tracking server, no retries. ``pinned``: on a kept-alive connection of its
    own (the same server worker as the previous pinned request, while the server keeps it open);
    else on a new connection (``Connection: close``), which lands on whichever worker accepts it.
    MLflow caches one session per retry setting, so the two differ in ``backoff_factor`` (unused
    without retries) to keep the probes off the pinned connection."""
    from mlflow.utils.rest_utils import http_request

    return http_request(creds, path, method, max_retries=0, backoff_factor=0 if pinned else 1, retry_codes=(),
                        raise_on_status=False, extra_headers=None if pinned else {"Connection": "close"}, timeout=60,
                        **kwargs)


def _undecryptable(response: Any) -> bool:
    """MLflow answers a secret it cannot decrypt (cryptography's InvalidToken, whose message is
    empty) with HTTP 500 INTERNAL_ERROR and an empty message."""
    try:
        body = response.json()
    except ValueError:
        return False
    return response.status_code == 500 and body.get("error_code") == "INTERNAL_ERROR" and not body.get("message")


def delivery_problem(response: Any, url: str) -> str | None:
    """None if the server's test delivery (the answer of POST .../webhooks/<id>/test) reached a
    receiver that accepted it, else what went wrong and how to fix it."""
    if _undecryptable(response):
        return f"the tracking server could not decrypt the webhook secret it had just stored: {KEY_FIX}"
    if response.status_code != 200:
        return f"the tracking server refused the test delivery: HTTP {response.status_code} {response.text[:300]}"
    result = response.json().get("result", {})
    if result.get("success"):
        return _answer_problem(result.get("response_body", ""), url)
    return _failure_problem(result, url)


def _answer_problem(body: str, url: str) -> str | None:
    """None if a delivered test event's answer is the receiver's (a JSON object with a message),
    else that ``url`` is something else."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "message" not in answer:
        return (f"{url} answered the test delivery, but not as `python -m registry_hooks.webhook serve` does "
                f"({body[:200]!r}): point --url at the receiver")
    return None


def _failure_problem(result: dict[str, Any], url: str) -> str:
    """Why a test delivery failed (the receiver refused it, answered an error, or was not reached)
    and how to fix it."""
    status, body = result.get("response_status"), result.get("response_body", "")
    error = result.get("error_message", "")
    if status == 401:
        return (f"the receiver at {url} refused MLflow's signature ({body[:200]}): "
                "give `serve` and `register` the same --secret")
    if status:
        return f"the receiver at {url} answered the test delivery with HTTP {status}: {body[:300]}"
    if "scheme" in error or "private" in error.lower():
        return (f"the tracking server refuses to deliver to {url} ({error[:300]}): for a receiver on a loopback or "
                "private address start `mlflow server` with MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and "
                "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true")
    return (f"the tracking server could not reach the receiver at {url} ({error[:300]}): start "
            "`python -m registry_hooks.webhook serve` first, on an address the tracking server can reach")


def check_delivery(creds: Any, webhook_id: str, url: str, probes: int = PROBES) -> str:
    """Ask the server for ``probes`` test deliveries of webhook ``webhook_id`` (and to read it back as
    often), then to list every webhook ``probes`` times (each alias event reads them all); returns
    the receiver's answer, or raises :class:`DeliveryError` naming the fix. The own webhook is read
    first so that a listing that fails afterwards points at another one."""
    answer = ""
    for _ in range(probes):
        response = _rest(creds, "POST", f"/api/2.0/mlflow/webhooks/{webhook_id}/test", json={})
        problem = delivery_problem(response, url)
        if not problem and _undecryptable(_rest(creds, "GET", f"/api/2.0/mlflow/webhooks/{webhook_id}")):
            problem = f"the tracking server could not decrypt the webhook secret it had just stored: {KEY_FIX}"
        if problem:
            raise DeliveryError(problem)
        answer = json.loads(response.json()["result"]["response_body"])["message"]
    for _ in range(probes):
        if _undecryptable(_rest(creds, "GET", "/api/2.0/mlflow/webhooks", params={"max_results": 1000})):
            raise DeliveryError(
                "the tracking server cannot read back a webhook registered earlier (stored under another "
                "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY, or by a server worker without one), and while it is "
                "there no alias event is delivered to any webhook; delete it in the server's database (SQL: "
                "UPDATE webhooks SET deleted_timestamp = 1 WHERE webhook_id <> '" + webhook_id + "'), then "
                "register again; " + KEY_FIX)
    return answer


def _delete(creds: Any, webhook_id: str, within_s: float = 30.0) -> bool:
    """Delete webhook ``webhook_id``. Only the server worker that stored it may be able to read it
    (see :data:`KEY_FIX`): first on the pinned connection that created it, then on new connections
    until one lands on that worker."""
    path = f"/api/2.0/mlflow/webhooks/{webhook_id}"
    if _rest(creds, "DELETE", path, pinned=True).status_code == 200:
        return True
    deadline = time.time() + within_s
    while time.time() < deadline:
        if _rest(creds, "DELETE", path).status_code == 200:
            return True
    return False


def _create(creds: Any, url: str, secret: str, name: str) -> Any:
    """``MlflowClient.create_webhook`` over the pinned connection (see :func:`_delete`)."""
    from mlflow.entities.webhook import Webhook, WebhookEvent
    from mlflow.protos.webhooks_pb2 import CreateWebhook
    from mlflow.protos.webhooks_pb2 import Webhook as WebhookProto
    from mlflow.utils.proto_json_utils import message_to_json, parse_dict
    from mlflow.utils.rest_utils import verify_rest_response

    request = CreateWebhook(name=name, url=url, secret=secret, description="redeploy when the production alias moves",
                            events=[WebhookEvent.from_str(event).to_proto() for event in EVENTS])
    path = "/api/2.0/mlflow/webhooks"
    response = verify_rest_response(_rest(creds, "POST", path, pinned=True, json=json.loads(message_to_json(request))),
                                    path)
    proto = WebhookProto()
    parse_dict(response.json()["webhook"], proto)
    return Webhook.from_proto(proto)


def register(url: str, secret: str, name: str = "nt8-production-deploy", probes: int = PROBES) -> Any:
    """Register the receiver with the tracking server (MLflow's create-webhook API) and check
    that deliveries arrive: ``probes`` test deliveries (MLflow's ``test_webhook`` API, each on a new
    connection) must reach a receiver that accepts them. On failure the webhook is deleted (one that
    cannot deliver would fail every promotion silently, and a rerun would add a second) and
    :class:`DeliveryError` names the fix."""
    import mlflow
    from mlflow.utils.credentials import get_default_host_creds

    uri = mlflow.get_registry_uri()
    if not uri.startswith(("http://", "https://")):
        raise ValueError(f"register needs the `mlflow server` that delivers webhooks, not {uri}: set "
                         "MLFLOW_TRACKING_URI=http://<host>:<port> of that server")
    creds = get_default_host_creds(uri)
    hook = _create(creds, url, secret, name)
    try:
        answer = check_delivery(creds, hook.webhook_id, url, probes)
    except DeliveryError as exc:
        if _delete(creds, hook.webhook_id):
            raise DeliveryError(f"{exc} (webhook {hook.webhook_id} deleted)") from None
        raise DeliveryError(f"{exc} (webhook {hook.webhook_id} could NOT be deleted: in the server's database, UPDATE "
                            f"webhooks SET deleted_timestamp = 1 WHERE webhook_id = '{hook.webhook_id}')") from None
    log.info("%d test deliveries reached %s: %s", probes, url, answer)
    return hook


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("command", choices=("serve", "register"))
    parser.add_argument("--secret", required=True, help=f"shared secret, at least {MIN_SECRET_LEN} characters "
                        "(the same for serve and register)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--url", default="", help="register: the receiver's URL")
    return parser


def _cli(cfg: Any, args: argparse.Namespace) -> None:
    check_secret(args.secret)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: expected 0..65535")
    setup_tracking(cfg)
    p = cfg.promotion
    if args.command == "register":
        hook = register(args.url or f"http://{args.host}:{args.port}/webhook", args.secret)
        log.info("registered webhook %s -> %s", hook.webhook_id, hook.url)
        return
    server = make_server(Receiver(args.secret, p.model_name, p.deploy_dir, p.keep_releases, p.lock_file), args.host,
                         args.port)
    log.info("listening on http://%s:%d/webhook for %s", args.host, args.port, ", ".join(EVENTS))
    server.serve_forever()


if __name__ == "__main__":
    run_cli(build_parser(), _cli)
