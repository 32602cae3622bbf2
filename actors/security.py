"""TLS credentials and bearer-token authentication (DESIGN §5).

Certificates, keys and tokens are named by file path in the config and read by the replicas
themselves on their own nodes: their contents never travel in the Serve application's
arguments (which Serve shows in its status and dashboard) and are never logged. Tokens are
kept only as SHA-256 digests and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc


class SecurityError(RuntimeError):
    """A certificate, key or token file named in the config cannot be used; the message says which."""


class AuthError(PermissionError):
    """A Generate call without a valid bearer token (UNAUTHENTICATED)."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for one side of a TLS connection.

    Server side: cert/key are the server's; ca (optional) verifies client certificates, which
    are then required (mutual TLS). Client side: ca verifies the server; cert/key (optional)
    are the client certificate presented for mutual TLS.
    """

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    server_name: str | None = None  # client side: the name the server certificate must carry

    def read(self, name: str, field: str) -> bytes | None:
        path = getattr(self, field)
        if path is None:
            return None
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as e:
            raise SecurityError(f"{name}.{field}: cannot read {path}: {e.strerror}") from None

    def server_credentials(self, name: str) -> grpc.ServerCredentials:
        cert, key, ca = self.read(name, "cert_file"), self.read(name, "key_file"), self.read(name, "ca_file")
        if cert is None or key is None:
            raise SecurityError(f"{name}: a TLS server needs cert_file and key_file")
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self, name: str) -> grpc.ChannelCredentials:
        cert, key = self.read(name, "cert_file"), self.read(name, "key_file")
        if (cert is None) != (key is None):
            raise SecurityError(f"{name}: a client certificate needs both cert_file and key_file")
        return grpc.ssl_channel_credentials(self.read(name, "ca_file"), key, cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def secure_channel(address: str, tls: TlsFiles | None, name: str = "tls") -> grpc.Channel:
    """A (synchronous) channel to `address`: TLS with `tls`, plaintext when None."""
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.channel_credentials(name), options=tls.channel_options())


def bind(server, address: str, tls: TlsFiles | None, name: str = "tls") -> int:
    """Add a TLS (or, when tls is None, plaintext) port to a grpc(.aio) server; the bound port."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials(name))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuth:
    """Bearer tokens accepted on Generate: `authorization: Bearer <token>` call metadata."""

    def __init__(self, token_file: str, name: str = "security.auth_token_file"):
        try:
            lines = Path(token_file).expanduser().read_text().splitlines()
        except OSError as e:
            raise SecurityError(f"{name}: cannot read {token_file}: {e.strerror}") from None
        tokens = [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
        if not tokens:
            raise SecurityError(f"{name}: {token_file} holds no token (one per line)")
        self._digests = [_digest(t) for t in tokens]

    def check(self, metadata) -> None:
        """Raise AuthError unless the call metadata carries one of the tokens."""
        value = next((v for k, v in (metadata or ()) if k.lower() == "authorization"), None)
        if value is None:
            raise AuthError("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = str(value).partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("the authorization metadata must read 'Bearer <token>'")
        given, valid = _digest(token.strip()), False
        for d in self._digests:  # every digest, so the time says nothing about which one matched
            valid |= hmac.compare_digest(given, d)
        if not valid:
            raise AuthError("invalid token")

    def __repr__(self) -> str:  # never the tokens, not even their digests
        return f"TokenAuth({len(self._digests)} tokens)"
