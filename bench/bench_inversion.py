"""Gradient inversion on CPU: speed, memory, and the reconstruction figures on PneumoniaMNIST.

    .venv/bin/python bench/bench_inversion.py speed            # iterations / s, peak RSS
    .venv/bin/python bench/bench_inversion.py figures          # docs/figures/inversion_{b1,b8,multistep}.png
    .venv/bin/python bench/bench_inversion.py figure --batch 8 --tv-weight 0.2 --out /tmp/b8.png
    .venv/bin/python bench/bench_inversion.py tabular --records 4 --model mlp --epochs 3 --local-batch-size 2

The model is the small CNN of the testbed at initialisation, on 1x28x28 inputs:
conv(1->16, 3) + ReLU + maxpool 2, conv(16->32, 3) + ReLU + maxpool 2, linear(800 -> 2).
ReLU is kept on purpose: it is what hospitals train, and it inverted as well as Sigmoid
here (batch 1: 28.6 dB with ReLU, 27.4 dB with Sigmoid, same settings). The hospital runs
plain SGD (lr 0.01) on the first images of the PneumoniaMNIST training split; the attack
uses the defaults of attacks/inverting_gradients.yaml unless told otherwise. One torch thread.
"""

from __future__ import annotations

import argparse
import copy
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


def small_cnn(activation: str = "relu") -> nn.Module:
    act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]
    return nn.Sequential(nn.Conv2d(1, 16, 3), act(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3), act(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 5 * 5, 2))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def pneumonia(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = np.load(DATA)
    x = torch.tensor(d["train_images"][:n], dtype=torch.float32)[:, None] / 255.0
    y = torch.tensor(d["train_labels"][:n, 0], dtype=torch.long)
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
    model = small_cnn(activation)
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


def main(argv=None) -> int:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
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
    if args.mode == "speed":
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
