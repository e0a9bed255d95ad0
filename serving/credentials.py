"""The server's credentials, read from their files at start and again on SIGHUP (Kubernetes
rotates a Secret's files in place): the bearer token (--token-file) and the TLS certificate,
key and client CA (--tls-cert, --tls-key, --tls-client-ca).

Each is replaced only by one that loaded whole: `reload()` raises CredentialError (one line
naming the file) and the old one stays.  The new token applies to the next call, the new
certificate and client CA to the next full handshake: connections already open keep what they
were accepted with, and so does a TLS session an HTTPS client resumes (OpenSSL keeps the first
context's session cache and ticket keys; grpc starts afresh).
"""
from __future__ import annotations

import hashlib
import hmac
import re
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc


class CredentialError(Exception):
    """A token or TLS file that cannot be used; one line, naming the file."""


def _read(option: str, path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CredentialError(f"{option} {path}: {e.strerror or e}") from None
    if not data.strip():
        raise CredentialError(f"{option} {path} is empty")
    return data


# ------------------------------------------------------------------------------------ token --

class Token:
    """The token every call must send as `authorization: Bearer <token>`: one object that gRPC's
    interceptor (server.TokenAuth) and HTTP's middleware (api.http) both ask, replaced by
    `reload()`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._expected = self._load()

    def _load(self) -> bytes:
        token = _read("--token-file", self.path).strip()
        # What an HTTP header and gRPC metadata can carry: another token could never match.
        if not re.fullmatch(rb"[\x20-\x7e]+", token):
            raise CredentialError(f"--token-file {self.path}: the token must be printable ASCII")
        return b"Bearer " + token

    def matches(self, authorization: bytes) -> bool:
        """Is `authorization` (the header or metadata value as sent) `Bearer <token>`?"""
        return hmac.compare_digest(authorization, self._expected)  # constant time

    def reload(self) -> bool:
        """Read the file again (CredentialError: the old token stays).  True if the token changed."""
        new = self._load()
        changed = not hmac.compare_digest(new, self._expected)
        self._expected = new
        return changed


# -------------------------------------------------------------------------------------- TLS --

@dataclass(frozen=True)
class _Loaded:
    """One certificate, key and client CA, checked: the HTTP side's context, gRPC's
    configuration, and the certificate's sha256 (for the log)."""

    context: ssl.SSLContext
    config: object  # grpc.ServerCertificateConfiguration
    sha256: str


class Tls:
    """--tls-cert, --tls-key and --tls-client-ca for both listeners, replaced by `reload()`.

    gRPC: `grpc_credentials()` are grpc's dynamic SSL credentials, whose fetcher grpc calls
    before each handshake; it hands over a reloaded configuration once (None otherwise:
    unchanged).  HTTP: `http_context()` is the first context, whose SNI callback (OpenSSL calls
    it for every ClientHello, with or without a server name) switches each new connection to
    the current context.  So a reload swaps a whole context: never a new certificate with an
    old key, nor the old client CA beside the new one.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key = Path(cert), Path(key)
        self.client_ca = Path(client_ca) if client_ca else None
        self._lock = threading.Lock()  # grpc's fetcher runs on grpc's own threads
        self._current = self._load()
        self._pending = None  # a configuration grpc has not fetched yet
        self._front = self._current.context
        self._front.sni_callback = self._handshake

    def _load(self) -> _Loaded:
        files = [("--tls-cert", self.cert), ("--tls-key", self.key)]
        if self.client_ca is not None:
            files.append(("--tls-client-ca", self.client_ca))
        before = [_read(option, path) for option, path in files]
        try:
            sha256 = _sha256(before[0])
        except ValueError:
            raise CredentialError(f"--tls-cert {self.cert} holds no PEM certificate") from None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            # password: an encrypted key fails here instead of asking a terminal for its password.
            context.load_cert_chain(self.cert, self.key, password=b"")
        except (OSError, ValueError) as e:
            if getattr(e, "reason", None) == "KEY_VALUES_MISMATCH":
                raise CredentialError(f"--tls-key {self.key} is not the key of --tls-cert {self.cert}") from None
            raise CredentialError(f"--tls-cert {self.cert} with --tls-key {self.key}: cannot load them "
                                  f"(PEM certificate chain and unencrypted PEM key): {_reason(e)}") from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ValueError) as e:
                raise CredentialError(f"--tls-client-ca {self.client_ca}: {_reason(e)}") from None
            context.verify_mode = ssl.CERT_REQUIRED
        # grpc gets the bytes read above; the context read the files itself: they must be the same.
        if [_read(option, path) for option, path in files] != before:
            raise CredentialError(f"{', '.join(str(p) for _, p in files)} changed while being read: reload again")
        cert, key, *ca = before
        config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca[0] if ca else None)
        return _Loaded(context, config, sha256)

    @property
    def sha256(self) -> str:
        """The sha256 of the certificate new handshakes get (its first one, DER)."""
        return self._current.sha256

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._current.config, self._fetch,
                                                   require_client_authentication=self.client_ca is not None)

    def http_context(self) -> ssl.SSLContext:
        return self._front

    def reload(self) -> str:
        """Read the files again and check them (CredentialError: the old ones stay); new handshakes
        then get the new certificate.  Returns its sha256."""
        loaded = self._load()
        with self._lock:
            self._current, self._pending = loaded, loaded.config
        return loaded.sha256

    def _fetch(self):
        with self._lock:
            config, self._pending = self._pending, None
        return config

    def _handshake(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self._current.context
        if connection.context is not current:
            connection.context = current


def _sha256(pem: bytes) -> str:
    """The sha256 of the first PEM certificate in `pem` (ValueError: none)."""
    m = re.search(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    if m is None:
        raise ValueError("no PEM certificate")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(m.group(0).decode("ascii"))).hexdigest()


def _reason(e: Exception) -> str:
    """An ssl error's reason without its source line: `[X509: ...] no certificate or crl found`."""
    return re.sub(r" \(_ssl\.c:\d+\)$", "", getattr(e, "strerror", None) or str(e))
