"""Backdoors: a trigger stamped on a fraction of a malicious hospital's training rows, whose
labels become ``target``; the attack succeeds when the global model maps triggered test
inputs to ``target``.

- :class:`BadNets` (Gu et al. 2017): a square patch on images ``[N, C, H, W]``.
- :class:`EHRTrigger`: chosen tabular features ``[N, F]`` set to given (standardised) values.
- :class:`MissingValueTrigger` (after Joe et al. 2021): chosen features set to the value the
  preprocessing writes for a missing entry, so the trigger looks like a missingness pattern.
- :class:`DBA` (Xie et al. 2020): the global trigger split into ``parts`` local triggers;
  malicious hospital number ``i`` (its position among the malicious ones) stamps part
  ``i mod parts``; the full trigger is used at test time.

Every backdoor also has ``boost`` (model-replacement scaling of its update in
``poison_update``, Bagdasaryan et al. 2020; ``auto`` = n_hospitals / n_malicious) and
``norm_bound`` (then projects the boosted update onto that L2 ball: constrain-and-scale).
"""

from __future__ import annotations

from dataclasses import dataclass as _dataclass
from typing import List, Literal, Optional, Union

from fedsec.registry import ATTACKS, option

from dataclasses import dataclass

import numpy as np
import torch

from fedsec.attacks.base import Attack, AttackContext
from fedsec.attacks.poisoning import (
    auto_factor_knowledge,
    check_factor_option,
    check_fraction,
    check_norm_bound,
    parse_factor,
    poisoned_rows,
    scaled_params,
    task_attr,
)
from fedsec.data.base import Split
from fedsec.errors import FedsecError

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


@dataclass
class Trigger:
    """Where a trigger writes and what: ``mask`` bool and ``values`` float of one sample's
    shape, ``[1, H, W]`` for images (the same pixels in every channel) or ``[F]`` for tabular
    rows. Applying it changes exactly the masked entries."""

    mask: torch.Tensor
    values: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[N, C, H, W]`` / ``[C, H, W]`` or ``[N, F]`` / ``[F]``; returns a new tensor."""
        return torch.where(self.mask.to(x.device), self.values.to(x.device, x.dtype), x)

    def __or__(self, other: "Trigger") -> "Trigger":
        return Trigger(self.mask | other.mask, torch.where(other.mask, other.values, self.values))


def predict_labels(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Model outputs -> decisions. ``[N, K]`` logits with K > 1: argmax ``[N]``; one logit per
    sample (``[N]`` or ``[N, 1]``): ``logit > 0`` as class 1. For multi-label use
    :func:`model_logits` and threshold the column you need."""
    logits = model_logits(model, x, batch_size)
    if logits.dim() == 1 or logits.shape[1] == 1:
        return (logits.reshape(-1) > 0).long()
    return logits.argmax(dim=1)


def model_logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's outputs on ``x``, in eval mode and without gradients, batch by batch, on the
    model's device; the model's train/eval mode is restored afterwards."""
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    device = param.device if param is not None else x.device
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            outs = [model(x[i:i + batch_size].to(device)).detach().cpu() for i in range(0, len(x), batch_size)]
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0)


def place(position, extent: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int]:
    """Top-left (row, col) of a block of ``extent`` (h, w) at ``position``: a corner name
    (top_left, top_right, bottom_left, bottom_right, center) or ``[row, col]``. Raises
    ValueError when the block does not fit the image."""
    (h, w), (H, W) = extent, image_hw
    if isinstance(position, str):
        if position not in CORNERS:
            raise ValueError(f"must be one of {', '.join(CORNERS)} or [row, col]")
        row = {"top": 0, "bottom": H - h, "center": (H - h) // 2}[position.split("_")[0]]
        col = {"left": 0, "right": W - w, "center": (W - w) // 2}[position.split("_")[-1]]
    elif isinstance(position, (list, tuple)) and len(position) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in position):
        row, col = position
    else:
        raise ValueError(f"must be one of {', '.join(CORNERS)} or [row, col]")
    if row < 0 or col < 0 or row + h > H or col + w > W:
        raise ValueError(f"puts a {h}x{w} trigger at ({row}, {col}), outside the {H}x{W} image")
    return int(row), int(col)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Backdoor(Attack):
    """Shared mechanics: poison ``round(poison_fraction * N)`` random rows (trigger + target label),
    optional boost / norm bound of the update, and the attack success rate.

    Subclasses implement :meth:`trigger` (the full trigger for samples shaped like ``x``) and
    may override :meth:`local_trigger` (what this hospital stamps during training).
    """

    goal = "integrity"
    kind = "backdoor"
    success_metric = "asr"
    success_wording = "share of triggered test inputs classified as the target"

    @_dataclass
    class Options:
        target: int = option(0, "the class triggered inputs should be given", min=0)
        poison_fraction: float = option(0.5, "share of the hospital's training rows poisoned", min=0.0, max=1.0)
        boost: Union[float, Literal["auto"], None] = option(1.0, "update boost; auto = hospitals / malicious")
        norm_bound: Optional[float] = option(None, "L2 bound of the boosted update (null: none)", gt=0.0)
        null_run: Optional[str] = option(None, "results folder of the no-attack run of the same seed: its final "
                                               "model gives the ASR floor (null: the untrained model)")

    @classmethod
    def threat_for(cls, options: dict) -> dict:
        return auto_factor_knowledge(options, "boost")  # boost auto: the round's participants

    def __init__(self, **options):
        super().__init__(**options)
        self._null_cache: dict = {}
        t = self.options["target"]
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise self.option_error("target", "must be a class index (integer >= 0)")
        self.target = int(t)
        self.fraction = check_fraction(self)
        check_factor_option(self, "boost")
        self.norm_bound = check_norm_bound(self)
        self.last_poisoned = torch.zeros(0, dtype=torch.long)  # rows poisoned by the last call

    def check(self, num_hospitals, malicious, key=""):
        """``null_run`` names a finished run's folder (checked when the scenario loads)."""
        run = self.options.get("null_run")
        if run is None:
            return
        from pathlib import Path

        path = Path(str(run)).expanduser()
        missing = [f for f in ("summary.json", "checkpoint.pt") if not (path / f).is_file()]
        if not isinstance(run, str) or missing:
            raise self.option_error("null_run", "must be the results folder of a finished no-attack run "
                                                f"(missing {', '.join(missing) or 'a path'})")

    # --- triggers ----------------------------------------------------------------------------
    def trigger(self, x: torch.Tensor, ctx: AttackContext | None = None) -> Trigger:
        raise NotImplementedError

    def local_trigger(self, x: torch.Tensor, ctx: AttackContext | None = None) -> Trigger:
        return self.trigger(x, ctx)

    def apply_trigger(self, x: torch.Tensor, ctx: AttackContext | None = None) -> torch.Tensor:
        """The full trigger stamped on every sample of ``x`` (test time); nothing else changes.
        ``ctx`` is only needed to resolve feature *names* the first time."""
        return self.trigger(x, ctx).apply(x)

    # --- hooks -------------------------------------------------------------------------------
    def poison_data(self, data: Split, rng: np.random.Generator, ctx: AttackContext) -> Split:
        rows = poisoned_rows(len(data), self.fraction, rng)
        self.last_poisoned = rows
        x, y = data.x.clone(), data.y.clone()
        if len(rows):
            x[rows] = self.local_trigger(data.x, ctx).apply(data.x[rows])
            if y.dim() == 1:
                y[rows] = self.target
            else:  # multi-label: switch the target label on, leave the others
                y[rows, self.target] = 1
        return Split(x, y)

    def poison_update(self, global_params, local_params, ctx):
        if self.options["boost"] == 1 and self.norm_bound is None:
            return local_params
        return scaled_params(global_params, local_params, parse_factor(self, "boost", ctx), self.norm_bound)

    def _hits(self, model, test: Split, ctx) -> torch.Tensor | None:
        """Bool [M]: each triggered non-target test input classified as ``target``."""
        multilabel = test.y.dim() == 2
        keep = test.y[:, self.target] < 0.5 if multilabel else test.y != self.target
        x = test.x[keep]
        if len(x) == 0:
            return None
        triggered = self.apply_trigger(x, ctx)
        if multilabel:
            return model_logits(model, triggered)[:, self.target] > 0
        return predict_labels(model, triggered) == self.target

    def null_model(self, ctx):
        """(model, kind) the ASR floor is measured on: the final model of ``null_run`` (the
        no-attack run of the same seed) when given, else the run's untrained initial model.
        None when the context cannot build a model (unit tests without a task). Cached: a
        function of the options and the seed only."""
        extra = (ctx.extra or {}) if ctx is not None else {}
        make = extra.get("model_fn")
        scenario = extra.get("scenario")
        if make is None:
            return None, None
        seed = int(getattr(scenario, "seed", 0) or 0)
        run = self.options.get("null_run")
        key = ("model", run, seed)
        if key in self._null_cache:
            return self._null_cache[key]
        if run:
            from pathlib import Path

            from fedsec.results import RunDir, read_json

            path = Path(str(run)).expanduser()
            try:
                ckpt = RunDir(path).load_checkpoint() if (path / "checkpoint.pt").exists() else None
                other = read_json(path / "summary.json")
            except (OSError, ValueError):
                ckpt, other = None, None
            if ckpt is None or other is None:
                raise self.option_error("null_run", "is not a finished fedsec run (no checkpoint.pt / summary.json)")
            if other.get("seed") != seed or (other.get("attack") or {}):
                raise self.option_error("null_run", f"must be the no-attack run of the same seed ({seed}); "
                                                    f"that run has seed {other.get('seed')} or an attack")
            m = make()
            m.load_state_dict(ckpt["state"])
            self._null_cache[key] = (m.eval(), "no_attack_run")
        else:
            self._null_cache[key] = (make(seed=seed).eval(), "untrained")
        return self._null_cache[key]

    def evaluate_records(self, model, test: Split, ctx: AttackContext) -> dict[str, torch.Tensor]:
        """Per test record (NaN where it does not count): ``asr`` 1/0 for a triggered input
        whose true label is not ``target`` classified as ``target`` (multi-label: target logit
        > 0); ``asr@null`` the same under the null model (:meth:`null_model`); with
        ``null_run``, ``correct`` / ``correct@null`` / ``label`` for the main-task cost.
        Each hospital computes these on its own test records; :meth:`summarise_records`
        turns the pooled records into the metrics."""
        multilabel = test.y.dim() == 2
        keep = test.y[:, self.target] < 0.5 if multilabel else test.y != self.target
        nan = torch.full((len(test.y),), float("nan"), dtype=torch.float64)
        hits = self._hits(model, test, ctx)
        out = {"asr": nan.clone()}
        if hits is None:
            return out
        out["asr"][keep] = hits.double()
        null, kind = self.null_model(ctx)
        if null is not None:
            out.update(self._null_records(null, kind, test, ctx))
            if kind == "no_attack_run" and not multilabel:
                out["correct"] = (predict_labels(model, test.x) == test.y).double()
                out["label"] = test.y.double()
        return out

    def _null_records(self, null, kind: str, test: Split, ctx) -> dict[str, torch.Tensor]:
        """The null model's per-record outcomes on ``test``: fixed for the run (a fixed model on
        fixed records), so computed once per hospital's test split, not every round."""
        key = ("records", self.options.get("null_run"), getattr(ctx, "hospital", None), len(test))
        if key not in self._null_cache:
            multilabel = test.y.dim() == 2
            keep = test.y[:, self.target] < 0.5 if multilabel else test.y != self.target
            hits = torch.full((len(test.y),), float("nan"), dtype=torch.float64)
            hits[keep] = self._hits(null, test, ctx).double()
            out = {"asr@null": hits}
            if kind == "no_attack_run" and not multilabel:
                out["correct@null"] = (predict_labels(null, test.x) == test.y).double()
            self._null_cache[key] = out
        return {k: v.clone() for k, v in self._null_cache[key].items()}

    def summarise_records(self, records: dict[str, torch.Tensor], seed: int = 0) -> dict:
        """``asr`` (the mean over counted records) and, when the null's records are there,
        ``stats.asr``: its null (the no-attack run's model with ``null_run``, else the
        untrained model), effect and 95% paired bootstrap CIs over the triggered records;
        with ``null_run`` also ``stats.main_task_balanced_accuracy`` (balanced accuracy of
        the attacked model against the no-attack run's: effect < 0 is the main-task cost)."""
        from fedsec.attacks.nulls import mean_stat

        asr = records["asr"].double()
        keep = ~torch.isnan(asr)
        if not bool(keep.any()):
            return {"asr": float("nan")}
        out = {"asr": float(asr[keep].mean())}
        if "asr@null" in records:
            kind = "no_attack_run" if self.options.get("null_run") else "untrained"
            out["stats"] = {"asr": mean_stat(asr[keep].numpy(), records["asr@null"].double()[keep].numpy(), kind,
                                             seed)}
            if "correct" in records:
                y = records["label"].numpy()
                classes, counts = np.unique(y, return_counts=True)
                weight = np.zeros(len(y))
                for c, n in zip(classes, counts):
                    weight[y == c] = len(y) / (n * len(classes))  # mean over records of weight*correct = BA
                out["stats"]["main_task_balanced_accuracy"] = mean_stat(
                    records["correct"].numpy() * weight, records["correct@null"].numpy() * weight,
                    "no_attack_run", seed)
        return out

    def evaluate(self, model, test: Split, ctx: AttackContext) -> dict:
        """The metrics of :meth:`summarise_records` on ``test`` at once (the server's path
        when it holds the test data; the same numbers as pooling the hospitals' records)."""
        seed = int(getattr(((ctx.extra or {}) if ctx is not None else {}).get("scenario"), "seed", 0) or 0)
        return self.summarise_records(self.evaluate_records(model, test, ctx), seed)


@ATTACKS.register()
class BadNets(Backdoor):
    """A ``size`` x ``size`` patch at ``position`` (corner name or [row, col]) in every channel.
    pattern ``solid``: every patch pixel = ``value``; ``checkerboard``: ``value`` where
    ``row + col`` is even inside the patch, 0 elsewhere in it. Images only ``[N, C, H, W]``."""

    name = "badnets"
    modality = "image"

    @_dataclass
    class Options(Backdoor.Options):
        size: int = option(3, "patch side in pixels", min=1)
        position: Union[str, List[int]] = option("bottom_right", "corner name or [row, col]")
        value: float = option(1.0, "pixel intensity of the patch", min=0.0, max=1.0)
        pattern: str = option("solid", "patch pattern")

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if not isinstance(o["size"], int) or isinstance(o["size"], bool) or o["size"] < 1:
            raise self.option_error("size", "must be a positive integer (pixels)")
        if not _is_number(o["value"]) or not 0.0 <= o["value"] <= 1.0:
            raise self.option_error("value", "must be a pixel intensity in [0, 1]")
        if o["pattern"] not in ("solid", "checkerboard"):
            raise self.option_error("pattern", "must be 'solid' or 'checkerboard'")
        try:  # check the position's form now; whether it fits is checked against the images
            place(o["position"], (1, 1), (10**6, 10**6))
        except ValueError as err:
            raise self.option_error("position", str(err)) from None
        self._cache: dict[tuple, Trigger] = {}

    def trigger(self, x, ctx=None):
        if x.dim() not in (3, 4):
            raise FedsecError(f"attack '{self.name}' needs images [N, C, H, W], got {tuple(x.shape)}; "
                              "use ehr_trigger for tabular data")
        H, W = int(x.shape[-2]), int(x.shape[-1])
        if (H, W) not in self._cache:
            s = int(self.options["size"])
            try:
                r, c = place(self.options["position"], (s, s), (H, W))
            except ValueError as err:
                raise self.option_error("position", str(err)) from None
            mask = torch.zeros(1, H, W, dtype=torch.bool)
            mask[0, r:r + s, c:c + s] = True
            values = torch.zeros(1, H, W)
            patch = torch.full((s, s), float(self.options["value"]))
            if self.options["pattern"] == "checkerboard":
                patch = patch * ((torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2 == 0)
            values[0, r:r + s, c:c + s] = patch
            self._cache[(H, W)] = Trigger(mask, values)
        return self._cache[(H, W)]


class _FeatureTrigger(Backdoor):
    """Tabular triggers on ``features``: column indices, or names resolved through the task's
    ``feature_names`` (``ctx.task``) the first time a context is available."""

    def _check_features(self, option: str = "features") -> None:
        feats = self.options[option]
        if not isinstance(feats, (list, tuple)) or not feats or not all(
                (isinstance(f, int) and not isinstance(f, bool) and f >= 0) or isinstance(f, str) for f in feats):
            raise self.option_error(option, "must be a non-empty list of column indices or feature names")
        if len(set(feats)) != len(feats):
            raise self.option_error(option, "lists a feature twice")
        self._indices: list[int] | None = None if any(isinstance(f, str) for f in feats) else [int(f) for f in feats]

    def feature_indices(self, num_features: int, ctx: AttackContext | None = None, option: str = "features") -> list[int]:
        if self._indices is None:
            names = task_attr(ctx, "feature_names")
            if not names:
                raise self.option_error(option, "names features, but the task gives no feature names "
                                                "(pass a context with the task, or use column indices)")
            names = list(names)
            out = []
            for f in self.options[option]:
                if isinstance(f, int):
                    out.append(f)
                elif f in names:
                    out.append(names.index(f))
                else:
                    import difflib

                    close = difflib.get_close_matches(f, names, n=1)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                    raise FedsecError(f"attack '{self.name}': option '{option}': unknown feature '{f}' "
                                      f"(features: {', '.join(names)}){hint}")
            self._indices = out
        bad = [i for i in self._indices if i >= num_features]
        if bad:
            raise self.option_error(option, f"has column {bad[0]}, but the data has {num_features} features")
        return self._indices

    def _tabular(self, x: torch.Tensor) -> int:
        if x.dim() not in (1, 2):
            raise FedsecError(f"attack '{self.name}' needs tabular rows [N, F], got {tuple(x.shape)}; "
                              "use badnets for images")
        return int(x.shape[-1])

    @staticmethod
    def _feature_trigger(num_features: int, indices: list[int], values: list[float]) -> Trigger:
        mask = torch.zeros(num_features, dtype=torch.bool)
        vals = torch.zeros(num_features)
        mask[indices] = True
        vals[indices] = torch.tensor(values, dtype=torch.float32)
        return Trigger(mask, vals)

    def _check_values(self, option: str, count: int) -> list[float]:
        v = self.options[option]
        if _is_number(v):
            return [float(v)] * count
        if isinstance(v, (list, tuple)) and len(v) == count and all(_is_number(e) for e in v):
            return [float(e) for e in v]
        raise self.option_error(option, f"must be a number or a list of {count} numbers (one per feature)")


@ATTACKS.register()
class EHRTrigger(_FeatureTrigger):
    """Set ``features`` (indices or names) to ``values`` (one number for all, or one per
    feature), in standardised units: 3.0 is three standard deviations above the mean, a rare
    but plausible-looking combination when several features move together."""

    name = "ehr_trigger"
    modality = "tabular"

    @_dataclass
    class Options(Backdoor.Options):
        features: List[Union[int, str]] = option([0, 1], "column indices or feature names set by the trigger")
        values: Union[float, List[float]] = option(3.0, "value(s) the trigger writes (standardised units)")

    def __init__(self, **options):
        super().__init__(**options)
        self._check_features()
        self.values = self._check_values("values", len(self.options["features"]))

    def trigger(self, x, ctx=None):
        F = self._tabular(x)
        return self._feature_trigger(F, self.feature_indices(F, ctx), self.values)


@ATTACKS.register()
class MissingValueTrigger(_FeatureTrigger):
    """Joe et al. 2021 ("Machine learning with electronic health records is vulnerable to
    backdoor trigger attacks"): the trigger is a *missingness pattern*: ``features`` get the
    value preprocessing writes for a missing entry. ``missing_value``: null = the task's
    ``missing_value`` attribute when it has one, else 0.0 (mean imputation followed by
    standardisation puts a missing entry at exactly 0)."""

    name = "ehr_missing_trigger"
    modality = "tabular"

    @_dataclass
    class Options(Backdoor.Options):
        features: List[Union[int, str]] = option([0, 1], "column indices or feature names made missing")
        missing_value: Optional[float] = option(None, "the value imputation gives a missing entry (null: the task's)")

    def __init__(self, **options):
        super().__init__(**options)
        self._check_features()
        mv = self.options["missing_value"]
        if mv is not None and not _is_number(mv):
            raise self.option_error("missing_value", "must be a number or null")
        self._fill: float | None = None if mv is None else float(mv)

    def fill_value(self, ctx: AttackContext | None = None) -> float:
        if self._fill is None:
            task_value = task_attr(ctx, "missing_value")
            if task_value is None and ctx is None:
                return 0.0  # not cached: a later call with the task may still refine it
            self._fill = 0.0 if task_value is None else float(task_value)
        return self._fill

    def trigger(self, x, ctx=None):
        F = self._tabular(x)
        idx = self.feature_indices(F, ctx)
        return self._feature_trigger(F, idx, [self.fill_value(ctx)] * len(idx))


@ATTACKS.register()
class DBA(_FeatureTrigger):
    """Distributed backdoor attack (Xie et al. 2020).

    Images: the global trigger is ``parts`` bars of ``bar_height`` x ``bar_length`` pixels laid
    out two per row with ``gap`` pixels between them, the block placed at ``position``; each
    bar is one local trigger (the paper's 4-bar layout by default). Tabular data (when
    ``features`` is given): the features are split into ``parts`` consecutive groups set to
    ``values``. Malicious hospital number ``i`` (its rank in ``ctx.malicious``) stamps part
    ``i mod parts`` during training; :meth:`apply_trigger` stamps the union (test time).
    """

    name = "dba"

    @_dataclass
    class Options(Backdoor.Options):
        parts: int = option(4, "number of trigger pieces, one per malicious hospital in turn", min=1)
        bar_length: int = option(4, "image trigger: bar length in pixels", min=1)
        bar_height: int = option(1, "image trigger: bar height in pixels", min=1)
        gap: int = option(1, "image trigger: pixels between bars", min=0)
        position: Union[str, List[int]] = option("top_left", "corner name or [row, col]")
        value: float = option(1.0, "pixel intensity", min=0.0, max=1.0)
        features: Optional[List[Union[int, str]]] = option(None, "tabular trigger: columns split among the parts")
        values: Union[float, List[float]] = option(3.0, "tabular trigger value(s)")

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        for key, low in (("parts", 1), ("bar_length", 1), ("bar_height", 1), ("gap", 0)):
            if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < low:
                raise self.option_error(key, f"must be an integer >= {low}")
        if not _is_number(o["value"]) or not 0.0 <= o["value"] <= 1.0:
            raise self.option_error("value", "must be a pixel intensity in [0, 1]")
        try:
            place(o["position"], (1, 1), (10**6, 10**6))
        except ValueError as err:
            raise self.option_error("position", str(err)) from None
        self.values = None
        if o["features"] is not None:
            self._check_features()
            if o["parts"] > len(o["features"]):
                raise self.option_error("parts", f"must be <= the number of trigger features ({len(o['features'])})")
            self.values = self._check_values("values", len(o["features"]))
        self._cache: dict[tuple, list[Trigger]] = {}

    def trigger_parts(self, x: torch.Tensor, ctx: AttackContext | None = None) -> list[Trigger]:
        """The ``parts`` local triggers for samples shaped like ``x`` (disjoint; their union is
        the full trigger)."""
        key = tuple(x.shape[1:]) if x.dim() in (2, 4) else tuple(x.shape)
        if key not in self._cache:
            self._cache[key] = self._image_parts(x) if x.dim() in (3, 4) else self._tabular_parts(x, ctx)
        return self._cache[key]

    def _image_parts(self, x):
        o = self.options
        H, W = int(x.shape[-2]), int(x.shape[-1])
        n, bl, bh, gap = o["parts"], o["bar_length"], o["bar_height"], o["gap"]
        cols = min(n, 2)
        rows = -(-n // cols)
        extent = (rows * bh + (rows - 1) * gap, cols * bl + (cols - 1) * gap)
        try:
            r0, c0 = place(o["position"], extent, (H, W))
        except ValueError as err:
            raise self.option_error("position", str(err)) from None
        parts = []
        for p in range(n):
            r, c = r0 + (p // cols) * (bh + gap), c0 + (p % cols) * (bl + gap)
            mask = torch.zeros(1, H, W, dtype=torch.bool)
            mask[0, r:r + bh, c:c + bl] = True
            parts.append(Trigger(mask, mask.float() * float(o["value"])))
        return parts

    def _tabular_parts(self, x, ctx):
        if self.options["features"] is None:
            raise self.option_error("features", "must list the trigger features for tabular data")
        F = self._tabular(x)
        idx = self.feature_indices(F, ctx)
        groups = np.array_split(np.arange(len(idx)), self.options["parts"])
        return [self._feature_trigger(F, [idx[g] for g in grp], [self.values[g] for g in grp]) for grp in groups]

    def part_index(self, ctx: AttackContext | None) -> int:
        """``i mod parts`` with ``i`` the hospital's rank among the malicious hospitals (its id
        when it is not listed)."""
        hospital = getattr(ctx, "hospital", None) or 0
        malicious = sorted(getattr(ctx, "malicious", None) or [])
        rank = malicious.index(hospital) if hospital in malicious else int(hospital)
        return rank % int(self.options["parts"])

    def trigger(self, x, ctx=None):
        parts = self.trigger_parts(x, ctx)
        full = parts[0]
        for part in parts[1:]:
            full = full | part
        return full

    def local_trigger(self, x, ctx=None):
        return self.trigger_parts(x, ctx)[self.part_index(ctx)]
