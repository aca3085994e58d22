"""The privacy-utility table: defense settings x (utility, leakage, epsilon), both tasks.

For each defense setting two scenarios run (resumable, finished runs are skipped):
- leakage by inversion: one hospital's update from a single record (scenarios/inversion_cxr.yaml,
  or the heart-disease equivalent with tabular inversion), one round -> PSNR / SSIM, or the
  share of the record's features recovered;
- utility and membership: the task's FedAvg scenario with a loss-threshold membership
  attack on the final global model -> AUROC, accuracy, MIA AUROC, and the epsilon reported.

    .venv/bin/python scripts/privacy_table.py [cxr|heart|all] [--out results/privacy]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import fedsec  # noqa: E402
from fedsec.runner import RunFailed  # noqa: E402

DEFENSES = {
    "none": [],
    "dp_sgd z=0.5": ["privacy.dp_sgd={noise_multiplier: 0.5, max_grad_norm: 1.0}"],
    "dp_sgd z=1.0": ["privacy.dp_sgd={noise_multiplier: 1.0, max_grad_norm: 1.0}"],
    "dp_sgd z=2.0": ["privacy.dp_sgd={noise_multiplier: 2.0, max_grad_norm: 1.0}"],
    "dp_sgd eps=1": ["privacy.dp_sgd={target_epsilon: 1.0, max_grad_norm: 1.0}"],
    "central_dp": ["privacy.central_dp={noise_multiplier: 1.0, clipping_norm: 0.5}"],
    "secagg": ["privacy.secure_aggregation=true"],
    "pruning 10%": ["privacy.compression={keep_ratio: 0.1}"],
}

TASKS = {
    "cxr": {
        "inversion": ("inversion_cxr.yaml", []),
        "utility": ("cxr_fedavg.yaml", ["attacks=[{preset: membership_loss}]"]),
    },
    "heart": {
        "inversion": ("heart_fedavg.yaml", [
            "task.options={max_train_per_hospital: 1}", "federation.rounds=1", "federation.local.batch_size=1",
            "attacks=[{preset: tabular_inversion, target_hospital: 0, target_round: 1}]"]),
        "utility": ("heart_fedavg.yaml", ["attacks=[{preset: membership_loss}]"]),
    },
}


def run_cell(scenario: str, overrides: list[str], out: Path) -> dict:
    summary_file = out / "summary.json"
    if summary_file.exists() and json.loads(summary_file.read_text())["status"] == "completed":
        return json.loads(summary_file.read_text())
    try:
        return fedsec.run(str(ROOT / "scenarios" / scenario), overrides=overrides, out=out, progress=False)
    except RunFailed as err:
        return err.summary
    except fedsec.errors.FedsecError as err:  # a refused combination (e.g. central DP needs fedavg)
        return {"status": "refused", "error": str(err), "final": {}, "attack": {}, "privacy": {}}


def epsilon_of(summary: dict) -> str:
    p = summary.get("privacy") or {}
    if "dp_sgd" in p:
        return f"{p['dp_sgd'].get('epsilon_max', float('nan')):.2f} (record)"
    if "central_dp" in p and p["central_dp"].get("epsilon") is not None:
        return f"{p['central_dp']['epsilon']:.2f} (hospital)"
    return "-"


def fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def table(task: str, out: Path) -> str:
    lines = [f"Privacy-utility, {task} (seed 0)", "",
             "| defense | AUROC | accuracy | MIA AUROC | inversion leakage | epsilon (delta = min(1e-3, N^-1.1)) |",
             "|---|---|---|---|---|---|"]
    t0 = time.perf_counter()
    for name, ov in DEFENSES.items():
        slug = name.replace(" ", "_").replace("=", "")
        print(f"{task}: {name} ...", file=sys.stderr, flush=True)
        scen, extra = TASKS[task]["utility"]
        util = run_cell(scen, extra + ov, out / f"utility-{slug}")
        scen, extra = TASKS[task]["inversion"]
        inv = run_cell(scen, extra + ov, out / f"inversion-{slug}")
        if util.get("status") != "completed":
            lines.append(f"| {name} | {util.get('status')}: {str(util.get('error'))[:120]} | | | | |")
            continue
        a = util.get("attack", {})
        mia = a.get("auroc_mean")
        ia = inv.get("attack", {}) if inv.get("status") == "completed" else {}
        if "psnr" in ia:
            leak = f"PSNR {fmt(ia['psnr'], 1)} dB, SSIM {fmt(ia.get('ssim'), 2)}"
        elif "mean_abs_error" in ia:
            leak = (f"feature error {fmt(ia.get('mean_abs_error'), 3)}, records recovered "
                    f"{ia.get('records_recovered')}/{ia.get('records_total')}")
        else:
            leak = inv.get("status", "-") if inv.get("status") != "completed" else "-"
        lines.append(f"| {name} | {fmt(util['final'].get('auroc'))} | {fmt(util['final'].get('accuracy'))} | "
                     f"{fmt(mia)} | {leak} | {epsilon_of(util)} |")
    text = "\n".join(lines) + f"\n\n({time.perf_counter() - t0:.0f} s)\n"
    (out / "table.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task", nargs="?", default="all", choices=["cxr", "heart", "all"])
    ap.add_argument("--out", default=str(ROOT / "results" / "privacy"))
    args = ap.parse_args()
    for task in (["heart", "cxr"] if args.task == "all" else [args.task]):
        out = Path(args.out) / task
        out.mkdir(parents=True, exist_ok=True)
        print(table(task, out))


if __name__ == "__main__":
    main()
