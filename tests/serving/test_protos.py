"""The committed gRPC stubs are what `make protos` generates from the committed .proto files."""
from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "protos").rglob("*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def test_protos_found():
    assert set(PROTOS) >= {
        "protos/network3/v1/classifier.proto",
        "protos/inference/grpc_service.proto",
        "protos/inference/model_config.proto",
    }


def test_committed_stubs_are_fresh(tmp_path):
    # The same command as the Makefile's `protos` target, into a scratch folder.
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *PROTOS],
        cwd=ROOT, check=True,
    )
    stale = []
    for proto in PROTOS:
        for suffix in SUFFIXES:
            name = proto.removesuffix(".proto") + suffix
            if not (ROOT / name).exists() or not filecmp.cmp(tmp_path / name, ROOT / name, shallow=False):
                stale.append(name)
    assert not stale, f"stale or missing generated stubs {stale}: run `make protos` and commit them"


def test_stubs_import_as_packages():
    from protos.inference import grpc_service_pb2, grpc_service_pb2_grpc  # noqa: F401
    from protos.network3.v1 import classifier_pb2, classifier_pb2_grpc

    image = classifier_pb2.Image(pixels=bytes(784), id="a")
    assert image.WhichOneof("data") == "pixels"
    assert hasattr(classifier_pb2_grpc, "DigitClassifierStub")
    assert grpc_service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number == 7
