"""The guard test's two runs (tests/training/test_handwriting_guard.py) over several seeds, to set
its FLOOR and MARGIN: UCI accuracy of the `handwriting` recipe and of plain training, one line per
seed, also appended to runs/guard.jsonl.  UCI is a test set: this measures a gain, it tunes nothing.

    OMP_NUM_THREADS=1 python benchmarks/guard_seeds.py LIMIT EPOCHS SEED... [--set knob=value ...]
"""
import argparse
import dataclasses
import json
import resource
import sys
import tempfile
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "training"), str(ROOT), str(ROOT / "benchmarks")]
import imagesets as S
import test_handwriting_guard as G
from training.data import load
from tune_sets import parse_overrides

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("limit", type=int, help="MNIST training digits per run")
ap.add_argument("epochs", type=int)
ap.add_argument("seeds", type=int, nargs="+")
ap.add_argument("--set", action="append", default=[], help="a Config field=value over the recipe")
args = ap.parse_args()
limit, epochs, seeds, sets = args.limit, args.epochs, args.seeds, parse_overrides(args.set)
mnist = load(verbose=False)
uci = G.read_uci(S.uci_digits_path())
recipe, plain = G.recipes(epochs)
if sets:
    recipe = dataclasses.replace(recipe, **sets)
for seed in seeds:
    with tempfile.TemporaryDirectory() as d:
        t = resource.getrusage(resource.RUSAGE_SELF)
        a = G.uci_accuracy(recipe, mnist, uci, Path(d) / "r", seed, limit)
        b = G.uci_accuracy(plain, mnist, uci, Path(d) / "p", seed, limit)
        u = resource.getrusage(resource.RUSAGE_SELF)
    row = dict(limit=limit, epochs=epochs, seed=seed, sets=sets, recipe=a, plain=b, gain=a - b,
               cpu_s=round(u.ru_utime + u.ru_stime - t.ru_utime - t.ru_stime, 1))
    print(json.dumps(row), flush=True)
    (ROOT / "runs").mkdir(exist_ok=True)
    with open(ROOT / "runs" / "guard.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
