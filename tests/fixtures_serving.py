"""Serving fixtures: real servers on loopback ports, real MNIST digits.

`ThreadServer` runs the real Network3Server on its own event loop in a background thread, so
a test talks to it over gRPC like any client and can still read its counters.  `ProcessServer`
(serving.launch.ServerProcess) starts `python -m serving.server` as a subprocess, for signals
(SIGTERM, SIGHUP) and for tritonclient, whose generated `inference.*` messages cannot share a
process with ours.
"""
from __future__ import annotations

import asyncio
import datetime
import io
import threading
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.launch import ServerProcess as ProcessServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def digits(mnist):
    """The first 64 MNIST test digits: (uint8 [64, 28, 28], labels [64])."""
    return mnist.test_x[:64], mnist.test_y[:64].astype(int)


def png(pixels: np.ndarray, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", **kw)
    return buf.getvalue()


class ThreadServer:
    def __init__(self, options) -> None:
        from serving.server import Network3Server

        self.options = options
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-server")
        self.thread.start()
        self.server = Network3Server(options)
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"
        self.http_port = self.server.http_port  # None when started with http_port=None
        self.http_url = self.server.http_url

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def stats(self):
        return self.server.stats

    def channel(self, **kw) -> grpc.Channel:
        return grpc.insecure_channel(self.address, **kw)

    def close(self) -> None:
        self.call(self.server.stop(grace=5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextmanager
def thread_server(model: Path, **kw):
    """A real server for one test: ServerOptions fields and BatcherOptions/Limits as dicts.
    HTTP listens on a free port (http_port=0) unless http_port=None is given."""
    from serving.api.common import Limits
    from serving.batcher import BatcherOptions
    from serving.model import ModelOptions
    from serving.server import ServerOptions

    batcher = BatcherOptions(**kw.pop("batcher", {}))
    limits = Limits(**kw.pop("limits", {}))
    options = ServerOptions(model=Path(model), port=0, http_port=kw.pop("http_port", 0), batcher=batcher, limits=limits,
                            model_options=ModelOptions(), access_log=kw.pop("access_log", False), **kw)
    server = ThreadServer(options)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def server(onnx_model):
    """One shared server for the many small tests: small limits so they are cheap to hit.
    Session-scoped, so it serves the `onnx_model` of the first folder that asks: only
    tests/serving uses it (tests/training would need a module-scoped one of its own)."""
    with thread_server(onnx_model, metrics_port=0, access_log=True,
                       limits={"max_pixels": 1_000_000, "max_message_bytes": 4 * 1024 * 1024,
                               "max_images_per_request": 256}) as s:
        yield s


@pytest.fixture
def process_server(onnx_model, tmp_path):
    """Factory: process_server(*cli_args, model=...) -> ProcessServer, killed after the test."""
    started = []

    def start(*args: str, model: Path | None = None) -> ProcessServer:
        s = ProcessServer(model or onnx_model, *args, log=tmp_path / f"server{len(started)}.log")
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A self-signed CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def make_pki(out: Path) -> Path:
    """Write ca.crt/.key, server.crt/.key (for 127.0.0.1 and localhost) and client.crt/.key, a new
    CA each call, into the folder `out`; return it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    import ipaddress

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer_name=None, issuer_key=None, ca=False, san=None, usage=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = b.sign(issuer_key or key, hashes.SHA256())
        (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        return cert, key

    ca_cert, ca_key = make("ca", ca=True)
    make("server", ca_cert.subject, ca_key, san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
         usage=ExtendedKeyUsageOID.SERVER_AUTH)
    make("client", ca_cert.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return out
