"""Scale: the CXR scenario with 2, 10, 50 and 200 hospitals (few rounds).

For each size it runs `fedsec run` in a child process and samples, every 0.2 s, the summed
resident memory (RSS) of that process and all its descendants (Ray's raylet, GCS and
actors included) from /proc. Prints wall time, start-up, mean time per round after the
first, and peak RSS. Memory should stay nearly flat in the number of hospitals: Ray reuses
a fixed pool of actors (one per CPU) and each actor loads the dataset once.

    .venv/bin/python bench/bench_scale.py [--sizes 2,10,50,200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_rss(root: int) -> int:
    """Bytes of RSS of ``root`` and every descendant. Ray's raylet/GCS are children of the
    driver, and its actors children of the raylet, so the whole run is one tree."""
    kids = children_map()
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
        stack.extend(kids.get(pid, []))
    return total


def run_size(n: int, rounds: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "fedsec.cli", "run", str(ROOT / "scenarios" / "cxr_fedavg.yaml"),
           f"federation.hospitals={n}", f"federation.rounds={rounds}", "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{n} hospitals failed:\n{proc.stderr.read()}")
    summary = json.loads((out / "summary.json").read_text())
    rounds_rec = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    later = [r["time_s"] for r in rounds_rec[1:]] or [rounds_rec[0]["time_s"]]
    return {"hospitals": n, "wall_s": wall, "startup_s": summary["timing"]["startup_s"],
            "round1_s": rounds_rec[0]["time_s"], "later_round_s": sum(later) / len(later),
            "peak_rss_gib": peak / 2**30, "auroc": summary["final"]["auroc"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2,10,50,200")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="/tmp/fedsec-bench-scale")
    args = ap.parse_args()
    print(f"{'hospitals':>9} {'wall s':>8} {'start-up s':>10} {'round 1 s':>9} {'later s/round':>13} "
          f"{'peak RSS GiB':>12} {'AUROC':>6}")
    for n in [int(x) for x in args.sizes.split(",")]:
        r = run_size(n, args.rounds, Path(args.out) / f"n{n}")
        print(f"{r['hospitals']:>9} {r['wall_s']:>8.1f} {r['startup_s']:>10.1f} {r['round1_s']:>9.2f} "
              f"{r['later_round_s']:>13.2f} {r['peak_rss_gib']:>12.2f} {r['auroc']:>6.3f}", flush=True)


if __name__ == "__main__":
    main()
