"""CPU seconds (user + sys) of `default` against `handwriting` training: 2 augmented epochs on
25,600 digits each (with their evaluations), alternated, twice; prints the ratio.

    OMP_NUM_THREADS=1 python benchmarks/train_cpu_ratio.py
"""
import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training.data import load  # noqa: E402
from training.presets import get  # noqa: E402
from training.train import RunOptions, fit  # noqa: E402

mnist = load(verbose=False)
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF); return u.ru_utime + u.ru_stime
out = {}
for rep in range(2):
    for name in ("default", "handwriting"):
        with tempfile.TemporaryDirectory() as d:
            t = cpu()
            r = fit(get(name, epochs=2, clean_epochs=0), RunOptions(out=Path(d), device="cpu", limit_train=25600, plots=False, quiet=True), mnist)
            out.setdefault(name, []).append(round(cpu() - t, 2))
            print(name, out[name][-1], "cpu s; train_seconds", r["train_seconds"], flush=True)
print(json.dumps(out), "ratio", sum(out["handwriting"]) / sum(out["default"]))
