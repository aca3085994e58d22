"""Scale: the CXR scenario with 2, 10, 50 and 200 hospitals (few rounds), or (``--ehr``)
an EHR table of many small hospitals (e.g. 10 vs 1,000) on any engine.

For each size it runs `fedsec run` in a child process and samples, every 0.2 s, the summed
resident memory (RSS) of that process and all its descendants (Ray's raylet, GCS and
actors included) from /proc. Prints wall time, start-up, mean time per round after the
first, and peak RSS. Memory should stay nearly flat in the number of hospitals: Ray reuses
a fixed pool of actors (one per CPU) and each actor loads the dataset once.

    .venv/bin/python bench/bench_scale.py [--sizes 2,10,50,200] [--rounds 3]
    .venv/bin/python bench/bench_scale.py --ehr --sizes 10,1000 --engine inline

``--ehr``: a CSV of ``--records`` patient rows per hospital, drawn (seeded) from the
embedded UCI heart-disease rows, read by the ``ehr_csv`` task with a logistic model: the
per-hospital cost the federation itself adds, with almost no training.
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


def ehr_scenario(n: int, records: int, folder: Path) -> Path:
    """A CSV of ``n`` hospitals x ``records`` rows (seeded draws of the heart-disease rows)
    and an ehr_csv scenario reading it -> the scenario's path."""
    import numpy as np

    from fedsec.data.heart import FEATURES, FILES_DIR, SITES, read_site

    xs, ys = zip(*(read_site(FILES_DIR / f) for f in SITES.values()))
    x, y = np.concatenate(xs), np.concatenate(ys)
    rng = np.random.default_rng(n)
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / f"ehr_{n}.csv"
    with open(csv, "w") as fh:
        fh.write(",".join(["hospital", *FEATURES, "label"]) + "\n")
        for h in range(n):
            rows = rng.choice(len(x), size=records, replace=False)
            rows = np.concatenate([rows[y[rows] == 0][:1], rows[y[rows] == 1][:1], rows])  # both labels
            for i in rows[:records]:
                fh.write(",".join([f"h{h:04d}", *(f"{v:g}" for v in x[i]), str(int(y[i]))]) + "\n")
    scenario = folder / f"ehr_{n}.yaml"
    scenario.write_text(f"""name: bench_ehr_{n}
seed: 0
task: {{name: ehr_csv, path: {csv}, model: logistic, options: {{test_fraction: 0.3}}}}
federation: {{partition: {{name: natural}}, rounds: 3, local: {{epochs: 1, batch_size: 8, lr: 0.05}}}}
""")
    return scenario


def run_size(n: int, rounds: int, out: Path, scenario: Path | None = None, engine: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "fedsec.cli", "run", str(scenario or ROOT / "scenarios" / "cxr_fedavg.yaml"),
           f"federation.rounds={rounds}", "--out", str(out)]
    if scenario is None:
        cmd.append(f"federation.hospitals={n}")
    if engine:
        cmd.append(f"engine.name={engine}")
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
    ap.add_argument("--ehr", action="store_true", help="many small EHR hospitals instead of the CXR task")
    ap.add_argument("--records", type=int, default=12, help="--ehr: patient rows per hospital")
    ap.add_argument("--engine", default=None, help="engine.name (default: the scenario's, ray)")
    args = ap.parse_args()
    print(f"# {'EHR table, ' + str(args.records) + ' rows per hospital' if args.ehr else 'CXR'}; "
          f"engine {args.engine or 'ray'}; {args.rounds} rounds", flush=True)
    print(f"{'hospitals':>9} {'wall s':>8} {'start-up s':>10} {'round 1 s':>9} {'later s/round':>13} "
          f"{'peak RSS GiB':>12} {'AUROC':>6}")
    for n in [int(x) for x in args.sizes.split(",")]:
        scenario = ehr_scenario(n, args.records, Path(args.out) / "data") if args.ehr else None
        r = run_size(n, args.rounds, Path(args.out) / f"n{n}", scenario, args.engine)
        print(f"{r['hospitals']:>9} {r['wall_s']:>8.1f} {r['startup_s']:>10.1f} {r['round1_s']:>9.2f} "
              f"{r['later_round_s']:>13.2f} {r['peak_rss_gib']:>12.2f} {r['auroc']:>6.3f}", flush=True)


if __name__ == "__main__":
    main()
