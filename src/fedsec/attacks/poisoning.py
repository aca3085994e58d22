"""Data poisoning (label flip) and model poisoning (scaling / model replacement, sign flip,
Gaussian, constrain-and-scale) by a malicious hospital.

Data poisoning runs in ``poison_data`` (the hospital's ClientApp, before local training);
model poisoning in ``poison_update`` (after local training). Parameters are flat ``Tensor[d]``
vectors; an *update* is ``local - global``.
"""

from __future__ import annotations

from dataclasses import dataclass as _dataclass
from typing import Literal, Optional, Union

from fedsec.registry import ATTACKS, option

import numpy as np
import torch

from fedsec.attacks.base import Attack, AttackContext
from fedsec.data.base import Split
from fedsec.errors import FedsecError


# --- shared by the data-poisoning and backdoor attacks ---------------------------------------
def poisoned_rows(n: int, fraction: float, rng: np.random.Generator) -> torch.Tensor:
    """The sorted indices (``Tensor[k]`` int64) of the ``k = round(fraction * n)`` rows to
    poison, drawn without replacement from ``rng`` (seeded per round and hospital)."""
    k = int(round(float(fraction) * n))
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.as_tensor(np.sort(rng.choice(n, size=k, replace=False)), dtype=torch.long)


def check_fraction(attack: Attack, option: str = "poison_fraction") -> float:
    value = attack.options[option]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise attack.option_error(option, "must be a number in [0, 1]")
    return float(value)


def task_attr(ctx: AttackContext | None, attr: str):
    """``ctx.task.<attr>``, or ``ctx.task.data.<attr>`` (a Task wrapping a FederatedDataset),
    or None when the context carries no task."""
    task = getattr(ctx, "task", None) if ctx is not None else None
    for owner in (task, getattr(task, "data", None), getattr(task, "dataset", None)):
        if owner is not None and getattr(owner, attr, None) is not None:
            return getattr(owner, attr)
    return None


# --- shared by the model-poisoning and backdoor attacks --------------------------------------
def auto_factor_knowledge(options: dict, key: str) -> dict:
    """``threat_for`` of an attack whose boost ``key`` may be ``auto``: n_hospitals / n_malicious
    of the round needs the round's participants (white box); a fixed number needs nothing the
    hospital does not hold (black box)."""
    return {"knowledge": "white_box" if options.get(key) == "auto" else "black_box"}


def boost_factor(ctx: AttackContext) -> float:
    """Model-replacement boost ``n / m`` (Bagdasaryan et al. 2020, with FedAvg's server lr 1):
    n hospitals in the round, m of them malicious, each sending ``global + (n/m) * update``
    so that the coalition's scaled updates replace the global model under plain averaging.
    n and m count the round's participants (``AttackContext.participants``): with
    ``federation.fraction_train < 1`` the average is over the round's hospitals, not the
    consortium. Without that list, the whole consortium (every hospital trains every round)."""
    if ctx.participants:
        n = len(ctx.participants)
        m = len(set(ctx.malicious) & set(ctx.participants))
    else:
        n = int(ctx.num_hospitals or 0)
        m = len(ctx.malicious)
    if n <= 0:
        raise FedsecError("model replacement needs the number of hospitals (AttackContext.num_hospitals); "
                          "set an explicit boost / gamma instead of 'auto'")
    return n / max(1, m)


def parse_factor(attack: Attack, option: str, ctx: AttackContext) -> float:
    """An option that is a number or ``auto`` (= :func:`boost_factor`; null counts as auto)."""
    value = attack.options[option]
    if value is None or value == "auto":
        return boost_factor(ctx)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise attack.option_error(option, "must be a number or 'auto'")
    return float(value)


def check_factor_option(attack: Attack, option: str) -> None:
    value = attack.options[option]
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise attack.option_error(option, "must be a number or 'auto'")


def check_norm_bound(attack: Attack, option: str = "norm_bound", allow_none: bool = True) -> float | None:
    value = attack.options[option]
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0:
        raise attack.option_error(option, "must be a positive number" + (" or null" if allow_none else ""))
    return float(value)


def scaled_params(global_params: torch.Tensor, local_params: torch.Tensor, gamma: float,
                  norm_bound: float | None = None) -> torch.Tensor:
    """``global + u`` with ``u = gamma * (local - global)``, then, when ``norm_bound`` is set,
    ``u`` projected onto the L2 ball of that radius (``u * min(1, norm_bound / ||u||)``)."""
    update = (local_params - global_params) * gamma
    if norm_bound is not None:
        norm = float(update.double().norm())
        if norm > norm_bound:
            update = update * (norm_bound / norm)
    return global_params + update


# --- data poisoning -----------------------------------------------------------------------------
@ATTACKS.register()
class LabelFlip(Attack):
    """Flip the labels of a random ``poison_fraction`` of the hospital's training rows.

    mode ``all_to_one``: every poisoned row gets label ``target``. ``pairwise``: labels are
    mapped through ``mapping`` ({source: destination}, applied simultaneously; labels not in it
    stay); without a mapping, consecutive classes swap (0<->1, 2<->3, ...). ``shift``:
    ``y -> (y + shift) mod num_classes``. ``num_classes``: null = the task's, else the data's
    ``max(y) + 1``. Multi-label rows (float ``[N, K]``): all_to_one sets the row to the one-hot
    ``target``, pairwise swaps / maps label columns, shift rolls the columns.
    """

    name = "label_flip"
    goal = "integrity"
    kind = "data_poisoning"
    success_metric = "accuracy"
    success_wording = "the main task's accuracy / balanced accuracy falls"

    @_dataclass
    class Options:
        mode: str = option("all_to_one", "how labels are flipped", choices=("all_to_one", "pairwise", "shift"))
        target: int = option(0, "all_to_one: the label every poisoned row gets", min=0)
        mapping: Optional[dict] = option(None, "pairwise: {source: destination} labels (null: swap 0<->1, 2<->3...)")
        shift: int = option(1, "shift: y -> (y + shift) mod num_classes")
        poison_fraction: float = option(1.0, "share of the hospital's training rows poisoned", min=0.0, max=1.0)
        num_classes: Optional[int] = option(None, "null = the task's number of classes", min=2)
    modes = ("all_to_one", "pairwise", "shift")

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if o["mode"] not in self.modes:
            raise self.option_error("mode", f"must be one of {', '.join(self.modes)}")
        self.fraction = check_fraction(self)
        for key in ("target", "shift"):
            if isinstance(o[key], bool) or not isinstance(o[key], int):
                raise self.option_error(key, "must be an integer")
        if o["num_classes"] is not None and (not isinstance(o["num_classes"], int) or o["num_classes"] < 2):
            raise self.option_error("num_classes", "must be an integer >= 2 or null")
        self.mapping = None
        if o["mapping"] is not None:
            if not isinstance(o["mapping"], dict):
                raise self.option_error("mapping", "must be a {source: destination} mapping of labels")
            try:
                self.mapping = {int(k): int(v) for k, v in o["mapping"].items()}
            except (TypeError, ValueError):
                raise self.option_error("mapping", "must map integer labels to integer labels") from None
        self.last_poisoned = torch.zeros(0, dtype=torch.long)  # rows poisoned by the last call

    def _num_classes(self, y: torch.Tensor, ctx: AttackContext | None) -> int:
        k = self.options["num_classes"] or task_attr(ctx, "num_classes")
        if k:
            return int(k)
        return int(y.shape[1]) if y.dim() == 2 else int(y.max()) + 1

    def label_map(self, num_classes: int) -> torch.Tensor:
        """``Tensor[num_classes]``: new label of each class under this attack's mode."""
        identity = torch.arange(num_classes)
        mode = self.options["mode"]
        if mode == "all_to_one":
            return torch.full((num_classes,), int(self.options["target"]))
        if mode == "shift":
            return (identity + int(self.options["shift"])) % num_classes
        mapping = self.mapping
        if mapping is None:  # swap neighbours; an odd last class keeps its label
            mapping = {c: c ^ 1 for c in range(num_classes) if (c ^ 1) < num_classes}
        table = identity.clone()
        for src, dst in mapping.items():
            if not (0 <= src < num_classes and 0 <= dst < num_classes):
                raise self.option_error("mapping", f"has a label outside 0..{num_classes - 1}")
            table[src] = dst
        return table

    def flip(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The flipped version of labels ``y`` (all rows)."""
        table = self.label_map(num_classes).to(y.device)
        if y.dim() == 1:
            return table[y]
        if self.options["mode"] == "all_to_one":  # multi-label: one-hot target
            out = torch.zeros_like(y)
            out[:, int(self.options["target"])] = 1
            return out
        out = torch.zeros_like(y)  # column c of the input moves to column table[c]
        out[:, table] = y  # a permutation for shift / swaps; a many-to-one mapping keeps the last
        return out

    def poison_data(self, data: Split, rng: np.random.Generator, ctx: AttackContext) -> Split:
        rows = poisoned_rows(len(data), self.fraction, rng)
        self.last_poisoned = rows
        y = data.y.clone()
        if len(rows):
            k = self._num_classes(data.y, ctx)
            if self.options["mode"] == "all_to_one" and not 0 <= int(self.options["target"]) < k:
                raise self.option_error("target", f"must be a class in 0..{k - 1}")
            y[rows] = self.flip(data.y[rows], k)
        return Split(data.x, y)


# --- model poisoning ----------------------------------------------------------------------------
@ATTACKS.register()
class Scaling(Attack):
    """Model replacement (Bagdasaryan et al. 2020): send ``global + gamma * (local - global)``.

    gamma ``auto`` = n_hospitals / n_malicious of the round, the boost that makes the coalition's model
    replace the global one under FedAvg (sample-weighted FedAvg needs total / own samples
    instead: give gamma explicitly). Combine it with a data-poisoning attack on the same
    hospitals, or use a backdoor's own ``boost`` option.
    """

    name = "scaling"
    verb = "sends boosted updates"
    goal = "integrity"
    kind = "model_poisoning"

    @_dataclass
    class Options:
        gamma: Union[float, Literal["auto"], None] = option("auto", "boost factor; auto = hospitals / malicious")

    @classmethod
    def threat_for(cls, options: dict) -> dict:
        return auto_factor_knowledge(options, "gamma")

    def __init__(self, **options):
        super().__init__(**options)
        check_factor_option(self, "gamma")

    def poison_update(self, global_params, local_params, ctx):
        return scaled_params(global_params, local_params, parse_factor(self, "gamma", ctx))


@ATTACKS.register()
class SignFlip(Attack):
    """Send the reversed update ``global - scale * (local - global)`` (untargeted)."""

    name = "sign_flip"
    verb = "sends reversed updates"
    success_metric = "auroc"
    success_wording = "the global model's AUROC / balanced accuracy falls against the no-attack run"
    goal = "availability"
    kind = "model_poisoning"

    @_dataclass
    class Options:
        scale: float = option(1.0, "the reversed update is multiplied by this")

    def __init__(self, **options):
        super().__init__(**options)
        s = self.options["scale"]
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise self.option_error("scale", "must be a number")

    def poison_update(self, global_params, local_params, ctx):
        return scaled_params(global_params, local_params, -float(self.options["scale"]))


@ATTACKS.register()
class GaussianNoise(Attack):
    """Gaussian (Byzantine) update.

    mode ``replace``: send ``global + N(0, sigma^2 I)`` (the update *is* noise, the classic
    Gaussian Byzantine attack of Blanchard et al. 2017 / Fang et al. 2020). mode ``add``: send
    ``local + N(0, sigma^2 I)`` (the honest update plus noise). Noise is drawn from
    ``ctx.generator`` (seeded per round and hospital).
    """

    name = "gaussian"
    verb = "sends random-noise updates"
    success_metric = "auroc"
    success_wording = "the global model's AUROC / balanced accuracy falls against the no-attack run"
    goal = "availability"
    kind = "model_poisoning"

    @_dataclass
    class Options:
        sigma: float = option(1.0, "standard deviation of the noise", gt=0.0)
        mode: str = option("replace", "replace: the update is noise; add: honest update + noise",
                           choices=("replace", "add"))

    def __init__(self, **options):
        super().__init__(**options)
        check_norm_bound(self, "sigma", allow_none=False)
        if self.options["mode"] not in ("replace", "add"):
            raise self.option_error("mode", "must be 'replace' or 'add'")

    def poison_update(self, global_params, local_params, ctx):
        gen = ctx.generator if ctx.generator is not None else torch.Generator().manual_seed(0)
        noise = torch.randn(global_params.shape, generator=gen, dtype=torch.float64)
        noise = (noise * float(self.options["sigma"])).to(global_params.dtype).to(global_params.device)
        base = global_params if self.options["mode"] == "replace" else local_params
        return base + noise


@ATTACKS.register()
class ConstrainAndScale(Attack):
    """Scale the update by gamma, then project it onto the L2 ball of radius ``norm_bound``
    so that it passes a norm-bounding / clipping defense (Bagdasaryan et al. 2020's
    constrain-and-scale, in the projected form of Sun et al. 2019 and Wang et al. 2020).
    Set ``norm_bound`` to (at most) the defense's clipping norm. The paper also adds an
    anomaly-evasion term to the training loss; that part is not modelled here."""

    name = "constrain_and_scale"
    goal = "integrity"
    kind = "model_poisoning"

    @_dataclass
    class Options:
        gamma: Union[float, Literal["auto"], None] = option("auto", "boost factor; auto = hospitals / malicious")
        norm_bound: float = option(1.0, "L2 bound the scaled update is projected onto", gt=0.0)

    @classmethod
    def threat_for(cls, options: dict) -> dict:
        return auto_factor_knowledge(options, "gamma")

    def __init__(self, **options):
        super().__init__(**options)
        check_factor_option(self, "gamma")
        self.norm_bound = check_norm_bound(self, allow_none=False)

    def poison_update(self, global_params, local_params, ctx):
        return scaled_params(global_params, local_params, parse_factor(self, "gamma", ctx), self.norm_bound)
