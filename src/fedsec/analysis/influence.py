"""How far one hospital can move the global model, by its share of the data, under each rule.

    python -m fedsec.analysis.influence                       # the table in docs/results.md
    python -m fedsec.analysis.influence --hospitals 10 --shares 0.006,0.05,0.1,0.25,0.4 \\
        --scales 1,10,100,1000 --rules fedavg,median,trimmed_mean,norm_bounding,size_aware --draws 5

The measure (issue 14): n hospitals send updates; hospital 0 holds the share x of the
training records (its sample count), the others share the rest equally. Benign updates are
``mu + noise``: a common direction ``mu`` (norm 1) plus independent Gaussian noise of norm
``--noise`` per hospital, in ``--dim`` coordinates. Hospital 0 then scales its own benign
update by lambda (the "site scaled its update x1000" failure real consortia report). For each
rule the move is ``||aggregate - benign aggregate|| / ||benign aggregate||``, the benign
aggregate being the same rule on the unscaled updates; the table gives the largest move over
the scales, mean over ``--draws`` random draws. Rules are built from the registry with their
defaults and f = 1 (trimmed mean trims 1 at each end; the size-aware rule caps a hospital at
trim_share = 0.4 of the weight).

Synthetic on purpose: it isolates the rule's arithmetic from training noise, needs no data,
and runs in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys

DEFAULT_RULES = ("fedavg", "median", "trimmed_mean", "norm_bounding", "flame", "geometric_median", "size_aware")


def moves(rule_name: str, hospitals: int, share: float, scales: list[float], dim: int = 200, noise: float = 0.5,
          draws: int = 5, seed: int = 0) -> list[float]:
    """The largest relative move over ``scales``, one per draw."""
    import torch

    from fedsec.strategies.base import RuleContext
    from fedsec.strategies.rules import make_rule

    out = []
    for draw in range(draws):
        g = torch.Generator().manual_seed(seed * 1000 + draw)
        mu = torch.randn(dim, generator=g, dtype=torch.float64)
        mu /= mu.norm()
        noise_rows = torch.randn(hospitals, dim, generator=g, dtype=torch.float64)
        benign = mu + noise * noise_rows / noise_rows.norm(dim=1, keepdim=True)
        total = 10_000.0
        counts = torch.full((hospitals,), total * (1 - share) / (hospitals - 1), dtype=torch.float64)
        counts[0] = total * share
        worst = 0.0
        for lam in scales:
            rule = make_rule(rule_name)
            ctx = RuleContext(num_malicious=1, generator=torch.Generator().manual_seed(draw), server_round=1,
                              global_params=torch.zeros(dim, dtype=torch.float64))
            ref = rule(benign.clone(), counts, ctx).update
            attacked = benign.clone()
            attacked[0] *= lam
            rule = make_rule(rule_name)
            ctx.generator = torch.Generator().manual_seed(draw)
            agg = rule(attacked, counts, ctx).update
            worst = max(worst, float((agg - ref).norm() / ref.norm().clamp_min(1e-12)))
        out.append(worst)
    return out


def table(rules, hospitals: int, shares: list[float], scales: list[float], dim: int, noise: float, draws: int) -> str:
    head = ["rule"] + [f"x = {s:.1%}" for s in shares]
    lines = [f"Largest relative move of the global update, ||agg - benign agg|| / ||benign agg||, when one of "
             f"{hospitals} hospitals holding x of the records scales its update by up to "
             f"{max(scales):g} (max over lambda in {', '.join(f'{s:g}' for s in scales)}; mean over {draws} draws; "
             f"d = {dim}, benign noise {noise:g} around a unit direction).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rules:
        cells = []
        for s in shares:
            try:
                m = moves(r, hospitals, s, scales, dim, noise, draws)
                cells.append(f"{statistics.fmean(m):.3g}")
            except Exception as err:  # noqa: BLE001 - a rule that refuses the setting says why
                cells.append(f"refused ({str(err)[:60]})")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedsec.analysis.influence", description=__doc__.split("\n\n")[0])
    p.add_argument("--hospitals", type=int, default=10)
    p.add_argument("--shares", default="0.006,0.05,0.1,0.25,0.4")
    p.add_argument("--scales", default="1,10,100,1000")
    p.add_argument("--rules", default=",".join(DEFAULT_RULES))
    p.add_argument("--dim", type=int, default=200)
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--draws", type=int, default=5)
    a = p.parse_args(argv)
    try:
        shares = [float(x) for x in a.shares.split(",")]
        scales = [float(x) for x in a.scales.split(",")]
    except ValueError:
        print("fedsec: error: --shares and --scales are comma-separated numbers", file=sys.stderr)
        return 2
    if a.hospitals < 3 or any(not 0 < s < 1 for s in shares):
        print("fedsec: error: --hospitals >= 3 and every share in (0, 1)", file=sys.stderr)
        return 2
    print(table([r.strip() for r in a.rules.split(",") if r.strip()], a.hospitals, shares, scales, a.dim, a.noise,
                a.draws))
    return 0


if __name__ == "__main__":
    sys.exit(main())
