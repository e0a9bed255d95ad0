"""`network3` (serving/cli.py): usage errors and formats with CliRunner, real servers for
classify over files, folders, globs, IDX and stdin; exit codes 0/1/2/3 with one-line messages."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fixtures_client import free_port
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
    (["nonsense"], "No such command"),
])
def test_usage_errors_exit_2(args, message, tmp_path):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


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
    assert rows and set(rows[0]) >= {"source", "digit", "confidence", "label", "error", "p0", "p9", "top_k"}
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
    assert [d["source"] for d in jsonl(r.stdout)] == [str(p) for p in picked]
    r = run("classify", str(sample_dir / "[12]" / "*.png"), "--server", server.address)
    assert {Path(d["source"]).parent.name for d in jsonl(r.stdout)} == {"1", "2"}
    stdin = "\n".join(str(p) for p in files[:40]) + "\n\n"
    r = run("classify", "-", "--server", server.address, input=stdin)
    assert r.exit_code == 0 and [d["source"] for d in jsonl(r.stdout)] == [str(p) for p in files[:40]]


def test_top_k(server, sample_dir):
    r = run("classify", sample_dir / "3", "--server", server.address, "--top-k", "2")
    d = jsonl(r.stdout)[0]
    assert [t["digit"] for t in d["top_k"]][0] == d["digit"] and len(d["top_k"]) == 2


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


def test_decoding_on_the_server_gives_the_same_answers(server, sample_dir):
    mine = jsonl(run("classify", sample_dir, "--server", server.address).stdout)
    theirs = jsonl(run("classify", sample_dir, "--server", server.address, "--decode", "server").stdout)
    assert [d["digit"] for d in mine] == [d["digit"] for d in theirs]


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


def test_output_file_is_written_whole_or_not_at_all(server, sample_dir, tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text("previous good results\n")
    r = run("classify", sample_dir, "--server", f"127.0.0.1:{free_port()}", "--output", out, "--timeout", "1")
    assert r.exit_code == 3
    assert out.read_text() == "previous good results\n" and list(tmp_path.iterdir()) == [out]
    r = run("classify", sample_dir, "--server", server.address, "--output", out)
    assert r.exit_code == 0 and len(jsonl(out.read_text())) == 300 and list(tmp_path.iterdir()) == [out]


def test_server_from_the_environment(server, sample_dir):
    r = run("classify", sample_dir / "0", env={"NETWORK3_SERVER": server.address})
    assert r.exit_code == 0 and jsonl(r.stdout)


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
        assert r.exit_code == 0 and jsonl(r.stdout)
        assert run("info", "--server", s.address, "--token-file", token).exit_code == 0


# ---- the real console script: exit 3, one line, no traceback ----

def network3(*args, **kw) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("network3")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT, **kw)


def test_missing_server_exits_3_with_one_line(sample_dir):
    port = free_port()
    for args in (["classify", sample_dir], ["health", "--timeout", "2"], ["info", "--timeout", "2"]):
        p = network3(*args, "--server", f"127.0.0.1:{port}")
        assert p.returncode == 3, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot reach the server" in lines[0] and "Traceback" not in p.stderr


def test_server_lost_mid_job_exits_3_even_with_failed_images(process_server, mnist, tmp_path):
    """3 wins over 1: a corrupt file early, then the server goes away for good."""
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


def test_progress_only_on_a_terminal(server, sample_dir):
    r = run("classify", sample_dir, "--server", server.address)
    assert "\r" not in r.stderr  # a pipe gets no progress bar
    r = run("classify", sample_dir, "--server", server.address, "--progress")
    assert r.exit_code == 0  # forced on: still a clean run (the bar appears after a second)




def test_tls_options(onnx_model, pki, sample_dir):  # noqa: F811
    from fixtures_serving import thread_server

    with thread_server(onnx_model, tls_cert=pki / "server.crt", tls_key=pki / "server.key",
                       tls_client_ca=pki / "ca.crt") as s:
        tls = ["--tls-ca", pki / "ca.crt", "--tls-cert", pki / "client.crt", "--tls-key", pki / "client.key"]
        r = run("classify", sample_dir / "2", "--server", s.address, *tls)
        assert r.exit_code == 0 and jsonl(r.stdout)
        assert run("health", "--server", s.address, *tls).exit_code == 0
        r = run("classify", sample_dir / "2", "--server", s.address, "--tls-ca", pki / "ca.crt", "--timeout", "1")
        assert r.exit_code == 3 and "Traceback" not in r.output


def test_an_empty_folder_says_so(server, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    r = run("classify", tmp_path, "--server", server.address)
    assert r.exit_code == 0 and r.stdout == "" and "no images found" in r.stderr
