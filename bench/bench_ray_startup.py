"""Where the Ray engine's start-up goes, step by step, in one fresh process:

  imports        torch, Flower, fedsec (what every engine pays)
  ray.init       Flower's RayBackend starting a local Ray (loopback, private temp dir)
  actors         the actor pool's first message per hospital: actor process start, its
                 imports (torch, Flower, fedsec's ClientApp) and the task's data
  warm message   one more message per hospital, actors warm (the per-exchange cost)
  shutdown       actors stopped, ray.shutdown
and the in-process engine's equivalent of the last three.

    .venv/bin/python bench/bench_ray_startup.py [--scenario scenarios/quickstart.yaml] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
import torch  # noqa: E402,F401
from flwr.app import ConfigRecord, Message, MessageType, RecordDict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedsec.federation.client_app import app as client_app  # noqa: E402,F401
from fedsec.federation.engine import _ray_backend_config, make_ray_temp_dir, quiet  # noqa: E402
from fedsec.federation.inline import DirectGrid, InlineBackend, _new_run, _task_identity  # noqa: E402
from fedsec.scenario import load_scenario  # noqa: E402

IMPORTS_S = time.perf_counter() - T0


def _query(grid, text: str) -> float:
    t0 = time.perf_counter()
    msgs = [Message(RecordDict({"config": ConfigRecord({"scenario": text})}), message_type=MessageType.QUERY,
                    dst_node_id=n) for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs))
    bad = [m.error.reason for m in replies if m.has_error()]
    if bad:
        raise SystemExit(f"a hospital failed: {bad[0]}")
    return time.perf_counter() - t0


def measure(scenario, backend_fn) -> dict:
    import shutil

    text, n = scenario.to_yaml(), int(scenario.federation.hospitals or len(scenario.federation.sites or []) or 2)
    out = {}
    t0 = time.perf_counter()
    backend, temp = backend_fn()
    out["start"] = time.perf_counter() - t0
    run = _new_run()
    try:
        backend.build(lambda: client_app)
        grid = DirectGrid(backend, n, run)
        with _task_identity(run):
            out["first message"] = _query(grid, text)
            out["warm message"] = _query(grid, text)
    finally:
        t0 = time.perf_counter()
        backend.terminate()
        out["shutdown"] = time.perf_counter() - t0
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default=str(ROOT / "scenarios" / "quickstart.yaml"))
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    quiet(False)
    scenario = load_scenario(args.scenario)

    def ray_backend():
        from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

        temp = make_ray_temp_dir()
        return RayBackend(_ray_backend_config(scenario, False, temp)), temp

    def inline_backend():
        return InlineBackend({"client_resources": {"num_cpus": 1.0}}), None

    print(f"imports (torch, Flower, fedsec): {IMPORTS_S:.2f} s")
    for name, fn in (("ray", ray_backend), ("inline", inline_backend)):
        for i in range(args.repeat):
            r = measure(scenario, fn)
            label = "ray.init" if name == "ray" else "backend"
            print(f"{name:<7} {label} {r['start']:6.2f} s | first message per hospital (actor start, imports, data) "
                  f"{r['first message']:6.2f} s | warm message {1000 * r['warm message']:6.0f} ms | "
                  f"shutdown {r['shutdown']:5.2f} s", flush=True)


if __name__ == "__main__":
    main()
