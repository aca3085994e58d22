"""Gradient inversion on CPU: the batch-size table, speed, memory and reconstruction figures.

    .venv/bin/python bench/bench_inversion.py table            # the table of docs/results.md (~30 min, 2 cores)
    .venv/bin/python bench/bench_inversion.py table --iterations 200 --batches 1 4 16   # a reduced run
    .venv/bin/python bench/bench_inversion.py speed            # iterations / s, peak RSS
    .venv/bin/python bench/bench_inversion.py figures          # docs/figures/inversion_{b1,b8,multistep}.png
    .venv/bin/python bench/bench_inversion.py figure --batch 8 --tv-weight 0.2 --out /tmp/b8.png
    .venv/bin/python bench/bench_inversion.py tabular --records 4 --model mlp --epochs 3 --local-batch-size 2

The model is the testbed's own ``small_cnn`` (src/fedsec/models.py: two conv + GroupNorm +
ReLU + max-pool blocks, a 64-unit hidden layer, 105,442 parameters) on 1x28x28 PneumoniaMNIST,
built by ``fedsec.models.build_model`` exactly as a scenario builds it. The hospital runs plain
SGD (lr 0.01); the attack uses the defaults of attacks/inverting_gradients.yaml unless told
otherwise (``table`` cuts the iterations to keep CPU time sane: it says how many). One torch
thread.

``table``: per cell (model state x defense x batch size B), ``ceil(images / B)`` hospital
updates, each from B new PneumoniaMNIST validation images (one local SGD step on the whole
batch, lr 0.01), inverted by Inverting Gradients; per-image PSNR / SSIM after the Hungarian
assignment, their mean with a 95% bootstrap CI over the images, next to the null (the mean
image of the 4,708 training images, scored on the same images, paired). Model states:
``untrained`` (round 1: the initial model) and ``trained`` (after ``--rounds`` FedAvg rounds of
one local epoch, batch 32, SGD lr 0.05 momentum 0.9, on four IID hospitals of 500
training images each). DP-SGD rows:
the hospital's update comes from fedsec's own DP-SGD (``fedsec.privacy.dp_sgd.train_dp_sgd``:
Opacus, per-record clipping at 1.0, Poisson sampling, the noise calibrated by Opacus's
accountant for ``--epsilon`` at delta = min(1e-3, N^-1.1) = 1e-3 for N <= 32); the epsilon
printed is the accountant's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src/fedsec/data/files/medmnist/pneumoniamnist.npz"
PRESET = ROOT / "attacks/inverting_gradients.yaml"
METHOD_KEYS = ("iterations", "lr", "tv_weight", "restarts", "signed", "boxed", "schedule", "init", "labels")


def small_cnn(activation: str = "relu", seed: int | None = None) -> nn.Module:
    """The testbed's small_cnn for 1x28x28, 2 classes (fedsec.models), as a scenario builds it."""
    from fedsec.models import build_model

    return build_model("small_cnn", (1, 28, 28), 2, {"act": activation}, seed=seed)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def pneumonia(n: int | None = None, split: str = "train", start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    d = np.load(DATA)
    end = None if n is None else start + n
    x = torch.tensor(d[f"{split}_images"][start:end], dtype=torch.float32)[:, None] / 255.0
    y = torch.tensor(d[f"{split}_labels"][start:end, 0], dtype=torch.long)
    return x, y


def hospital_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, epochs: int,
                    batch_size: int) -> torch.Tensor:
    """The hospital's FedAvg update (local - global): plain SGD, batches in order."""
    from fedsec.attacks.inversion import flat_params

    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    for _ in range(epochs):
        for s in range(0, len(x), batch_size):
            opt.zero_grad()
            F.cross_entropy(m(x[s:s + batch_size]), y[s:s + batch_size]).backward()
            opt.step()
    return flat_params(m) - flat_params(model)


def preset_options() -> dict:
    doc = yaml.safe_load(PRESET.read_text())
    return {k: doc[k] for k in METHOD_KEYS}


def run_figure(batch: int, epochs: int, local_batch_size: int | None, out: Path | None, local_lr: float = 0.01,
               seed: int = 0, activation: str = "relu", **overrides) -> dict:
    from fedsec.attacks import leakage
    from fedsec.attacks.inversion import LocalTraining, flat_params, inverting_gradients

    torch.manual_seed(seed)
    model = small_cnn(activation, seed)
    x, y = pneumonia(batch)
    bs = local_batch_size or batch
    update = hospital_update(model, x, y, local_lr, epochs, bs)
    local = LocalTraining.from_hyperparameters(local_lr, epochs, bs, batch)
    options = {**preset_options(), **{k: v for k, v in overrides.items() if v is not None}}
    t0 = time.perf_counter()
    result = inverting_gradients(model, flat_params(model), update, (1, 28, 28), batch, local=local, seed=seed,
                                 **options)
    seconds = time.perf_counter() - t0
    ri, ti = leakage.match_reconstructions(result.x, x)
    per_image = leakage.psnr(result.x[ri], x[ti], reduction="none")
    figures = {"batch": batch, "local_steps": local.steps, "local_batch_size": bs, "local_lr": local_lr,
               "psnr": leakage.psnr(result.x[ri], x[ti]), "ssim": leakage.ssim(result.x[ri], x[ti]),
               "label_acc": leakage.label_recovery_accuracy(result.labels, y), "seconds": seconds,
               "it_per_s": result.iterations / seconds, "peak_rss_mib": peak_rss_mib(), **options}
    # reference points: no leakage at all / the population's mean image (known to the server)
    full, _ = pneumonia(4708)
    figures["psnr_mean_image"] = leakage.psnr(full[batch:].mean(0, keepdim=True).expand_as(x), x)
    if out is not None:
        leakage.save_grid(x[ti], result.x[ri], out, titles=[f"{v:.1f} dB" for v in per_image])
        figures["grid"] = str(out)
    return figures


def heart_records() -> tuple[torch.Tensor, torch.Tensor]:
    """Cleveland site of UCI Heart Disease: 13 features standardised ('?' -> column mean),
    label = disease present (num > 0)."""
    path = ROOT / "src/fedsec/data/files/heart_disease/processed.cleveland.data"
    rows = [[float("nan") if v == "?" else float(v) for v in line.strip().split(",")]
            for line in path.read_text().splitlines() if line.strip()]
    a = np.array(rows)
    x, y = a[:, :13], (a[:, 13] > 0).astype(np.int64)
    x = np.where(np.isnan(x), np.nanmean(x, axis=0), x)
    x = (x - x.mean(0)) / x.std(0)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def tabular(records: int, epochs: int, local_batch_size: int | None, model_name: str, tol: float,
            method: str = "auto") -> dict:
    from fedsec.attacks import leakage
    from fedsec.attacks.inversion import LocalTraining, flat_params, tabular_inversion

    torch.manual_seed(0)
    x, y = heart_records()
    x, y = x[:records], y[:records]
    if model_name == "logreg":
        model = nn.Linear(13, 2)
    else:
        model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 2))
    bs = local_batch_size or records
    update = hospital_update(model, x, y, 0.01, epochs, bs)
    local = LocalTraining.from_hyperparameters(0.01, epochs, bs, records)
    r = tabular_inversion(model, flat_params(model), update, 13, records, local=local, method=method)
    err = leakage.tabular_errors(r.x, x, tol=tol)
    return {"model": model_name, "records": records, "local_steps": local.steps, "method": r.info["method"],
            "mean_abs_error": err["mean_abs_error"], "records_recovered": err["records_recovered"],
            "tol": tol, "mean_abs_error_of_population_mean": float(x.abs().mean()),
            "label_acc": leakage.label_recovery_accuracy(r.labels, y), "seconds": r.seconds,
            "feature_abs_error": [round(float(v), 4) for v in err["feature_abs_error"]]}


def speed(iterations: int) -> None:
    from fedsec.attacks.inversion import LocalTraining, dlg, flat_params, inverting_gradients

    torch.manual_seed(0)
    model = small_cnn()
    g = flat_params(model)
    print(f"peak RSS after imports: {peak_rss_mib():.0f} MiB  (torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread)")
    print(f"{'case':<48}{'it/s':>8}{'ms/it':>9}{'peak RSS MiB':>14}")
    cases = [("inverting_gradients b1, 1 step", 1, 1, 1), ("inverting_gradients b8, 1 step", 8, 1, 8),
             ("inverting_gradients b8, 4 steps (2 ep x bs 4)", 8, 2, 4)]
    for name, batch, epochs, bs in cases:
        x, y = pneumonia(batch)
        update = hospital_update(model, x, y, 0.01, epochs, bs)
        local = LocalTraining.from_hyperparameters(0.01, epochs, bs, batch)
        inverting_gradients(model, g, update, (1, 28, 28), batch, local=local, iterations=3)  # warm-up
        r = inverting_gradients(model, g, update, (1, 28, 28), batch, local=local, iterations=iterations)
        print(f"{name:<48}{r.iterations / r.seconds:>8.1f}{1000 * r.seconds / r.iterations:>9.2f}"
              f"{peak_rss_mib():>14.0f}")
    x, y = pneumonia(1)
    update = hospital_update(model, x, y, 0.01, 1, 1)
    r = dlg(model, g, update, (1, 28, 28), 1, local=LocalTraining(0.01), iterations=max(1, iterations // 20))
    print(f"{'dlg b1 (L-BFGS objective evaluations)':<48}{r.iterations / r.seconds:>8.1f}"
          f"{1000 * r.seconds / max(r.iterations, 1):>9.2f}{peak_rss_mib():>14.0f}")


def fedavg_trained(rounds: int, seed: int, hospitals: int = 4, per_hospital: int = 500) -> tuple[nn.Module, dict]:
    """small_cnn after ``rounds`` FedAvg rounds (one local epoch each, batch 32, SGD lr 0.05 with
    momentum 0.9, the sample-weighted mean) on ``hospitals`` IID shares of the first
    ``hospitals * per_hospital`` training images, with fedsec's own local training loop.
    -> (model, {"val_auroc", "val_acc"} on the validation split)."""
    from types import SimpleNamespace

    from fedsec.attacks.inversion import flat_params, load_flat_params
    from fedsec.core.training import train_local
    from fedsec.data.base import Split
    from fedsec.scenario import LocalConfig

    model = small_cnn(seed=seed)
    x, y = pneumonia(hospitals * per_hospital)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    shares = [perm[h::hospitals] for h in range(hospitals)]
    task = SimpleNamespace(loss=F.cross_entropy)
    local = LocalConfig(epochs=1, batch_size=32, lr=0.05, momentum=0.9)
    for r in range(rounds):
        g = flat_params(model)
        updates = []
        for h, idx in enumerate(shares):
            m = copy.deepcopy(model)
            train_local(m, Split(x[idx], y[idx]), task, local, torch.Generator().manual_seed(seed * 1000 + r * 10 + h))
            updates.append(flat_params(m) - g)
        load_flat_params(model, g + torch.stack(updates).mean(0))  # equal shares: the weighted mean
    xv, yv = pneumonia(None, "val")
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        logits = model.eval()(xv)
    quality = {"val_auroc": float(roc_auc_score(yv.numpy(), torch.softmax(logits, 1)[:, 1].numpy())),
               "val_acc": float((logits.argmax(1) == yv).float().mean())}
    return model.train(), quality


def dp_sgd_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, seed: int) -> tuple[torch.Tensor, dict]:
    """The hospital's update under fedsec's DP-SGD (Opacus): one epoch over its N = len(x)
    records with batch N (Poisson rate q = 1, one step), per-record clipping at 1.0, the noise
    calibrated to ``epsilon`` for this one round. -> (update, the accountant's record)."""
    from types import SimpleNamespace

    from fedsec.attacks.inversion import flat_params
    from fedsec.data.base import Split
    from fedsec.privacy.dp_sgd import DPConfig, train_dp_sgd
    from fedsec.scenario import LocalConfig

    m = copy.deepcopy(model).train()
    res = train_dp_sgd(m, Split(x, y), SimpleNamespace(loss=F.cross_entropy, model_name="small_cnn"),
                       LocalConfig(epochs=1, batch_size=len(x), lr=0.01), DPConfig(target_epsilon=epsilon),
                       generator=torch.Generator().manual_seed(seed), participations=1, planned_rounds=1)
    m.load_state_dict(res.state)
    return flat_params(m) - flat_params(model), {"epsilon": res.epsilon, "delta": res.delta,
                                                  "noise_multiplier": res.noise_multiplier}


def table(images: int, iterations: int, batches: list[int], epsilon: float, rounds: int, seed: int,
          states: list[str], defenses: list[str]) -> list[dict]:
    from fedsec.attacks import leakage
    from fedsec.attacks.inversion import LocalTraining, flat_params, inverting_gradients
    from fedsec.attacks.nulls import mean_stat

    options = {**preset_options(), "iterations": iterations}
    population = pneumonia(None)[0].double().mean(0).float()  # the null: the training split's mean image
    models = {}
    if "untrained" in states:
        models["untrained"] = (small_cnn(seed=seed), None)
    if "trained" in states:
        t0 = time.perf_counter()
        model, acc = fedavg_trained(rounds, seed)
        models["trained"] = (model, acc)
        print(f"# trained model: {rounds} FedAvg rounds, validation AUROC {acc['val_auroc']:.3f}, "
              f"accuracy {acc['val_acc']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    n_params = sum(p.numel() for p in next(iter(models.values()))[0].parameters())
    print(f"# small_cnn ({n_params:,} parameters); Inverting Gradients, {iterations} iterations "
          f"(preset: {preset_options()['iterations']}), tv {options['tv_weight']}, seed {seed}; "
          f">= {images} images per cell", flush=True)
    head = (f"{'model':<10}{'defense':<16}{'B':>3}{'imgs':>5}  {'PSNR dB [95% CI]':<22}{'null':>6}  "
            f"{'SSIM [95% CI]':<22}{'null':>6}{'labels':>8}{'eps':>7}{'s':>6}")
    print(head, flush=True)
    rows = []
    for state, (model, acc) in models.items():
        g = flat_params(model)
        for defense in defenses:
            for b in batches:
                trials = max(1, math.ceil(images / b))
                p_rec, p_null, s_rec, s_null, label_hits, eps_seen = [], [], [], [], [], []
                t0 = time.perf_counter()
                for t in range(trials):
                    x, y = pneumonia(b, "val", t * b)  # new images for every trial (the same across cells)
                    if defense == "none":
                        update = hospital_update(model, x, y, 0.01, 1, b)
                    else:
                        update, acct = dp_sgd_update(model, x, y, epsilon, seed * 100003 + t)
                        eps_seen.append(acct)
                    local = LocalTraining.from_hyperparameters(0.01, 1, b, b)
                    r = inverting_gradients(model, g, update, (1, 28, 28), b, local=local, seed=seed * 1009 + t,
                                            **options)
                    ri, ti = leakage.match_reconstructions(r.x, x)
                    ref, null = x[ti], population.expand_as(x[ti])
                    p_rec += leakage.psnr(r.x[ri], ref, reduction="none").clamp(max=100.0).tolist()
                    p_null += leakage.psnr(null, ref, reduction="none").tolist()
                    s_rec += leakage.ssim(r.x[ri], ref, reduction="none").tolist()
                    s_null += leakage.ssim(null, ref, reduction="none").tolist()
                    label_hits.append(leakage.label_recovery_accuracy(r.labels, y) * b)
                ps = mean_stat(p_rec, p_null, "population_mean", seed=seed)
                ss = mean_stat(s_rec, s_null, "population_mean", seed=seed)
                name = "none" if defense == "none" else f"dp_sgd eps={epsilon:g}"
                eps = max((a["epsilon"] for a in eps_seen), default=None)
                row = {"model": state, "model_quality": acc, "defense": name, "batch": b, "images": len(p_rec),
                       "updates": trials, "psnr": ps["value"], "psnr_ci": ps["ci"], "psnr_null": ps["null"],
                       "ssim": ss["value"], "ssim_ci": ss["ci"], "ssim_null": ss["null"],
                       "psnr_minus_null_ci": ps.get("effect_ci"),
                       "label_acc": sum(label_hits) / len(p_rec), "epsilon": eps,
                       "delta": eps_seen[0]["delta"] if eps_seen else None,
                       "noise_multiplier": eps_seen[0]["noise_multiplier"] if eps_seen else None,
                       "seconds": time.perf_counter() - t0, "iterations": iterations, "seed": seed}
                rows.append(row)
                pci, sci = row["psnr_ci"], row["ssim_ci"]
                print(f"{state:<10}{name:<16}{b:>3}{len(p_rec):>5}  "
                      f"{row['psnr']:5.1f} [{pci[0]:5.1f}, {pci[1]:5.1f}]{'':<5}{row['psnr_null']:>6.1f}  "
                      f"{row['ssim']:5.2f} [{sci[0]:5.2f}, {sci[1]:5.2f}]{'':<5}{row['ssim_null']:>6.2f}"
                      f"{row['label_acc']:>8.2f}{'' if eps is None else f'{eps:.2f}':>7}{row['seconds']:>6.0f}",
                      flush=True)
    return rows


def secagg(iterations: int | None, scenario_path: Path, seed_round: int = 1) -> dict:
    """scenarios/inversion_cxr.yaml (four hospitals, one chest X-ray each, small_cnn, one local
    SGD step) in process: each hospital's update with fedsec's own local training, the server's
    sample-weighted mean (what SecAgg+ reveals, without its fixed-point rounding, <= 1e-5 per
    entry), then the preset's Inverting Gradients attack (a) on hospital 0's own update and
    (b) under secure aggregation, the joint attack on the aggregate, scored against all four."""
    from types import SimpleNamespace

    from fedsec.attacks.base import AttackContext
    from fedsec.attacks.inversion import InvertingGradientsAttack, flat_params
    from fedsec.core.training import train_local
    from fedsec.federation.server_app import _seed
    from fedsec.scenario import load_scenario
    from fedsec.tasks import build_task

    scenario = load_scenario(str(scenario_path))
    task = build_task(scenario)
    model = task.make_model(seed=scenario.seed)
    g = flat_params(model)
    local = scenario.federation.local
    updates = []
    for h, split in enumerate(task.data.train):
        m = copy.deepcopy(model)
        train_local(m, split, SimpleNamespace(loss=F.cross_entropy), local, torch.Generator().manual_seed(h))
        updates.append(flat_params(m) - g)
    weights = torch.tensor([float(len(s)) for s in task.data.train], dtype=torch.float64)
    aggregate = ((weights / weights.sum()).float()) @ torch.stack(updates)
    extra = {"model_fn": task.make_model, "input_shape": tuple(task.data.input_shape),
             "local": {"lr": local.lr, "epochs": local.epochs, "batch_size": local.batch_size, "steps": local.steps},
             "num_samples": {h: len(s) for h, s in enumerate(task.data.train)},
             "weights": {h: float(w) for h, w in enumerate(weights.tolist())},
             "truth": dict(enumerate(task.data.train))}
    doc = yaml.safe_load(PRESET.read_text())
    options = {k: v for k, v in doc.items() if k not in ("attack", "description", "threat")}
    options.update(save_grid=False, target_hospital=0, target_round=seed_round)
    if iterations is not None:
        options["iterations"] = iterations
    out = {}
    for name, seen in (("hospital 0's own update", {h: u for h, u in enumerate(updates)}),
                       ("secure aggregate (joint, all 4 scored)", None)):
        gen = torch.Generator().manual_seed(_seed(scenario.seed, seed_round, 3))
        ctx = AttackContext(seed_round, None, [], len(updates), None, gen, extra=extra,
                            participants=list(range(len(updates))))
        m = InvertingGradientsAttack(**options).observe(seed_round, seen, aggregate, g, ctx)
        m.pop("stats", None)
        out[name] = m
    return {"iterations": options["iterations"], **out}


def main(argv=None) -> int:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    tb_ = sub.add_parser("table", help="PSNR / SSIM vs batch size, untrained and trained model, with and without DP-SGD")
    tb_.add_argument("--images", type=int, default=8, help="at least this many images per cell")
    tb_.add_argument("--iterations", type=int, default=500, help="Inverting Gradients iterations (preset: 2000)")
    tb_.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    tb_.add_argument("--epsilon", type=float, default=8.0, help="DP-SGD epsilon per round (delta 1e-3)")
    tb_.add_argument("--rounds", type=int, default=3, help="FedAvg rounds before the 'trained' state")
    tb_.add_argument("--states", nargs="+", default=["untrained", "trained"], choices=["untrained", "trained"])
    tb_.add_argument("--defenses", nargs="+", default=["none", "dp_sgd"], choices=["none", "dp_sgd"])
    tb_.add_argument("--seed", type=int, default=0)
    tb_.add_argument("--json", type=Path, default=None, help="also write the rows here")
    sa = sub.add_parser("secagg", help="scenarios/inversion_cxr.yaml in process: one update vs the secure aggregate")
    sa.add_argument("--iterations", type=int, default=None, help="default: the preset's")
    sa.add_argument("--scenario", type=Path, default=ROOT / "scenarios/inversion_cxr.yaml")
    sp = sub.add_parser("speed", help="iterations per second and peak memory")
    sp.add_argument("--iterations", type=int, default=200)
    fg = sub.add_parser("figure", help="one reconstruction on PneumoniaMNIST")
    fg.add_argument("--batch", type=int, default=1)
    fg.add_argument("--epochs", type=int, default=1)
    fg.add_argument("--local-batch-size", type=int, default=None)
    fg.add_argument("--local-lr", type=float, default=0.01)
    fg.add_argument("--activation", choices=["relu", "sigmoid"], default="relu")
    fg.add_argument("--iterations", type=int, default=None)
    fg.add_argument("--tv-weight", type=float, default=None)
    fg.add_argument("--restarts", type=int, default=None)
    fg.add_argument("--lr", type=float, default=None)
    fg.add_argument("--seed", type=int, default=0)
    fg.add_argument("--out", type=Path, default=None)
    sub.add_parser("figures", help="the three figures of docs/privacy-attacks.md")
    tb = sub.add_parser("tabular", help="EHR records from a heart-disease update (Cleveland site)")
    tb.add_argument("--records", type=int, default=1)
    tb.add_argument("--epochs", type=int, default=1)
    tb.add_argument("--local-batch-size", type=int, default=None)
    tb.add_argument("--model", choices=["logreg", "mlp"], default="logreg")
    tb.add_argument("--tol", type=float, default=0.1)
    tb.add_argument("--method", choices=["auto", "analytic", "optimize"], default="auto")
    args = parser.parse_args(argv)
    if args.mode == "table":
        rows = table(args.images, args.iterations, args.batches, args.epsilon, args.rounds, args.seed, args.states,
                     args.defenses)
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=1))
    elif args.mode == "secagg":
        print(yaml.safe_dump(secagg(args.iterations, args.scenario), sort_keys=False, default_flow_style=None))
    elif args.mode == "speed":
        speed(args.iterations)
    elif args.mode == "tabular":
        result = tabular(args.records, args.epochs, args.local_batch_size, args.model, args.tol, args.method)
        print(yaml.safe_dump(result, sort_keys=False, default_flow_style=None))
    elif args.mode == "figure":
        f = run_figure(args.batch, args.epochs, args.local_batch_size, args.out, args.local_lr, args.seed,
                       args.activation, iterations=args.iterations, tv_weight=args.tv_weight, restarts=args.restarts,
                       lr=args.lr)
        print(yaml.safe_dump(f, sort_keys=False))
    else:
        out = ROOT / "docs/figures"
        runs = [("inversion_b1.png", 1, 1, None), ("inversion_b8.png", 8, 1, None),
                ("inversion_multistep.png", 8, 2, 4)]
        for name, batch, epochs, bs in runs:
            f = run_figure(batch, epochs, bs, out / name)
            print(f"{name:<26} batch {batch} steps {f['local_steps']} (local bs {f['local_batch_size']}): "
                  f"PSNR {f['psnr']:.2f} dB, SSIM {f['ssim']:.3f}, labels {f['label_acc']:.2f}, "
                  f"{f['seconds']:.1f} s ({f['it_per_s']:.0f} it/s), mean-image PSNR {f['psnr_mean_image']:.2f} dB, "
                  f"peak RSS {f['peak_rss_mib']:.0f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
