"""A sweep on Ray against the same sweep in-process (``--engine inline``), back to back, and
optionally (``--loop``) a naive loop of `fedsec run` calls on the same grid.

On Ray the sweep starts Ray (and imports torch / Flower) once per worker slot; in-process
each worker imports once and starts no Ray at all; the naive loop pays both for every cell.
Prints the wall times and whether every cell's final metrics agree across engines.

    .venv/bin/python bench/bench_sweep.py [--attacks none,ehr_trigger,alie]
        [--strategies fedavg,median,norm_bounding] [--seeds 0] [--rounds 5] [--engines ray,inline] [--loop]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEDSEC = [sys.executable, "-m", "fedsec.cli"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default=str(ROOT / "scenarios" / "heart_sweep.yaml"))
    ap.add_argument("--attacks", default="none,ehr_trigger,alie")
    ap.add_argument("--strategies", default="fedavg,median,norm_bounding")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engines", default="ray,inline", help="sweeps to time, one per engine (--engine of fedsec sweep)")
    ap.add_argument("--loop", action="store_true", help="also time a loop of `fedsec run` on Ray (slow)")
    ap.add_argument("--out", default="/tmp/fedsec-bench-sweep")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    attacks, strategies = args.attacks.split(","), args.strategies.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = len(attacks) * len(strategies) * len(seeds)
    rounds = f"federation.rounds={args.rounds}"

    def sweep(engine: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        subprocess.run([*FEDSEC, "sweep", args.scenario, rounds, "--grid", f"attacks={args.attacks}", "--grid",
                        f"strategy={args.strategies}", "--seeds", args.seeds, "--engine", engine,
                        "--out", str(out / f"sweep-{engine}")],
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0, _metrics(out / f"sweep-{engine}" / "sweep.csv")

    print(f"{cells} cells ({len(attacks)} attacks x {len(strategies)} defenses x {len(seeds)} seeds, "
          f"{args.rounds} rounds)", flush=True)
    times, results = {}, {}
    for engine in args.engines.split(","):
        times[engine], results[engine] = sweep(engine)
        print(f"fedsec sweep --engine {engine:<7} {times[engine]:7.1f} s  ({times[engine] / cells:.1f} s per cell)",
              flush=True)
    if len(results) > 1:
        first = next(iter(results.values()))
        same = all(r == first for r in results.values())
        print(f"same final metrics in every cell across engines: {'yes' if same else 'NO'}")
        if "ray" in times and "inline" in times:
            print(f"ray / inline: {times['ray'] / times['inline']:.2f}x")
    if args.loop:
        t0 = time.perf_counter()
        for a in attacks:
            for s in strategies:
                for seed in seeds:
                    subprocess.run([*FEDSEC, "run", args.scenario, f"attacks={a}", f"strategy={s}", f"seed={seed}",
                                    rounds, "--out", str(out / "loop" / f"{a}-{s}-{seed}")],
                                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        loop_s = time.perf_counter() - t0
        print(f"loop of `fedsec run` (Ray): {loop_s:7.1f} s  ({loop_s / cells:.1f} s per cell)")


def _metrics(csv_path: Path) -> dict:
    """cell id -> (status, final metrics and attack figures) from sweep.csv (timings dropped)."""
    import csv

    if not csv_path.exists():
        return {}
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    return {r["cell"]: {k: v for k, v in r.items() if not k.endswith("_s")} for r in rows}

if __name__ == "__main__":
    main()
