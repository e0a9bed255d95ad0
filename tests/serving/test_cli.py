"""`network3` (serving/cli.py): usage errors and formats with CliRunner, real servers for
classify over files, folders, globs, IDX and stdin; exit codes 0/1/2/3 with one-line messages."""
from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from serving.classifier import Classifier, ClientError, Prediction
from serving.cli import cli

ROOT = Path(__file__).resolve().parents[2]


def run(*args, input=None, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def png_files(mnist, folder: Path, n: int, start: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"{i:05d}.png"
        Image.fromarray(mnist.test_x[i]).save(p)
        paths.append(p)
    return paths


# ---- usage: exit 2, one line, before any work ----

@pytest.mark.parametrize("args,message", [
    (["classify"], "Missing argument"),
    (["classify", "/no/such/file.png"], "no such file or folder"),
    (["classify", "/no/such/*.png"], "no files match"),
    (["classify", "x", "--format", "xml"], "Invalid value for '--format'"),
    (["classify", "x", "--top-k", "11"], "Invalid value for '--top-k'"),
    (["classify", "x", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["classify", "-", "-"], "once"),
    (["health", "--timeout", "0"], "Invalid value for '--timeout'"),
    (["info", "--server", ""], "Invalid value for '--server'"),
    (["health", "--server", "local host:1"], "Invalid value for '--server'"),
    (["nonsense"], "No such command"),
])
def test_usage_errors_exit_2(args, message, tmp_path):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_bad_option_values_from_the_environment_and_files(tmp_path):
    r = CliRunner().invoke(cli, ["health"], env={"NETWORK3_TIMEOUT": "0"})
    assert r.exit_code == 2 and "Invalid value for '--timeout'" in r.output
    empty = tmp_path / "token"
    empty.write_text("\n")
    r = CliRunner().invoke(cli, ["info"], env={"NETWORK3_TOKEN_FILE": str(empty)})
    assert r.exit_code == 2 and "Invalid value for '--token-file'" in r.output and "is empty" in r.output


def test_tls_cert_needs_its_key(tmp_path, sample_dir):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    r = CliRunner().invoke(cli, ["classify", str(sample_dir), "--tls-cert", str(cert)])
    assert r.exit_code == 2 and "--tls-cert and --tls-key go together" in r.output


def test_version_and_help():
    from serving import __version__

    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.output
    r = run("--help")
    for command in ("classify", "health", "info", "serve"):
        assert command in r.output


# ---- classify against a real server ----

def test_folder_jsonl_with_labels_and_summary(server, sample_dir, mnist, predict):
    r = run("classify", sample_dir, "--server", server.address)
    assert r.exit_code == 0, r.output
    rows = jsonl(r.stdout)
    assert len(rows) == 300
    assert rows == sorted(rows, key=lambda d: d["source"])  # folders walk in sorted order
    want = {f"{i:04d}": int(d) for i, d in enumerate(predict(mnist.test_x[:300]))}
    for d in rows:
        assert set(d) >= {"source", "digit", "confidence", "probabilities", "label"}
        assert d["digit"] == want[Path(d["source"]).stem]
        assert d["label"] == int(Path(d["source"]).parent.name)
        assert d["confidence"] == max(d["probabilities"]) and len(d["probabilities"]) == 10
    correct = sum(d["digit"] == d["label"] for d in rows)
    assert f"accuracy {correct / 300:.2%}: {correct} of 300 labelled images" in r.stderr
    assert "confusion matrix" in r.stderr


def test_csv_and_table_formats(server, sample_dir):
    r = run("classify", sample_dir / "7", "--server", server.address, "--format", "csv", "--top-k", "3")
    assert r.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == len(list((sample_dir / "7").iterdir())) and set(rows[0]) >= {"source", "digit", "confidence", "label", "error", "p0", "p9", "top_k"}
    assert all(row["label"] == "7" for row in rows) and len(rows[0]["top_k"].split()) == 3
    r = run("classify", sample_dir / "1", "--server", server.address, "--format", "table")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["SOURCE", "DIGIT", "CONFIDENCE", "LABEL"]
    assert "accuracy" in r.stdout  # the table carries its own summary
    assert sum(" ok" in line or "WRONG" in line for line in lines) == len(list((sample_dir / "1").iterdir()))


def test_files_globs_and_stdin_keep_input_order(server, sample_dir):
    files = sorted(sample_dir.glob("*/*.png"))
    picked = [files[5], files[0], files[200]]
    r = run("classify", *picked, "--server", server.address)
    assert r.exit_code == 0 and [d["source"] for d in jsonl(r.stdout)] == [str(p) for p in picked]
    r = run("classify", str(sample_dir / "[12]" / "*.png"), "--server", server.address)
    assert r.exit_code == 0
    assert [d["source"] for d in jsonl(r.stdout)] == [str(p) for p in files if p.parent.name in "12"]
    stdin = "\n".join(str(p) for p in files[:40]) + "\n\n"
    r = run("classify", "-", "--server", server.address, input=stdin)
    assert r.exit_code == 0 and [d["source"] for d in jsonl(r.stdout)] == [str(p) for p in files[:40]]


def test_top_k(server, sample_dir):
    r = run("classify", sample_dir / "3", "--server", server.address, "--top-k", "2")
    rows = jsonl(r.stdout)
    assert r.exit_code == 0 and len(rows) == len(list((sample_dir / "3").iterdir()))
    for d in rows:  # the two most probable digits, most probable first (printed to 6 places)
        (first, p1), (second, p2) = [(t["digit"], t["confidence"]) for t in d["top_k"]]
        assert first == d["digit"] and first != second and p1 >= p2
        assert abs(d["probabilities"][first] - p1) < 1e-6 and abs(d["probabilities"][second] - p2) < 1e-6
        assert all(v <= p2 + 1e-6 for k, v in enumerate(d["probabilities"]) if k not in (first, second))


def test_idx_test_set_gives_the_models_test_accuracy(server, idx_dir, mnist, predict):
    """All 10,000 test images through the server: exactly the accuracy the model has in-process."""
    expected = float(np.mean(predict(mnist.test_x) == mnist.test_y))
    out = idx_dir / "out.jsonl"
    r = run("classify", idx_dir / "t10k-images-idx3-ubyte", "--server", server.address, "--output", out)
    assert r.exit_code == 0, r.output
    rows = jsonl(out.read_text())
    assert len(rows) == 10000 and rows[17]["source"].endswith("t10k-images-idx3-ubyte#17")
    accuracy = np.mean([d["digit"] == d["label"] for d in rows])
    assert accuracy == expected
    assert f"accuracy {expected:.2%}: {int(round(expected * 10000)):,} of 10,000" in r.stderr


def test_local_matches_the_server(server, onnx_model, sample_dir, tmp_path, mnist):
    (tmp_path / "9").mkdir()
    (tmp_path / "9" / "broken.png").write_bytes(b"\x89PNG not really")
    args = ["classify", sample_dir, tmp_path, "--top-k", "3"]
    remote = jsonl(run(*args, "--server", server.address).stdout)
    local = jsonl(run(*args, "--local", onnx_model).stdout)
    assert len(remote) == len(local) == 301
    for a, b in zip(remote, local):
        assert (a["source"], a.get("digit"), a.get("label")) == (b["source"], b.get("digit"), b.get("label"))
        if "error" in a:
            assert "error" in b
        else:
            assert np.allclose(a["probabilities"], b["probabilities"], atol=1e-5)


def test_decoding_on_the_server_gives_the_same_answers(server, sample_dir, mnist, predict):
    mine = jsonl(run("classify", sample_dir, "--server", server.address).stdout)
    theirs = jsonl(run("classify", sample_dir, "--server", server.address, "--decode", "server").stdout)
    want = {f"{i:04d}": int(d) for i, d in enumerate(predict(mnist.test_x[:300]))}
    assert len(mine) == 300 and [d["digit"] for d in mine] == [d["digit"] for d in theirs]
    assert [d["digit"] for d in mine] == [want[Path(d["source"]).stem] for d in mine]


def test_a_corrupt_file_among_good_ones_exits_1(server, mnist, tmp_path):
    good = png_files(mnist, tmp_path / "5", 30)
    (tmp_path / "5" / "00003.png").write_bytes(b"garbage")  # replaces one good file
    (tmp_path / "5" / "00010.png").write_bytes(b"")
    r = run("classify", tmp_path, "--server", server.address)
    assert r.exit_code == 1
    rows = jsonl(r.stdout)
    assert len(rows) == len(good)
    bad = [d for d in rows if "error" in d]
    assert [Path(d["source"]).name for d in bad] == ["00003.png", "00010.png"]
    assert all("digit" in d for d in rows if "error" not in d)
    assert r.stderr.strip().splitlines()[-1] == "network3: 2 of 30 images could not be classified"


def test_output_file_is_written_whole_or_not_at_all(server, sample_dir, tmp_path, dead_address):
    out = tmp_path / "results.jsonl"
    out.write_text("previous good results\n")
    r = run("classify", sample_dir, "--server", dead_address, "--output", out, "--timeout", "1")
    assert r.exit_code == 3
    assert out.read_text() == "previous good results\n" and list(tmp_path.iterdir()) == [out]
    r = run("classify", sample_dir, "--server", server.address, "--output", out)
    assert r.exit_code == 0 and len(jsonl(out.read_text())) == 300 and list(tmp_path.iterdir()) == [out]


def test_server_and_timeout_from_the_environment(server, sample_dir):
    r = run("classify", sample_dir / "0", env={"NETWORK3_SERVER": server.address, "NETWORK3_TIMEOUT": "5"})
    assert r.exit_code == 0 and len(jsonl(r.stdout)) == len(list((sample_dir / "0").iterdir()))


# ---- health and info ----

def test_health_and_info(server, onnx_model):
    r = run("health", "--server", server.address)
    assert r.exit_code == 0 and "SERVING" in r.output
    assert json.loads(run("health", "--server", server.address, "--json").output)["status"] == "SERVING"
    r = run("info", "--server", server.address)
    assert r.exit_code == 0
    for key in ("sha256", "preset", "test accuracy", "input", "labels", "limits"):
        assert key in r.output
    d = json.loads(run("info", "--server", server.address, "--json").output)
    assert d["path"] == str(onnx_model) and "input" in d["metadata"]


def test_token_from_a_file(onnx_model, tmp_path, sample_dir):
    from fixtures_serving import thread_server

    token = tmp_path / "token"
    token.write_text("hunter2\n")
    with thread_server(onnx_model, token_file=token) as s:
        r = run("classify", sample_dir / "4", "--server", s.address)
        assert r.exit_code == 3 and "refused our credentials" in r.output
        r = run("classify", sample_dir / "4", "--server", s.address, "--token-file", token)
        assert r.exit_code == 0 and len(jsonl(r.stdout)) == len(list((sample_dir / "4").iterdir()))
        assert run("info", "--server", s.address, "--token-file", token).exit_code == 0
        r = run("info", "--server", s.address, "--json", env={"NETWORK3_TOKEN_FILE": str(token)})
        assert r.exit_code == 0 and json.loads(r.output)["name"] == "network3"
        r = run("info", "--server", s.address)
        assert r.exit_code == 3 and "refused our credentials" in r.output


# ---- the real console script: exit 3, one line, no traceback ----

def network3(*args, **kw) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("network3")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT, **kw)


def test_missing_server_exits_3_with_one_line(sample_dir, dead_address):
    for args in (["classify", sample_dir], ["health", "--timeout", "2"], ["info", "--timeout", "2"]):
        p = network3(*args, "--server", dead_address)
        assert p.returncode == 3, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot reach the server" in lines[0] and "Traceback" not in p.stderr


def test_server_lost_mid_job_exits_3_even_with_failed_images(process_server, mnist, tmp_path):
    """3 wins over 1: a corrupt file early, then the server goes away for good.  A job started
    after it went ends with the same code and the same words."""
    files = png_files(mnist, tmp_path / "imgs", 3000)
    files[2].write_bytes(b"junk")
    s = process_server("--no-access-log")
    exe = Path(sys.executable).with_name("network3")
    proc = subprocess.Popen([str(exe), "classify", "-", "--server", s.address, "--timeout", "2", "--batch-size", "16",
                             "--window", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)

    def feed():  # its own thread: the pipes must not fill up both ways at once
        try:
            for f in files:
                proc.stdin.write(f"{f}\n")
                proc.stdin.flush()
            proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    first = proc.stdout.readline()  # the job is under way
    assert json.loads(first)["source"] == str(files[0])
    s.kill()
    out, err = proc.communicate(timeout=60)
    writer.join(10)
    assert proc.returncode == 3, err
    assert "Traceback" not in err and "cannot reach the server" in err.strip().splitlines()[-1]
    start = network3("classify", files[0], "--server", s.address, "--timeout", "2")
    assert start.returncode == proc.returncode, start.stderr
    mid_line, start_line = err.strip().splitlines()[-1], start.stderr.strip().splitlines()[-1]
    assert mid_line.split(" (")[0] == start_line.split(" (")[0] == f"Error: cannot reach the server at {s.address}"


def test_no_progress_line_into_a_pipe(server, sample_dir, monkeypatch):
    from serving import output

    monkeypatch.setattr(output.Progress, "DELAY", 0.0)  # would show from the first image if enabled
    r = run("classify", sample_dir, "--server", server.address)
    assert r.exit_code == 0 and "\r" not in r.stderr and "\x1b" not in r.stderr


def test_forced_progress_line_shows_counts_and_rate_then_clears(server, sample_dir, tmp_path, monkeypatch):
    """--progress on a job under a fake clock (each reading 1/8 s after the last): nothing for the
    first second, then one self-rewriting line per answer with the count, the rate and the
    failures so far, blanked at the end before the summary."""
    from serving import output

    ticks = iter(range(10**6))
    monkeypatch.setattr(output, "time", SimpleNamespace(monotonic=lambda: next(ticks) / 8))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, f in enumerate(sorted(sample_dir.glob("*/*.png"))[:40]):
        (folder / f"{k:04d}.png").write_bytes(f.read_bytes())
    (folder / "0020.png").write_bytes(b"not a png")  # the 21st file fails
    r = run("classify", folder, "--server", server.address, "--progress")
    assert r.exit_code == 1, r.output
    progress, _, rest = r.stderr.rpartition("\r\x1b[K")  # the line is cleared ...
    assert rest.startswith("network3: 1 of 40 images")  # ... before anything else is written
    lines = progress.split("\x1b[K")
    assert lines[-1] == ""
    shown = [re.fullmatch(r"\r([\d,]+) images  ([\d,]+)/s(?:  ([\d,]+) failed)?", line) for line in lines[:-1]]
    assert all(shown), lines[:3]
    counts = [int(m.group(1)) for m in shown]
    # The clock reads 0 at the start and k/8 s at the k-th answer: first shown at one second,
    # then at every answer (1/8 s apart, more than the 0.1 s between redraws).
    assert counts == list(range(8, 41))
    assert {int(m.group(2)) for m in shown} == {8}  # images per second of the fake clock
    assert [m.group(3) for m in shown] == [None] * 13 + ["1"] * 20  # the 21st image failed


def test_tls_options(onnx_model, pki, sample_dir):  # noqa: F811
    from fixtures_serving import thread_server

    with thread_server(onnx_model, tls_cert=pki / "server.crt", tls_key=pki / "server.key",
                       tls_client_ca=pki / "ca.crt") as s:
        tls = ["--tls-ca", pki / "ca.crt", "--tls-cert", pki / "client.crt", "--tls-key", pki / "client.key"]
        r = run("classify", sample_dir / "2", "--server", s.address, *tls)
        assert r.exit_code == 0 and len(jsonl(r.stdout)) == len(list((sample_dir / "2").iterdir()))
        assert run("health", "--server", s.address, *tls).exit_code == 0
        r = run("classify", sample_dir / "2", "--server", s.address, "--tls-ca", pki / "ca.crt", "--timeout", "1")
        assert r.exit_code == 3 and "Traceback" not in r.output


def test_an_empty_folder_says_so(server, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    r = run("classify", tmp_path, "--server", server.address)
    assert r.exit_code == 0 and r.stdout == "" and "no images found" in r.stderr


# ---- one exit code per failure, wherever it happens ----

class Failing(Classifier):
    """A backend whose calls fail with `code`: at the start of a job (info), in the middle of one
    (after three answers), in health or in info."""

    def __init__(self, code: str, where: str):
        self.code, self.where, self.address = code, where, "fake:1"

    def close(self):
        pass

    def fail(self):
        return ClientError(self.code, "boom", self.address)

    def health(self, service="", timeout=None):
        raise self.fail()

    def info(self, timeout=None):
        if self.where != "mid-job":
            raise self.fail()
        return {"limits": {}}

    def classify_stream(self, images, *, batch_size=64, window=8, top_k=None, max_request_bytes=None):
        for i, _ in enumerate(images):
            if i == 3:
                raise self.fail()
            yield Prediction(digit=1, probability=1.0, probabilities=[0.0, 1.0] + [0.0] * 8, label="1")


@pytest.mark.parametrize("code", ["UNAVAILABLE", "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "PERMISSION_DENIED",
                                  "INTERNAL", "RESOURCE_EXHAUSTED", "NOT_FOUND", "INVALID_ARGUMENT"])
def test_a_failed_call_exits_alike_wherever_it_happens(code, sample_dir, monkeypatch):
    from serving import cli as cli_module

    seen = {}
    for where, args in (("start", ["classify", sample_dir / "1"]), ("mid-job", ["classify", sample_dir / "1"]),
                        ("health", ["health"]), ("info", ["info"])):
        monkeypatch.setattr(cli_module.Connection, "client", lambda self, w=where: Failing(code, w))
        r = CliRunner().invoke(cli, [str(a) for a in args] + ["--server", "fake:1"])
        assert not isinstance(r.exception, Exception), r.output  # an exit, never a traceback
        seen[where] = (r.exit_code, r.stderr.strip().splitlines()[-1])
    assert {c for c, _ in seen.values()} == {3}, seen
    assert all(line.startswith("Error: ") and line.endswith(f"at fake:1 ({code}: boom)")
               for _, line in seen.values()), seen
    assert len({line for _, line in seen.values()}) == 1  # the same words for the same failure


# ---- --local runs without gRPC ----

NO_GRPC = """
import sys
from click.testing import CliRunner
from serving.cli import cli
r = CliRunner().invoke(cli, ["classify", *sys.argv[1:]])
print(r.exit_code, len(r.stdout.splitlines()))
print(sorted({m.split(".")[0] for m in sys.modules} & {"grpc", "grpc_health", "protos"}))
"""


def test_local_never_imports_grpc(onnx_model, sample_dir, dead_address):
    n = len(list((sample_dir / "5").iterdir()))
    p = subprocess.run([sys.executable, "-c", NO_GRPC, "--local", str(onnx_model), str(sample_dir / "5")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines() == [f"0 {n}", "[]"]
    # The check can fail: a job against a server (here, none listening) does load grpc.
    p = subprocess.run([sys.executable, "-c", NO_GRPC, "--server", dead_address, "--timeout", "1",
                        str(sample_dir / "5")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.stdout.splitlines() == ["3 0", "['grpc', 'grpc_health', 'protos']"], p.stderr[-2000:]
