"""How `network3 classify` writes: the sink (stdout, or a file replaced atomically), the formats
(JSON lines, CSV, an aligned table), the running tally with accuracy and a confusion matrix,
and the progress line on a terminal.  An unsure answer (serving.unsure) is `"unsure": true` in
JSON lines, `true` in CSV's unsure column, and its digit marked `?` in the table."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

from .confusion import format_confusion
from .contract import CLASSES
from .predictions import Prediction


class Sink:
    """stdout, or FILE written through a temp file that replaces FILE only when the job completes."""

    def __init__(self, output: str | None):
        self.path = Path(output) if output else None
        self._tmp = None
        if self.path is None:
            self.file = sys.stdout
            return
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent or ".")
        except OSError as e:
            raise click.BadParameter(f"cannot write in {self.path.parent}: {e.strerror}", param_hint="--output")
        self._tmp = Path(tmp)
        self.file = io.open(fd, "w", encoding="utf-8", newline="")

    def commit(self) -> None:
        if self._tmp is None:
            self.file.flush()
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._tmp is not None:
            self.file.close()
            self._tmp.unlink(missing_ok=True)


# ---- output formats ----

class JsonLines:
    def __init__(self, file, top_k):
        self.file = file

    def row(self, source: str, label: int | None, p: Prediction) -> None:
        # Written by hand, not json.dumps of a dict: this runs once per image, and building and
        # serialising a dict per image costs more than the rest of the client's work on it.
        parts = ['{"source": ', json.dumps(source)]
        if p.error is None:
            parts += [', "digit": %d, "confidence": %.6f, "unsure": %s, "probabilities": ['
                      % (p.digit, p.probability, "true" if p.unsure else "false"),
                      ", ".join(["%.6f" % x for x in p.probabilities]), "]"]
            if p.top_k:
                parts += [', "top_k": [', ", ".join(['{"digit": %d, "confidence": %.6f}' % kv for kv in p.top_k]), "]"]
        else:
            parts += [', "error": ', json.dumps(p.error), ', "code": ', json.dumps(p.code)]
        if label is not None:
            parts.append(', "label": %d' % label)
        parts.append("}\n")
        self.file.write("".join(parts))

    def close(self) -> None:
        self.file.flush()


class Csv:
    def __init__(self, file, top_k):
        self.w = csv.writer(file, lineterminator="\n")
        self.top_k = top_k
        self.file = file
        self.w.writerow(["source", "digit", "confidence", "unsure", "label", "error"] + [f"p{i}" for i in range(CLASSES)]
                        + (["top_k"] if top_k else []))

    def row(self, source, label, p: Prediction) -> None:
        lab = "" if label is None else label
        if p.error is None:
            row = ([source, p.digit, f"{p.probability:.6f}", "true" if p.unsure else "false", lab, ""]
                   + [f"{x:.6f}" for x in p.probabilities])
        else:
            row = [source, "", "", "", lab, p.error] + [""] * CLASSES
        if self.top_k:
            row.append(" ".join(f"{k}:{v:.4f}" for k, v in p.top_k))
        self.w.writerow(row)

    def close(self) -> None:
        self.file.flush()


class Table:
    """Aligned columns for a person at a terminal; long paths keep their tail."""

    def __init__(self, file, top_k):
        self.file, self.top_k = file, top_k
        width = shutil.get_terminal_size((100, 24)).columns
        self.src_w = max(20, min(60, width - 40 - (12 * top_k if top_k else 0)))
        head = f"{'SOURCE':<{self.src_w}}  DIGIT  CONFIDENCE  LABEL"
        self.file.write(head + ("  TOP-K" if top_k else "") + "\n")

    def row(self, source, label, p: Prediction) -> None:
        s = source if len(source) <= self.src_w else "…" + source[-(self.src_w - 1):]
        lab = "" if label is None else str(label)
        if p.error is not None:
            self.file.write(f"{s:<{self.src_w}}  error: {p.error}\n")
            return
        mark = "" if label is None else (" ok" if label == p.digit else " WRONG")
        digit = f"{p.digit}?" if p.unsure else f"{p.digit} "  # ?: a guess (serving.unsure)
        line = f"{s:<{self.src_w}}  {digit:>6} {p.probability:>9.2%}  {lab:>5}{mark}"
        if self.top_k:
            line += "  " + " ".join(f"{k}:{v:.0%}" for k, v in p.top_k)
        self.file.write(line + "\n")

    def close(self) -> None:
        self.file.flush()


WRITERS = {"jsonl": JsonLines, "csv": Csv, "table": Table}


class Tally:
    """Counts, and accuracy with a confusion matrix over the labelled images."""

    def __init__(self):
        self.n = self.failed = self.labelled = self.correct = 0
        self.unsure = self.sure_labelled = self.sure_correct = 0
        self.confusion = [[0] * CLASSES for _ in range(CLASSES)]

    def add(self, label: int | None, p: Prediction) -> None:
        self.n += 1
        if p.error is not None:
            self.failed += 1
            return
        self.unsure += p.unsure
        if label is not None:
            self.labelled += 1
            self.correct += label == p.digit
            self.confusion[label][p.digit] += 1
            if not p.unsure:
                self.sure_labelled += 1
                self.sure_correct += label == p.digit

    def summary(self, file, seconds: float) -> None:
        if not self.labelled:
            return
        acc = self.correct / self.labelled
        failed = f"; {self.failed:,} failed" if self.failed else ""
        rate = f", {self.n / seconds:,.0f} images/s" if seconds > 0 else ""
        lines = [f"accuracy {acc:.2%}: {self.correct:,} of {self.labelled:,} labelled images right{failed}"
                 f" ({self.n:,} images in {seconds:.2f} s{rate})"]
        if self.unsure:
            rest = (f"; accuracy {self.sure_correct / self.sure_labelled:.2%} on the other {self.sure_labelled:,}"
                    if self.sure_labelled else "")
            lines.append(f"unsure (?): {self.unsure:,} of {self.n - self.failed:,} answers{rest}")
        lines += format_confusion(self.confusion)
        file.write("\n".join(lines) + "\n")
        file.flush()


class Progress:
    """One self-rewriting line on stderr ("12,345 images  3,210/s", then "  7 failed" when some
    did), from DELAY seconds into the job, redrawn at most every INTERVAL seconds, and cleared
    (the line blanked, the cursor back at its start) by close()."""

    DELAY = 1.0  # a job done sooner never shows the line
    INTERVAL = 0.1

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.monotonic()
        self._next = self.t0 + self.DELAY
        self._shown = False

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def update(self, n: int, failed: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.INTERVAL
        rate = n / (now - self.t0)
        msg = f"\r{n:,} images  {rate:,.0f}/s" + (f"  {failed:,} failed" if failed else "")
        sys.stderr.write(msg + "\x1b[K")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False
