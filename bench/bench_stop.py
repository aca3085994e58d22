"""How fast Ctrl-C / SIGTERM stop a real ``fedsec run`` (Ray), and that nothing survives it.

Runs the quickstart with long rounds (200 local epochs: a round lasts seconds), waits for
the first finished round, sends the signal mid-round (SIGINT to the whole process group,
as a terminal's Ctrl-C does; SIGTERM to the fedsec process, as a CI runner does), and
prints for each: the exit code, the seconds from the signal to the process's exit, the
rounds kept, and how many of the run's processes (Ray head, raylet, agents, actors) were
still alive 5 s later (target: 0).

    .venv/bin/python bench/bench_stop.py [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedsec.federation.engine import descendants  # noqa: E402


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def one(sig: int, to_group: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix="fedsec-bench-stop-")) / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedsec.cli", "run", str(ROOT / "scenarios" / "quickstart.yaml"),
                             "federation.rounds=30", "federation.local.epochs=200", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not ((out / "rounds.jsonl").exists() and (out / "rounds.jsonl").read_text().strip()):
        if proc.poll() is not None:
            raise SystemExit(f"the run ended early ({proc.returncode})")
        time.sleep(0.1)
    family = descendants(proc.pid)
    time.sleep(0.5)
    t0 = time.monotonic()
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    code = proc.wait(timeout=300)
    stop_s = time.monotonic() - t0
    time.sleep(5)
    summary = json.loads((out / "summary.json").read_text())
    return {"signal": signal.Signals(sig).name, "exit": code, "stop_s": round(stop_s, 1),
            "rounds_kept": summary["rounds"], "status": summary["status"],
            "survivors": sum(_alive(p) for p in family), "processes": len(family)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    for _ in range(args.repeat):
        for sig, group in ((signal.SIGINT, True), (signal.SIGTERM, False)):
            print(json.dumps(one(sig, group)), flush=True)


if __name__ == "__main__":
    main()
