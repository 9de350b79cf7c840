"""What the bridge listens with, checked before anything loads: the address, the TLS
certificate and key, and the shared secret. Each error names the setting to fix."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
from pathlib import Path

from mlproject.config import Config

MIN_TOKEN_LENGTH = 16
"""The shortest shared secret the bridge accepts."""


def token_from_env(cfg: Config) -> str:
    """The shared secret from ``bridge.token_env``; a clear error when it is missing or short."""
    name = cfg.bridge.token_env
    token = os.environ.get(name, "")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"bridge: set the environment variable {name} (bridge.token_env) to a shared secret of at "
                         f"least {MIN_TOKEN_LENGTH} characters, e.g. `export {name}=$(python -c \"import secrets; "
                         "print(secrets.token_urlsafe(24))\")`; the NinjaTrader strategy sends the same token")
    return token


def check_address(host: str, port: int) -> None:
    """A ValueError naming the setting unless ``host:port`` is something the bridge can listen on
    (checked before the model loads; binding itself may still find the port taken)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"bridge.port (--port): {port!r} is not a TCP port; use 0-65535 (0: any free port)")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host) or ":" in host:  # 256.1.1.1 is no host name to look up
        raise ValueError(f"bridge.host (--host): {host!r} is not an IP address (e.g. 127.0.0.1, 0.0.0.0, ::1)")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"bridge.host (--host): {host!r} is not an address of this machine ({exc})") from None


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server's TLS context (None without a certificate); a ValueError naming ``bridge.tls_cert``
    or ``bridge.tls_key`` when the file is missing or is not PEM."""
    if not cert:
        return None
    for name, path in (("bridge.tls_cert", cert), ("bridge.tls_key", key)):
        if not Path(path).is_file():
            what = "certificate" if name.endswith("cert") else "private key"
            raise ValueError(f"{name}: {path} is not a file (a PEM {what})")
    try:
        ssl.create_default_context(cafile=cert)  # the certificate alone: a binary file fails here
    except (ssl.SSLError, ValueError, UnicodeError) as exc:
        raise ValueError(f"bridge.tls_cert: {cert} is not a PEM certificate ({exc})") from None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:  # a key with a passphrase fails too (no prompt on a server)
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"bridge.tls_key: {key} is not the unencrypted PEM private key of bridge.tls_cert {cert} "
                         f"({exc})") from None
    return ctx
