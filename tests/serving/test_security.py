"""Security checks beyond test_server.py (TLS, mTLS without a certificate, token on four RPCs,
plain text to a TLS port) and test_data.py (a malicious pickle refused on its hash):

- the default bind is loopback, for gRPC and for metrics;
- every RPC of both APIs, streams included, needs the token (missing, wrong, malformed), and a
  refused call never reaches the request parser; health and reflection stay open;
- tokens (right or wrong) never reach the server's log or the client's error message;
- mutual TLS refuses a client certificate from another CA;
- an ONNX file cannot make the server read another file (external data).
A checkpoint that carries code: tests/training/test_checkpoint_safety.py.  See SECURITY.md for the threat model.
"""
from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fixtures_serving import ROOT, thread_server
from protos.inference import grpc_service_pb2 as v2
from protos.network3.v1 import classifier_pb2 as pb

T = 30
TOKEN = "s3cret-Token_0123456789"
SERVICES = [pb.DESCRIPTOR.services_by_name["DigitClassifier"], v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]]
METHODS = [(f"/{s.full_name}/{m.name}", m) for s in SERVICES for m in s.methods]


# ------------------------------------------------------------------------ loopback bind --

def listening(port: int) -> list[str]:
    """The local addresses (hex, as in /proc/net/tcp*) listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hexport = local.partition(":")
                if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                    found.append(address)
    return found


def test_default_bind_is_loopback_for_grpc_and_metrics(process_server):
    s = process_server("--metrics-port", "0")  # no --host
    metrics_port = int(s.wait_for_log(r"metrics on :(\d+)/metrics").group(1))
    for port in (s.port, metrics_port):
        # 127.0.0.1 only (grpc may bind it as the IPv4-mapped ::ffff:127.0.0.1), never 0.0.0.0 or ::
        assert listening(port) in (["0100007F"], ["0000000000000000FFFF00000100007F"]), (port, listening(port))
    from serving.server import ServerOptions, serve_command

    assert ServerOptions(model=Path("m")).host == "127.0.0.1"
    assert next(p for p in serve_command.params if p.name == "host").default == "127.0.0.1"


# ------------------------------------------------------------------------------- tokens --

def _raw_call(channel, path: str, method, payload: bytes, metadata):
    """Call any method with raw bytes (its request need not parse: auth comes first)."""
    if method.client_streaming:
        return list(channel.stream_stream(path)(iter([payload, payload]), timeout=T, metadata=metadata))
    return channel.unary_unary(path)(payload, timeout=T, metadata=metadata)


@pytest.fixture(scope="module")
def token_server(onnx_model, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(f"{TOKEN}\n")
    with thread_server(onnx_model, token_file=token_file) as s:
        yield s


@pytest.mark.parametrize("path,method", METHODS, ids=[p for p, _ in METHODS])
def test_every_rpc_of_both_apis_needs_the_token(token_server, path, method):
    with token_server.channel() as ch:
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", TOKEN)],
                         [("authorization", f"bearer {TOKEN}")], [("authorization", f"Bearer {TOKEN}x")],
                         [("authorization", f"Bearer {TOKEN[:-1]}")], [("authorization", f"Bearer  {TOKEN}")],
                         [("x-api-key", TOKEN)]):
            # Garbage as the request: a refused call must not get as far as parsing it.
            with pytest.raises(grpc.RpcError) as e:
                _raw_call(ch, path, method, b"\xff\xff\xff", metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (path, metadata, e.value.code())
            assert TOKEN not in (e.value.details() or "")
        # With the token the call gets through (to the parser: garbage is INVALID_ARGUMENT).
        with pytest.raises(grpc.RpcError) as e:
            _raw_call(ch, path, method, b"\xff\xff\xff", [("authorization", f"Bearer {TOKEN}")])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, e.value.details())


def test_health_and_reflection_need_no_token(token_server):
    with token_server.channel() as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=T).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

        assert "network3.v1.DigitClassifier" in set(ProtoReflectionDescriptorDatabase(ch).get_services())


def test_tokens_never_reach_the_logs(process_server, tmp_path, sample_dir):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    s = process_server("--token-file", str(token_file), "--log-level", "DEBUG")
    guess = "guessed-Token-987"
    with grpc.insecure_channel(s.address) as ch:
        for metadata in ([("authorization", f"Bearer {guess}")], [("authorization", f"Bearer {TOKEN}")]):
            try:
                ch.unary_unary("/network3.v1.DigitClassifier/GetModelInfo")(b"", timeout=T, metadata=metadata)
            except grpc.RpcError:
                pass
    # The client's one-line error for a wrong token does not echo it either.
    wrong = tmp_path / "wrong"
    wrong.write_text(guess)
    exe = Path(sys.executable).with_name("network3")
    r = subprocess.run([str(exe), "classify", str(sample_dir / "4"), "--server", s.address, "--token-file", str(wrong)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 3 and guess not in r.stderr + r.stdout, r.stderr
    s.wait_for_log("UNAUTHENTICATED")
    s.signal(15)
    assert s.wait(T) == 0
    log = s.log()
    assert "code=OK" in log  # the right token's call is in the access log...
    assert TOKEN not in log and guess not in log  # ...but no token is


# ----------------------------------------------------------------------------- mutual TLS --

def _pki(out: Path) -> None:
    """Two CAs: ours (server and client certificates) and a rogue one (a client certificate)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer=None, ca=False, san=None, usage=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = b.sign(issuer_key, hashes.SHA256())
        (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        return cert, key

    ca = make("ca", ca=True)
    rogue = make("rogue-ca", ca=True)
    make("server", ca, san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
         usage=ExtendedKeyUsageOID.SERVER_AUTH)
    make("client", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    make("rogue-client", rogue, usage=ExtendedKeyUsageOID.CLIENT_AUTH)


def test_mutual_tls_refuses_a_certificate_from_another_ca(onnx_model, tmp_path, digits):
    _pki(tmp_path)
    request = pb.ClassifyRequest(images=[pb.Image(pixels=digits[0][0].tobytes())])

    def channel(address, client):
        creds = grpc.ssl_channel_credentials((tmp_path / "ca.crt").read_bytes(), (tmp_path / f"{client}.key").read_bytes(),
                                             (tmp_path / f"{client}.crt").read_bytes())
        return grpc.secure_channel(address, creds)

    with thread_server(onnx_model, tls_cert=tmp_path / "server.crt", tls_key=tmp_path / "server.key",
                       tls_client_ca=tmp_path / "ca.crt") as s:
        classify = "/network3.v1.DigitClassifier/Classify"
        with channel(s.address, "rogue-client") as ch:
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(classify)(request.SerializeToString(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with channel(s.address, "client") as ch:
            assert pb.ClassifyResponse.FromString(ch.unary_unary(classify)(request.SerializeToString(), timeout=T)).predictions
        # A client that does not trust the server's CA refuses it (no silent fallback).
        creds = grpc.ssl_channel_credentials((tmp_path / "rogue-ca.crt").read_bytes())
        with grpc.secure_channel(s.address, creds) as ch:
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(classify)(request.SerializeToString(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------- files that carry code --

@pytest.mark.parametrize("location", ["/etc/passwd", "../../../../../../etc/hostname", "weights.bin"])
def test_onnx_external_data_cannot_read_other_files(tmp_path, location):
    """An ONNX initializer may keep its values in an external file; the server loads a model from
    its bytes, so a model that points at one (/etc/passwd as weights...) is refused."""
    import numpy as np
    from onnx import TensorProto, helper

    from serving.errors import BadModel
    from serving.model import load_model

    (tmp_path / "weights.bin").write_bytes(np.ones((784, 10), np.float32).tobytes())
    w = helper.make_tensor("w", TensorProto.FLOAT, [784, 10], np.zeros(7840, np.float32))
    w.ClearField("float_data")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(7840 * 4))):
        w.external_data.add(key=key, value=value)
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 784])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["images", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)], "external",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])], initializer=[w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BadModel, match="xternal data") as e:
        load_model(path)
    assert str(path) in str(e.value)
