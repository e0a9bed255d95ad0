"""`network3`: classify digit images against a server (or a local ONNX file), check health, show
the served model, and `serve` (from serving.server).

Exit codes: 0 every image classified; 1 some images failed (each reported on its own line);
2 usage error; 3 the server failed us: it cannot be reached, refuses us (auth, TLS), did not
answer in time, went away for good, or failed a whole call (e.g. INTERNAL), whether at the
start of a job or in the middle of one (`server_failure` decides, for every command).  Each
failure ends with one line on stderr, never a traceback.

`--local` runs the model in this process and never imports grpc: the gRPC client is imported
only when a command talks to a server (`Connection.client`).
"""
from __future__ import annotations

import collections
import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import __version__, sources
from .classifier import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, Classifier, ClientError
from .contract import CLASSES
from .output import WRITERS, Progress, Sink, Tally

if TYPE_CHECKING:  # grpc, which a --local job never imports
    from .client import Client

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
CONNECT_S = 3.0  # at the start, an unreachable server ends the job after at most this long


class ServerFailure(click.ClickException):
    exit_code = EXIT_UNREACHABLE


_WHAT = {"UNAVAILABLE": "cannot reach the server", "UNAUTHENTICATED": "the server refused our credentials",
         "PERMISSION_DENIED": "the server refused us", "DEADLINE_EXCEEDED": "the server did not answer in time"}


def server_failure(e: ClientError, address: str) -> ServerFailure:
    """The one way a failed call ends a command (classify at the start or mid-job, health, info):
    exit 3 and one line naming what went wrong.  Unreachable, refused and timed-out calls and
    every other code alike: a call that fails whole is the server failing us, never an image
    (a bad image is its own row and exit 1)."""
    return ServerFailure(f"{_WHAT.get(e.code, 'the server failed')} at {address} ({e})")


# ---- the connection: options shared by every command that talks to a server ----

@dataclass(frozen=True)
class Connection:
    """How to reach the server, from the connection options (`connection_options`)."""

    server: str = DEFAULT_ADDRESS
    timeout: float = DEFAULT_TIMEOUT
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token: str | None = field(default=None, repr=False)

    def client(self) -> "Client":
        """A gRPC client for this connection (grpc is imported here, and only here, by the CLI)."""
        from .client import Client

        return Client(self.server, timeout=self.timeout, tls=self.tls, tls_ca=self.tls_ca, tls_cert=self.tls_cert,
                      tls_key=self.tls_key, tls_server_name=self.tls_server_name, token=self.token)


def _check_server(ctx, param, value: str) -> str:
    if not value or not value.strip() or any(c.isspace() for c in value):
        raise click.BadParameter(f"{value!r} is not an address (host:port)")
    return value


def _read_token(ctx, param, value: str | None) -> str | None:
    if value is None:
        return None
    token = Path(value).read_text().strip()
    if not token:
        raise click.BadParameter(f"{value} is empty")
    return token


_FILE = click.Path(exists=True, dir_okay=False)
_CONNECTION_OPTIONS = [
    click.option("--server", default=DEFAULT_ADDRESS, envvar="NETWORK3_SERVER", show_envvar=True, show_default=True,
                 callback=_check_server, help="host:port of the network3 server."),
    click.option("--timeout", default=DEFAULT_TIMEOUT, type=click.FloatRange(0.1), envvar="NETWORK3_TIMEOUT",
                 show_envvar=True, show_default=True,
                 help="Seconds each call may take, retries of an unavailable server included; in a "
                      "stream, the longest wait for an answer."),
    click.option("--tls", is_flag=True, envvar="NETWORK3_TLS", show_envvar=True,
                 help="Use TLS with the system's root certificates."),
    click.option("--tls-ca", type=_FILE, envvar="NETWORK3_TLS_CA", show_envvar=True,
                 help="PEM root certificate(s) to trust the server by (implies TLS)."),
    click.option("--tls-cert", type=_FILE, envvar="NETWORK3_TLS_CLIENT_CERT", show_envvar=True,
                 help="PEM client certificate for mutual TLS (with --tls-key)."),
    click.option("--tls-key", type=_FILE, envvar="NETWORK3_TLS_CLIENT_KEY", show_envvar=True,
                 help="PEM private key of --tls-cert."),
    click.option("--tls-server-name", envvar="NETWORK3_TLS_SERVER_NAME", show_envvar=True,
                 help="Expect this name in the server's certificate (e.g. when dialling an IP)."),
    click.option("--token-file", "token", type=_FILE, envvar="NETWORK3_TOKEN_FILE", show_envvar=True,
                 callback=_read_token, help="File holding a bearer token sent with every call."),
]
_CONNECTION_PARAMS = ("server", "timeout", "tls", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "token")


def connection_options(f):
    """Add the connection options to a command, which gets them as one `conn: Connection`."""

    @functools.wraps(f)
    def command(*args, **kwargs):
        values = {k: kwargs.pop(k) for k in _CONNECTION_PARAMS}
        if bool(values["tls_cert"]) != bool(values["tls_key"]):
            raise click.BadParameter("--tls-cert and --tls-key go together", param_hint=["--tls-cert", "--tls-key"])
        return f(*args, conn=Connection(**values), **kwargs)

    for opt in reversed(_CONNECTION_OPTIONS):
        command = opt(command)
    return command


class _Group(click.Group):
    """`serve` is imported only when asked for: the server's imports (onnxruntime, prometheus)
    would otherwise slow every `network3 classify` down."""

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), "serve"})

    def get_command(self, ctx, name):
        if name == "serve" and name not in self.commands:
            try:
                from .server import serve_command
            except ImportError:  # a client-only install without the server's extras
                return None
            self.add_command(serve_command, "serve")
        return super().get_command(ctx, name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="network3")
def cli():
    """network3: classify handwritten digits with a served network3 model."""


# ---- classify ----

@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@connection_options
@click.option("--local", "local_model", type=click.Path(exists=True, dir_okay=False),
              help="Run this ONNX model in-process (same preprocessing), no server.")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "csv"]),
              help="Output format.  [default: table on a terminal, else jsonl]")
@click.option("--top-k", type=click.IntRange(1, CLASSES), help="Also list the K most probable digits.")
@click.option("--batch-size", default=256, type=click.IntRange(1, 4096), show_default=True,
              help="Images per request.")
@click.option("--window", default=4, type=click.IntRange(1, 64), show_default=True,
              help="Requests in flight at once on the stream.")
@click.option("--decode", type=click.Choice(["client", "server"]), default="client", show_default=True,
              help="Where image files are decoded and normalised: here (pixels are sent) or on the server.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True),
              help="Write results to FILE (atomically: all or nothing) instead of stdout.")
@click.option("--progress/--no-progress", default=None,
              help="A progress line on stderr (images so far and images/s), from a second into the job.  "
                   "[default: on when stderr is a terminal and the results do not go to it]")
def classify(paths, conn: Connection, local_model, fmt, top_k, batch_size, window, decode, output, progress):
    """Classify the digit in each image PATH: image files, folders (recursive), glob patterns,
    IDX files (labelled when the IDX label file is beside them), or - to read paths from stdin.

    Images in folders named 0..9 are labelled by their folder; with labels known, a summary
    with accuracy and a confusion matrix follows the results.
    """
    try:
        sources.check_paths(paths)
    except sources.PathError as e:
        raise click.UsageError(str(e)) from None
    if paths.count("-") > 1:
        raise click.UsageError("- (paths on stdin) can be given once")
    out_tty = output is None and sys.stdout.isatty()
    fmt = fmt or ("table" if out_tty else "jsonl")
    if progress is None:
        progress = sys.stderr.isatty() and not out_tty
    max_request_bytes = None
    backend: Classifier
    if local_model:
        backend = _local(local_model)
        address, max_pixels = f"--local {local_model}", None
    else:
        backend = client = conn.client()
        address = conn.server
        try:
            limits = client.info(timeout=min(conn.timeout, CONNECT_S))["limits"]
        except ClientError as e:
            client.close()
            raise server_failure(e, address) from None
        if limits.get("max_images_per_request"):
            batch_size = min(batch_size, limits["max_images_per_request"])
        max_pixels = limits.get("max_pixels") or None
        if limits.get("max_message_bytes"):
            max_request_bytes = int(min(limits["max_message_bytes"], client.max_message_bytes) * 0.9)

    stdin = sys.stdin if "-" in paths else None
    meta: collections.deque = collections.deque()  # (source, label) of each item handed to the backend

    def items():
        kw = {"max_pixels": max_pixels} if max_pixels else {}
        for entries, batch in sources.batches(sources.entries(paths, stdin), batch_size,
                                              decode=decode == "client" or bool(local_model), **kw):
            meta.extend((e.source, e.label) for e in entries)
            yield from batch

    sink = Sink(output)
    writer = WRITERS[fmt](sink.file, top_k)
    tally = Tally()
    bar = Progress(enabled=progress)
    code = EXIT_OK
    try:
        with backend:
            for p in backend.classify_stream(items(), batch_size=batch_size, window=window, top_k=top_k,
                                             max_request_bytes=max_request_bytes):
                source, label = meta.popleft()
                writer.row(source, label, p)
                tally.add(label, p)
                bar.update(tally.n, tally.failed)
    except ClientError as e:
        bar.close()
        sink.abort()
        raise server_failure(e, address) from None
    except KeyboardInterrupt:
        bar.close()
        sink.abort()
        raise click.ClickException("interrupted") from None
    bar.close()
    writer.close()
    summary_to = sink.file if fmt == "table" else sys.stderr
    tally.summary(summary_to, bar.elapsed())
    sink.commit()
    if tally.n == 0:
        click.echo("network3: no images found (image files: " + ", ".join(sorted(sources.IMAGE_SUFFIXES))
                   + "; or IDX files)", err=True)
    if tally.failed:
        code = EXIT_FAILED
        click.echo(f"network3: {tally.failed:,} of {tally.n:,} images could not be classified", err=True)
    sys.exit(code)


def _local(path: str) -> Classifier:
    from .errors import BadModel
    from .local import LocalClassifier

    try:
        return LocalClassifier(path)
    except BadModel as e:
        raise click.BadParameter(str(e), param_hint="--local") from None


# ---- health and info ----

@cli.command()
@connection_options
@click.option("--service", default="", help="A service name to check (default: the whole server).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def health(conn: Connection, service, as_json):
    """Is the server up and serving?  Exit 0 when SERVING, 3 otherwise."""
    server = conn.server
    with conn.client() as c:
        try:
            status = c.health(service)
        except ClientError as e:
            if as_json:
                click.echo(json.dumps({"server": server, "status": "UNREACHABLE", "error": str(e)}))
            raise server_failure(e, server) from None
    click.echo(json.dumps({"server": server, "status": status}) if as_json else f"{server}: {status}")
    sys.exit(EXIT_OK if status == "SERVING" else EXIT_UNREACHABLE)


@cli.command()
@connection_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def info(conn: Connection, as_json):
    """The served model: preset, test accuracy, input contract, file sha256, load time, limits."""
    server = conn.server
    with conn.client() as c:
        try:
            d = c.info()
        except ClientError as e:
            raise server_failure(e, server) from None
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    m = d["metadata"]
    rows = [("server", server), ("model", f"{d['name']} version {d['version']}"), ("file", d["path"]),
            ("sha256", d["sha256"]), ("loaded at", d["loaded_at"]), ("preset", m.get("preset", "?")),
            ("test accuracy", _accuracy(m.get("test_accuracy"))), ("input", _contract(m.get("input"))),
            ("labels", " ".join(d["labels"])), ("providers", ", ".join(d["providers"]))]
    for k in ("exported_at", "git_commit", "data_sha256", "opset", "network3_version"):
        if k in m:
            rows.append((k.replace("_", " "), m[k]))
    lim = d["limits"]
    if lim:
        rows.append(("limits", f"{lim['max_images_per_request']:,} images/request, batches of "
                               f"{lim['max_batch_size']:,}, {lim['max_message_bytes']:,} bytes/message, "
                               f"{lim['max_pixels']:,} pixels/image"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{w}}  {v}")


def _accuracy(raw: str | None) -> str:
    try:
        v = json.loads(raw) if raw is not None else None
    except ValueError:
        return str(raw)
    if isinstance(v, (int, float)):
        return f"{v:.2%}"
    return "?" if v is None else json.dumps(v)


def _contract(raw: str | None) -> str:
    try:
        c = json.loads(raw) if raw else None
    except ValueError:
        return str(raw)
    if not isinstance(c, dict):
        return "?"
    return (f"{c.get('name')} {c.get('dtype')} {c.get('shape')} in {c.get('range')}, {c.get('polarity')}, "
            f"{c.get('centring', '')}")


def main() -> None:
    """Console entry point.  click turns usage errors into exit 2 and our ClickExceptions into
    their codes; a closed pipe (`| head`) ends quietly; anything unforeseen is one line, exit 1."""
    try:
        cli(prog_name="network3", standalone_mode=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(EXIT_FAILED)
    except Exception as e:  # a bug or an environment problem: say what, without a traceback
        click.echo(f"network3: error: {type(e).__name__}: {e}", err=True)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
