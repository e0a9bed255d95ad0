"""Credentials that rotate (issue 17): SIGHUP re-reads the token file and the TLS certificate, key
and client CA as well as the model, each swapped only after it loaded; a bad file keeps the old
one serving, with one ERROR line.  Real servers, real files, real clients: a process server
with a real SIGHUP, a thread server where a test reads what reload() returns and logs.

Files are replaced as Kubernetes replaces a Secret's: written aside, then renamed over.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from fixtures_serving import ROOT, make_pki, thread_server
from protos.network3.v1 import classifier_pb2 as pb

T = 30  # seconds: every call and every wait has a deadline
CLASSIFY = "/network3.v1.DigitClassifier/Classify"
REFUSED = "refused"
FILES = ("server.crt", "server.key", "ca.crt")  # what the server reads: its certificate, key and client CA


@pytest.fixture(scope="module")
def classify_request(mnist) -> bytes:
    return pb.ClassifyRequest(images=[pb.Image(pixels=mnist.test_x[0].tobytes())]).SerializeToString()


def replace(path: Path, data: bytes | None) -> None:
    """Write `data` over `path` whole (None: remove it)."""
    if data is None:
        path.unlink()
        return
    aside = path.with_name(f".{path.name}.new")
    aside.write_bytes(data)
    os.replace(aside, path)


def install(pki: Path, secret: Path) -> None:
    """The server's files in `secret` become `pki`'s server certificate, key and CA (as client CA)."""
    secret.mkdir(exist_ok=True)
    for name in FILES:
        replace(secret / name, (pki / name).read_bytes())


def tls_args(secret: Path) -> dict:
    return {"tls_cert": secret / "server.crt", "tls_key": secret / "server.key", "tls_client_ca": secret / "ca.crt"}


def sha256_of(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


def grpc_call(address: str, request: bytes, token: str | None = None, trust: Path | None = None,
              client: Path | None = None):
    """One Classify on a new connection: its status code (plain text unless `trust` names a
    pki whose CA the client trusts, alone; `client`: the pki whose client certificate it shows)."""
    if trust is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(
            (trust / "ca.crt").read_bytes(), (client / "client.key").read_bytes() if client else None,
            (client / "client.crt").read_bytes() if client else None))
    with channel:
        try:
            channel.unary_unary(CLASSIFY)(request, timeout=T, metadata=[("authorization", f"Bearer {token}")] if token else None)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def http_call(port: int, token: str | None = None, trust: Path | None = None, client: Path | None = None,
              host: str = "127.0.0.1"):
    """GET /v2/models/network3 (it needs the token) on a new connection: (status, sha256 of the
    server's certificate or None), or REFUSED when the TLS handshake fails either way.  `host`:
    "localhost" sends a server name (SNI), an address none."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if trust is None:
        conn = http.client.HTTPConnection(host, port, timeout=T)
    else:
        context = ssl.create_default_context(cafile=str(trust / "ca.crt"))
        if client is not None:
            context.load_cert_chain(client / "client.crt", client / "client.key")
        conn = http.client.HTTPSConnection(host, port, timeout=T, context=context)
    try:
        conn.request("GET", "/v2/models/network3", headers=headers)
        status = conn.getresponse().status
        served = conn.sock.getpeercert(binary_form=True) if trust is not None else None
        return status, served and hashlib.sha256(served).hexdigest()
    except (ssl.SSLError, ConnectionError, http.client.HTTPException):
        return REFUSED
    finally:
        conn.close()


def sighup(s) -> str:
    """SIGHUP the process server `s` and wait until its reload has ended (the model comes last,
    after the token and TLS files); the log it wrote meanwhile."""
    start = len(s.log())
    s.signal(signal.SIGHUP)
    deadline = time.monotonic() + T
    while not re.search(r"reloaded \S+: sha256|model reload failed", s.log()[start:]):
        assert time.monotonic() < deadline, f"no reload in the log within {T} s:\n{s.log()[-3000:]}"
        time.sleep(0.05)
    return s.log()[start:]


def errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


def never_restarted(s) -> None:
    assert s.poll() is None and s.log().count("network3 serving on") == 1


# ---------------------------------------------------------------------------- with SIGHUP --

def test_sighup_rotates_the_token_without_a_restart(process_server, tmp_path, classify_request):
    token = tmp_path / "token"
    token.write_text("old-token\n")
    s = process_server("--token-file", str(token))
    grpc_ = lambda t: grpc_call(s.address, classify_request, t)  # noqa: E731
    http_ = lambda t: http_call(s.http_port, t)[0]  # noqa: E731
    assert (grpc_("old-token"), http_("old-token")) == (grpc.StatusCode.OK, 200)
    assert (grpc_("new-token"), http_("new-token")) == (grpc.StatusCode.UNAUTHENTICATED, 401)

    replace(token, b"new-token\n")
    log = sighup(s)
    assert f"reloaded token from {token}" in log and not errors(log), log
    assert (grpc_("new-token"), http_("new-token")) == (grpc.StatusCode.OK, 200)
    assert (grpc_("old-token"), http_("old-token")) == (grpc.StatusCode.UNAUTHENTICATED, 401)

    # A bad token file keeps the token of the last good one (and the model still reloads).
    for data, why in ((b"\n", "is empty"), (b"\xff\xfe\x00 binary", "printable ASCII"),
                      (None, "No such file or directory")):
        replace(token, data)
        log = sighup(s)
        [line] = errors(log)  # one ERROR line, and only that one
        assert f"token reload failed, still accepting the old token: --token-file {token}" in line and why in line, log
        assert re.search(r"reloaded \S+: sha256", log), log
        assert (grpc_("new-token"), http_("new-token")) == (grpc.StatusCode.OK, 200)
    never_restarted(s)


def test_sighup_rotates_the_certificate_and_the_client_ca(process_server, tmp_path, classify_request):
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    secret = tmp_path / "secret"
    install(old, secret)
    s = process_server(*(a for k, v in tls_args(secret).items() for a in (f"--{k.replace('_', '-')}", str(v))))
    assert s.http_url.startswith("https://")

    def both(trust, client):
        return grpc_call(s.address, classify_request, trust=trust, client=client), http_call(s.http_port, trust=trust, client=client)

    assert both(old, old) == (grpc.StatusCode.OK, (200, sha256_of(old / "server.crt")))
    assert both(new, new) == (grpc.StatusCode.UNAVAILABLE, REFUSED)  # a client of the new CA does not trust it yet

    install(new, secret)
    log = sighup(s)
    assert (f"reloaded TLS {secret / 'server.crt'}: certificate sha256 "
            f"{sha256_of(old / 'server.crt')[:12]} -> {sha256_of(new / 'server.crt')[:12]}") in log and not errors(log), log
    assert both(new, new) == (grpc.StatusCode.OK, (200, sha256_of(new / "server.crt")))
    assert http_call(s.http_port, trust=new, client=new, host="localhost") == (200, sha256_of(new / "server.crt"))
    assert both(old, old) == (grpc.StatusCode.UNAVAILABLE, REFUSED)  # the old CA's clients no longer trust the server
    assert both(new, old) == (grpc.StatusCode.UNAVAILABLE, REFUSED)  # and the old CA's client certificates are refused
    never_restarted(s)


# ---------------------------------------------------------------------------- bad files --

def _garbage_pem(label: str) -> bytes:
    return f"-----BEGIN {label}-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END {label}-----\n".encode()


# case: (file, what is written over it, what the one ERROR line says)
BAD_TLS = {
    "mismatched pair": ("server.key", lambda other: (other / "server.key").read_bytes(), "is not the key of --tls-cert"),
    "garbage certificate": ("server.crt", lambda other: b"garbage\n", "holds no PEM certificate"),
    "corrupt certificate": ("server.crt", lambda other: _garbage_pem("CERTIFICATE"), "cannot load them"),
    "garbage key": ("server.key", lambda other: _garbage_pem("PRIVATE KEY"), "cannot load them"),
    "empty key": ("server.key", lambda other: b"", "is empty"),
    "missing certificate": ("server.crt", lambda other: None, "No such file or directory"),
    "garbage client CA": ("ca.crt", lambda other: _garbage_pem("CERTIFICATE"), "--tls-client-ca"),
}


@pytest.mark.parametrize("case", BAD_TLS)
def test_a_bad_tls_file_keeps_the_old_certificate(onnx_model, tmp_path, classify_request, caplog, case):
    """The bad file keeps the old certificate, key and client CA on both listeners, with one ERROR
    line; the token and the model of the same reload still rotate; and once the files are good
    again the next reload serves them."""
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    secret = tmp_path / "secret"
    install(old, secret)
    token = tmp_path / "token"
    token.write_text("old-token")
    caplog.set_level(logging.INFO, logger="network3.server")
    with thread_server(onnx_model, token_file=token, **tls_args(secret)) as s:
        name, data, why = BAD_TLS[case]
        install(new, secret)
        replace(secret / name, data(old))  # the rest of the new files is good: nothing of them may serve
        replace(token, b"new-token")
        caplog.clear()
        assert s.call(s.server.reload()) is False
        bad = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(bad) == 1 and "\n" not in bad[0], bad
        assert bad[0].startswith(f"TLS reload failed, still serving certificate sha256 {sha256_of(old / 'server.crt')[:12]}: ")
        assert str(secret / name) in bad[0] and why in bad[0], bad[0]
        assert any(r.getMessage().startswith(f"reloaded {onnx_model}: sha256") for r in caplog.records)
        served = (grpc.StatusCode.OK, (200, sha256_of(old / "server.crt")))
        assert (grpc_call(s.address, classify_request, "new-token", old, old),
                http_call(s.http_port, "new-token", old, old)) == served
        assert grpc_call(s.address, classify_request, "old-token", old, old) == grpc.StatusCode.UNAUTHENTICATED

        install(new, secret)
        assert s.call(s.server.reload()) is True
        assert (grpc_call(s.address, classify_request, "new-token", new, new),
                http_call(s.http_port, "new-token", new, new)) == (grpc.StatusCode.OK, (200, sha256_of(new / "server.crt")))


@pytest.mark.parametrize("bad", ["token", "model"])
def test_each_file_reloads_on_its_own(onnx_model, tmp_path, classify_request, caplog, bad):
    """A bad token file or model file fails its own part of the reload only: the others rotate."""
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    secret = tmp_path / "secret"
    install(old, secret)
    token, model = tmp_path / "token", tmp_path / "model.onnx"
    token.write_text("old-token")
    shutil.copy(onnx_model, model)
    caplog.set_level(logging.INFO, logger="network3.server")
    with thread_server(model, token_file=token, tls_cert=secret / "server.crt", tls_key=secret / "server.key") as s:
        sha256 = s.server.serving.model.sha256
        install(new, secret)
        replace(token, b"" if bad == "token" else b"new-token")
        if bad == "model":
            replace(model, onnx_model.read_bytes()[:1000])
        caplog.clear()
        assert s.call(s.server.reload()) is False
        bad_lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(bad_lines) == 1 and bad_lines[0].startswith(
            "token reload failed, still accepting the old token" if bad == "token" else
            f"model reload failed, still serving sha256 {sha256[:12]}"), bad_lines
        expected_token = "old-token" if bad == "token" else "new-token"
        assert grpc_call(s.address, classify_request, expected_token, new) == grpc.StatusCode.OK
        assert http_call(s.http_port, expected_token, new) == (200, sha256_of(new / "server.crt"))
        assert s.server.serving.model.sha256 == sha256
        assert any(r.getMessage().startswith(f"reloaded {model}: sha256") for r in caplog.records) == (bad == "token")
        assert any(r.getMessage().startswith("reloaded TLS") for r in caplog.records)


@pytest.mark.parametrize("case", ["mismatched pair", "garbage certificate", "empty key"])
def test_serve_with_a_bad_tls_file_exits_with_one_line(onnx_model, tmp_path, case):
    old, other = make_pki(tmp_path / "old"), make_pki(tmp_path / "other")
    name, data, why = BAD_TLS[case]
    replace(old / name, data(other))
    # `-m serving.server` from ROOT: this source tree's server, wherever the `network3` script points.
    r = subprocess.run([sys.executable, "-m", "serving.server", "--model", str(onnx_model), "--port", "0", "--http-port", "0",
                        "--tls-cert", str(old / "server.crt"), "--tls-key", str(old / "server.key")],
                       cwd=ROOT, capture_output=True, text=True, timeout=T)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: --tls-"), r.stderr
    assert str(old / name) in lines[0] and why in lines[0], r.stderr


def test_files_that_change_while_being_read_are_not_swapped_in(tmp_path, monkeypatch):
    """The HTTP context reads the files by name and grpc gets the bytes read before: a file
    replaced in between (a rotation under way) fails the reload rather than give the two
    listeners different certificates."""
    from serving.credentials import CredentialError, Tls

    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    secret = tmp_path / "secret"
    install(old, secret)
    tls = Tls(secret / "server.crt", secret / "server.key")
    load_cert_chain = ssl.SSLContext.load_cert_chain

    def rotated_meanwhile(context, *args, **kw):
        load_cert_chain(context, *args, **kw)
        install(new, secret)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", rotated_meanwhile)
    with pytest.raises(CredentialError, match="changed while being read"):
        tls.reload()
    monkeypatch.undo()
    assert tls.sha256 == sha256_of(old / "server.crt")
    assert tls.reload() == sha256_of(new / "server.crt")


# ------------------------------------------------------------------------ without a signal --

def kubernetes_secret(volume: Path, files: dict[str, bytes], version: int) -> None:
    """Write a Secret's files as the kubelet does: a new timestamped folder, then `..data`
    re-pointed at it by one rename; each file is a symlink through `..data`."""
    folder = volume / f"..{version}"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
        if not (volume / name).is_symlink():
            (volume / name).symlink_to(Path("..data") / name)
    (volume / "..data_tmp").symlink_to(folder.name)
    os.replace(volume / "..data_tmp", volume / "..data")


def test_watch_interval_reloads_a_secret_the_kubelet_updated(process_server, tmp_path, classify_request):
    volume = tmp_path / "secret"
    kubernetes_secret(volume, {"token": b"old-token\n"}, 1)
    s = process_server("--token-file", str(volume / "token"), "--watch-interval", "0.1")
    assert grpc_call(s.address, classify_request, "old-token") == grpc.StatusCode.OK
    start = len(s.log())
    kubernetes_secret(volume, {"token": b"new-token\n"}, 2)
    deadline = time.monotonic() + T
    while not re.search(r"reloaded \S+: sha256", s.log()[start:]):  # the model reloads last
        assert time.monotonic() < deadline, s.log()[-3000:]
        time.sleep(0.05)
    log = s.log()[start:]
    assert f"changed on disk: {volume / 'token'}: reloading" in log and f"reloaded token from {volume / 'token'}" in log
    assert grpc_call(s.address, classify_request, "new-token") == grpc.StatusCode.OK
    assert http_call(s.http_port, "old-token")[0] == 401
    # Nothing changed since: no reload across ten intervals.
    quiet = len(s.log())
    time.sleep(1.0)
    assert "reloading" not in s.log()[quiet:]
    never_restarted(s)
