"""A sweep against a naive loop of `fedsec run` calls on the same grid, back to back.

The sweep starts Ray (and imports torch / Flower) once per worker slot; the naive loop pays
both for every cell. Prints both wall times and the share of the loop's time the sweep takes.

    .venv/bin/python bench/bench_sweep.py [--attacks none,ehr_trigger,alie]
        [--strategies fedavg,median,norm_bounding] [--seeds 0] [--rounds 5]
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
    ap.add_argument("--out", default="/tmp/fedsec-bench-sweep")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    attacks, strategies = args.attacks.split(","), args.strategies.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = len(attacks) * len(strategies) * len(seeds)
    rounds = f"federation.rounds={args.rounds}"

    t0 = time.perf_counter()
    subprocess.run([*FEDSEC, "sweep", args.scenario, rounds, "--grid", f"attacks={args.attacks}", "--grid",
                    f"strategy={args.strategies}", "--seeds", args.seeds, "--out", str(out / "sweep")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sweep_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for a in attacks:
        for s in strategies:
            for seed in seeds:
                subprocess.run([*FEDSEC, "run", args.scenario, f"attacks={a}", f"strategy={s}", f"seed={seed}",
                                rounds, "--out", str(out / "loop" / f"{a}-{s}-{seed}")],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loop_s = time.perf_counter() - t0
    print(f"{cells} cells ({len(attacks)} attacks x {len(strategies)} defenses x {len(seeds)} seeds, "
          f"{args.rounds} rounds)")
    print(f"fedsec sweep:          {sweep_s:7.1f} s  ({sweep_s / cells:.1f} s per cell)")
    print(f"loop of `fedsec run`:  {loop_s:7.1f} s  ({loop_s / cells:.1f} s per cell)")
    print(f"sweep / loop:          {sweep_s / loop_s:7.2f}   (saved {loop_s - sweep_s:.0f} s)")


if __name__ == "__main__":
    main()
