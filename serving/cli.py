"""`network3`: classify digit images against a server (or a local ONNX file), check health, show
the served model, and `serve` (from serving.server).

Exit codes: 0 every image classified; 1 some images failed (each reported on its own line);
2 usage error; 3 the server cannot be reached or refuses us (auth, TLS) or went away for
good mid-job.  Each failure ends with one line on stderr, never a traceback.
"""
from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

import click

from . import __version__, sources
from .client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, Client, ClientError, LocalClassifier
from .output import WRITERS, Progress, Sink, Tally

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
CONNECT_S = 3.0  # at the start, an unreachable server ends the job after at most this long


class Unreachable(click.ClickException):
    exit_code = EXIT_UNREACHABLE


def _unreachable(e: ClientError, address: str) -> Unreachable:
    what = {"UNAVAILABLE": "cannot reach the server", "UNAUTHENTICATED": "the server refused our credentials",
            "PERMISSION_DENIED": "the server refused us", "DEADLINE_EXCEEDED": "the server did not answer in time"}
    return Unreachable(f"{what.get(e.code.name, 'the server failed')} at {address} ({e})")


# ---- options shared by every command that talks to a server ----

def server_options(f):
    opts = [
        click.option("--server", default=DEFAULT_ADDRESS, envvar="NETWORK3_SERVER", show_default=True,
                     help="host:port of the network3 server ($NETWORK3_SERVER)."),
        click.option("--timeout", default=DEFAULT_TIMEOUT, type=click.FloatRange(0.1), show_default=True,
                     help="Seconds each call may take, retries of an unavailable server included."),
        click.option("--tls", is_flag=True, help="Use TLS with the system's root certificates."),
        click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False),
                     help="PEM root certificate(s) to trust the server by (implies TLS)."),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
                     help="PEM client certificate for mutual TLS (with --tls-key)."),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False),
                     help="PEM private key of --tls-cert."),
        click.option("--tls-server-name", help="Expect this name in the server's certificate (e.g. when dialling an IP)."),
        click.option("--token-file", type=click.Path(exists=True, dir_okay=False), envvar="NETWORK3_TOKEN_FILE",
                     help="File holding a bearer token sent with every call ($NETWORK3_TOKEN_FILE)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def make_client(server, timeout, tls, tls_ca, tls_cert, tls_key, tls_server_name, token_file) -> Client:
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    token = None
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise click.BadParameter(f"{token_file} is empty", param_hint="--token-file")
    return Client(server, timeout=timeout, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                  tls_server_name=tls_server_name, token=token)


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
@server_options
@click.option("--local", "local_model", type=click.Path(exists=True, dir_okay=False),
              help="Run this ONNX model in-process (same preprocessing), no server.")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "csv"]),
              help="Output format.  [default: table on a terminal, else jsonl]")
@click.option("--top-k", type=click.IntRange(1, 10), help="Also list the K most probable digits.")
@click.option("--batch-size", default=256, type=click.IntRange(1, 4096), show_default=True,
              help="Images per request.")
@click.option("--window", default=4, type=click.IntRange(1, 64), show_default=True,
              help="Requests in flight at once on the stream.")
@click.option("--decode", type=click.Choice(["client", "server"]), default="client", show_default=True,
              help="Where image files are decoded and normalised: here (pixels are sent) or on the server.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True),
              help="Write results to FILE (atomically: all or nothing) instead of stdout.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr.  [default: on a terminal, for jobs over a second]")
def classify(paths, server, timeout, tls, tls_ca, tls_cert, tls_key, tls_server_name, token_file,
             local_model, fmt, top_k, batch_size, window, decode, output, progress):
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
    if local_model:
        backend = _local(local_model)
        address, max_pixels = f"--local {local_model}", None
    else:
        backend = make_client(server, timeout, tls, tls_ca, tls_cert, tls_key, tls_server_name, token_file)
        address = server
        try:
            limits = backend.info(timeout=min(timeout, CONNECT_S))["limits"]
        except ClientError as e:
            backend.close()
            raise _unreachable(e, address) if e.unreachable else click.ClickException(f"{address}: {e}") from None
        if limits.get("max_images_per_request"):
            batch_size = min(batch_size, limits["max_images_per_request"])
        max_pixels = limits.get("max_pixels") or None
        if limits.get("max_message_bytes"):
            max_request_bytes = int(min(limits["max_message_bytes"], backend.max_message_bytes) * 0.9)

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
        raise _unreachable(e, address) if e.unreachable else Unreachable(f"{address}: {e}") from None
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


def _local(path: str) -> LocalClassifier:
    from .errors import BadModel

    try:
        return LocalClassifier(path)
    except BadModel as e:
        raise click.BadParameter(str(e), param_hint="--local") from None


# ---- health and info ----

@cli.command()
@server_options
@click.option("--service", default="", help="A service name to check (default: the whole server).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def health(server, timeout, tls, tls_ca, tls_cert, tls_key, tls_server_name, token_file, service, as_json):
    """Is the server up and serving?  Exit 0 when SERVING, 3 otherwise."""
    with make_client(server, timeout, tls, tls_ca, tls_cert, tls_key, tls_server_name, token_file) as c:
        try:
            status = c.health(service)
        except ClientError as e:
            if as_json:
                click.echo(json.dumps({"server": server, "status": "UNREACHABLE", "error": str(e)}))
            raise _unreachable(e, server) if e.unreachable else Unreachable(f"{server}: {e}") from None
    click.echo(json.dumps({"server": server, "status": status}) if as_json else f"{server}: {status}")
    sys.exit(EXIT_OK if status == "SERVING" else EXIT_UNREACHABLE)


@cli.command()
@server_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def info(server, timeout, tls, tls_ca, tls_cert, tls_key, tls_server_name, token_file, as_json):
    """The served model: preset, test accuracy, input contract, file sha256, load time, limits."""
    with make_client(server, timeout, tls, tls_ca, tls_cert, tls_key, tls_server_name, token_file) as c:
        try:
            d = c.info()
        except ClientError as e:
            raise _unreachable(e, server) if e.unreachable else Unreachable(f"{server}: {e}") from None
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
