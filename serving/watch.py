"""--watch-interval: reload (as SIGHUP does) when the model, token or TLS files change on disk.
Kubernetes updates a mounted Secret's files in place and sends no signal; a stat of five
files is all a check costs.  Used by the server (one process) and by the workers' parent."""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Awaitable, Callable

log = logging.getLogger("network3.server")


def watched_files(options) -> list[Path]:
    """What a reload reads again: a ServerOptions' model, token and TLS files."""
    return [p for p in (options.model, options.token_file, options.tls_cert, options.tls_key, options.tls_client_ca)
            if p is not None]


async def watch(paths: list[Path], interval: float, reload: Callable[[], Awaitable]) -> None:
    """Every `interval` seconds, `await reload()` when a file changed (its inode, size or mtime:
    a Secret's files are swapped in by a rename).  A file caught half-written fails its reload
    and keeps the old one; the rest of the write changes it again, and it reloads."""
    seen = _fingerprints(paths)
    while True:
        await asyncio.sleep(interval)
        now = _fingerprints(paths)
        if now != seen:
            changed = ", ".join(str(p) for p, a, b in zip(paths, seen, now) if a != b)
            log.info("changed on disk: %s: reloading", changed)
            seen = now
            await reload()


def _fingerprints(paths: list[Path]) -> list[tuple[int, int, int] | None]:
    out = []
    for path in paths:
        try:
            st = os.stat(path)  # through the symlinks a Secret's volume is made of
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)  # gone (mid-swap, or deleted): a change like any other
    return out
