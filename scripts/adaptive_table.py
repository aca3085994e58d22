"""The "Adaptive attacks" tables of docs/results.md, from the sweeps of scripts/adaptive_sweeps.sh
and scripts/adaptive_krum_cxr.sh.

    scripts/adaptive_sweeps.sh 0-9 runs/adaptive-heart                  # the runs (resumable)
    python scripts/adaptive_table.py runs/adaptive-heart                 # the table (markdown, stdout)
    python scripts/adaptive_table.py runs/adaptive-heart balanced_accuracy   # another clean metric

OUT holds ``null/`` and one or more attack sweeps (``adaptive/``, ``baseline/``). Each cell:
effect = metric - null, paired by seed (the null: the same scenario, defense and seed with
the attackers training honestly, ``poison_fraction: 0``, so the rules keep the same f and the
clean model's ASR is measured). Metric: the attack success rate for backdoors (effect > 0 is
harm), a clean metric otherwise (AUROC by default; effect < 0 is harm). Mean over seeds and a
95% Student-t confidence interval. ``*``: the CI excludes 0 in the harmful direction; ``(+)``:
it excludes 0 in the other direction (the attack helped).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import yaml
from scipy import stats

ORDER = ("fedavg", "norm_bounding", "median", "trimmed_mean", "flame", "krum")


def label(values: dict, scenario: dict) -> str:
    a = values.get("attacks")
    if a is None:
        a = [e.get("preset", e.get("attack")) for e in scenario.get("attacks", [])]
        return ",".join(map(str, a)) or "none"
    a = str(a)
    if a.startswith("["):
        name = re.search(r"preset: *(\w+)", a).group(1)
        return name + ("_boosted" if "boost: auto" in a else "")
    return a


def cells(folder: Path):
    sweep = json.loads((folder / "sweep.json").read_text())
    for c in sweep["cells"]:
        cell = folder / c["path"]
        if c["status"] not in ("completed", "completed_with_failures") or not (cell / "summary.json").exists():
            continue
        s = json.loads((cell / "summary.json").read_text())
        scenario = yaml.safe_load((cell / "scenario.yaml").read_text())
        rule = (scenario.get("strategy") or {}).get("rule", "fedavg")
        backdoor = "asr" in (s.get("attack") or {})
        s["cell"] = cell
        yield label(c["values"], scenario), rule, c["seed"], s, c.get("wall_s"), backdoor


def ci(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def main(out: str, clean_metric: str = "auroc") -> None:
    root = Path(out)
    null: dict[tuple[str, int], dict] = {}
    for _, rule, seed, s, _, _ in cells(root / "null"):
        null[(rule, seed)] = {"clean": s["final"][clean_metric], "asr": (s.get("attack") or {}).get("asr")}
    runs: dict[tuple[str, str], dict[int, dict]] = {}
    backdoors, walls = set(), []
    for sweep in sorted(p.parent for p in root.glob("*/sweep.json") if p.parent.name != "null"):
        for attack, rule, seed, s, wall, backdoor in cells(sweep):
            runs.setdefault((attack, rule), {})[seed] = {"clean": s["final"][clean_metric],
                                                         "asr": (s.get("attack") or {}).get("asr")}
            walls.append(wall or 0.0)
            if backdoor:
                backdoors.add(attack)
    defenses = sorted({r for (r, _) in null}, key=lambda r: ORDER.index(r) if r in ORDER else len(ORDER))
    adaptive = ("adaptive", "bounded", "flame_evading")
    attacks = sorted({a for a, _ in runs}, key=lambda a: (a in backdoors, not a.startswith(adaptive), a))
    seeds = sorted({seed for (_, seed) in null})
    print(f"null seeds {','.join(map(str, seeds))}; no-attack {clean_metric} / clean-model ASR per defense (mean):")
    for d in defenses:
        vals = [null[(d, s)] for s in seeds if (d, s) in null]
        asr = [v["asr"] for v in vals if v["asr"] is not None]
        print(f"- {d}: {clean_metric} {sum(v['clean'] for v in vals) / len(vals):.3f}"
              + (f", clean-model ASR {sum(asr) / len(asr):.3f}" if asr else ""))
    print()
    print("| attack (metric) | " + " | ".join(defenses) + " |")
    print("|---|" + "---|" * len(defenses))
    for a in attacks:
        metric = "asr" if a in backdoors else "clean"
        row = [f"`{a}` ({'ASR' if metric == 'asr' else clean_metric})"]
        for d in defenses:
            per_seed = runs.get((a, d), {})
            effects = [per_seed[s][metric] - null[(d, s)][metric] for s in seeds
                       if s in per_seed and (d, s) in null and per_seed[s][metric] is not None
                       and null[(d, s)][metric] is not None]
            if not effects:
                row.append("—")
                continue
            m, lo, hi = ci(effects)
            harmful_up = metric == "asr"
            mark = ""
            if (harmful_up and lo > 0) or (not harmful_up and hi < 0):
                mark = " *"
            elif (harmful_up and hi < 0) or (not harmful_up and lo > 0):
                mark = " (+)"
            row.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark} n={len(effects)}")
        print("| " + " | ".join(row) + " |")
    flame_admission(root, seeds)
    if walls:
        print(f"\n{len(walls)} attack runs, {sum(walls) / len(walls):.1f} s each on average (wall, 2 shared cores)")


def flame_admission(root: Path, seeds: list[int], attacker: str = "va") -> None:
    """Under FLAME: the share of rounds in which the attacker (hospital ``attacker``, heart's VA
    Long Beach) was flagged, and in which a benign hospital was."""
    rows = {}
    for sweep in sorted(p.parent for p in root.glob("*/sweep.json")):
        for attack, rule, seed, s, _, _ in cells(sweep):
            if rule != "flame" or seed not in seeds:
                continue
            log = s["cell"] / "rounds.jsonl"
            rounds = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
            name = "none (null)" if sweep.name == "null" else attack
            agg = rows.setdefault(name, [0, 0, 0])
            for r in rounds:
                flagged = (r.get("defense") or {}).get("flagged") or []
                agg[0] += attacker in flagged
                agg[1] += any(h != attacker for h in flagged)
                agg[2] += 1
    if not rows:
        return
    print(f"\nFLAME: share of rounds in which it flagged the attacker ({attacker}) / a benign hospital")
    print("\n| attack | attacker flagged | a benign hospital flagged | rounds |\n|---|---|---|---|")
    for name, (a, b, n) in sorted(rows.items()):
        if n:
            print(f"| `{name}` | {a / n:.2f} | {b / n:.2f} | {n} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/adaptive-heart", *(sys.argv[2:3]))
