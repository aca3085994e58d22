"""A Task = a dataset divided into hospitals + a model factory + its loss and scores.

Task builders are registered by name in :data:`fedsec.registry.TASKS`; each takes the
scenario and returns a FederatedDataset. Nothing here runs at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedsec.data.base import FederatedDataset
from fedsec.errors import FedsecError
from fedsec.models import build_model
from fedsec.registry import TASKS


@dataclass
class Task:
    name: str
    data: FederatedDataset
    model_name: str
    model_options: dict

    @property
    def multilabel(self) -> bool:
        return self.data.multilabel

    def make_model(self, seed: int | None = None) -> nn.Module:
        return build_model(self.model_name, self.data.input_shape, self.data.num_classes,
                           self.model_options, seed=seed)

    def train_sizes(self) -> dict[str, int]:
        """hospital name -> its number of training records."""
        return {h: len(s) for h, s in zip(self.data.hospitals, self.data.train)}

    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over classes, or BCE per label for multi-label tasks."""
        if self.multilabel:
            return nn.functional.binary_cross_entropy_with_logits(logits, y.float(), reduction=reduction)
        return nn.functional.cross_entropy(logits, y, reduction=reduction)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [N, K] -> probabilities [N, K] (softmax, or sigmoid per label)."""
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)


@dataclass
class NodesTask:
    """What a deployment's server knows of the task, from the hospitals' introductions
    (``federation.server_app.introduce_nodes``): the model's input shape and classes, each
    hospital's name and sizes -- and no patient data. Enough to build the global model and
    to check the privacy options; anything that needs data on the server (FLTrust's root
    set, attack metrics that only the server computes, observers scored against the true
    records) is refused before a deployment starts (:func:`server_data_needs`)."""

    name: str
    model_name: str
    model_options: dict
    hospitals: list[str]
    input_shape: tuple[int, ...]
    num_classes: int
    multilabel: bool
    sizes: dict[str, int]  # hospital name -> training records
    test_sizes: dict[str, int] = field(default_factory=dict)  # hospital name -> test records

    @classmethod
    def from_introductions(cls, scenario, intro: dict[int, dict]) -> "NodesTask":
        """intro: hospital id -> the node's introduction (name, input-shape, num-classes,
        multilabel, num-train). Every hospital must describe the same model input."""
        ids = sorted(intro)
        first = intro[ids[0]]
        shape = tuple(int(d) for d in first["input-shape"])
        for h in ids[1:]:
            other = intro[h]
            if (tuple(other["input-shape"]), other["num-classes"], other["multilabel"]) != (
                    shape, first["num-classes"], first["multilabel"]):
                raise FedsecError(
                    f"hospitals {first['name']} and {other['name']} describe different data: input shape "
                    f"{list(shape)} vs {list(other['input-shape'])}, {first['num-classes']} vs "
                    f"{other['num-classes']} classes; every hospital must hold the same kind of records")
        return cls(scenario.task.name, scenario.task.model, dict(scenario.task.model_options or {}),
                   [str(intro[h]["name"]) for h in ids], shape, int(first["num-classes"]),
                   bool(first["multilabel"]), {str(intro[h]["name"]): int(intro[h]["num-train"]) for h in ids},
                   {str(intro[h]["name"]): int(intro[h]["num-test"]) for h in ids if "num-test" in intro[h]})

    def make_model(self, seed: int | None = None) -> nn.Module:
        return build_model(self.model_name, self.input_shape, self.num_classes, self.model_options, seed=seed)

    def train_sizes(self) -> dict[str, int]:
        return dict(self.sizes)


@dataclass(frozen=True)
class TaskSpec:
    """What a task is, declared where its builder is registered.

    domain: the taxonomy's data domain (docs/threat-model.md).
    sites: the natural hospitals of a dataset that names them (natural split), else None.
    splits: the partitions it accepts (``natural`` only when the data names its sites).
    options: its ``task.options`` keys -> one-line doc.
    needs_path: it reads a user's own file or folder (``task.path``).
    """

    name: str
    domain: str
    splits: tuple[str, ...]
    options: dict
    sites: tuple[str, ...] | None = None
    needs_path: bool = False
    class_names: tuple[str, ...] = ()  # when known without loading the data (reports)
    inputs: str = "inputs"  # what one record is, in a report's sentence


# Options every task takes, applied after the data is built.
_GENERIC_OPTIONS = {"max_train_per_hospital": "cap on each hospital's training records, a draw seeded by the "
                                              "scenario's seed (e.g. 1 for inversion)",
                    "val_fraction": "share of each hospital's training records set aside as its validation split "
                                    "(stratified, never trained on; the strongest-attack selection reads it)"}


def task(name: str, **spec):
    """Register a task builder under ``name`` with its :class:`TaskSpec`."""

    def add(fn):
        fn.spec = TaskSpec(name=name, **spec)
        return TASKS.register(name, fn)

    return add


_IMAGING_OPTIONS = {"root_fraction": "share of the training data the server keeps as a clean root set",
                    "image_size": "resize images to this side (pixels)",
                    "merge_val": "add the official validation split to training"}
_EHR_OPTIONS = {"normalize": "standardise features (statistics of the training split)",
                "feature_stats": "the pooled {mean, std} per feature to standardise with (a deployment's "
                                 "server sets it from the hospitals' moments)",
                "test_fraction": "share of each hospital's records held out for testing"}


def _options(scenario) -> dict:
    opts = {k: v for k, v in (scenario.task.options or {}).items() if k not in _GENERIC_OPTIONS}
    allowed = TASKS.get(scenario.task.name).spec.options
    for k in opts:
        if k not in allowed:
            raise FedsecError(f"task.options.{k}: not an option of task '{scenario.task.name}'; "
                              f"options are {', '.join(sorted(set(allowed) | set(_GENERIC_OPTIONS)))}")
    return opts


@task("heart_disease", domain="ehr_prediction", splits=("natural",), options={
    **_EHR_OPTIONS, "preprocessing": "'fedsec' (default: 10 features, seed-42 split, pooled standardisation) or "
                                     "'flamby' (FLamby's Fed-Heart-Disease exactly: one-hot cp and restecg, its "
                                     "stratified split, per-hospital standardisation)"},
      sites=("cleveland", "hungary", "switzerland", "va"), class_names=("no disease", "disease"),
      inputs="patient records")
def build_heart_disease(scenario) -> FederatedDataset:
    """UCI Heart Disease (embedded): four real hospitals, predict heart disease from 10 clinical features."""
    from fedsec.data.heart import load_heart_disease

    opts = _options(scenario)
    partition = scenario.federation.partition.get("name", "natural")
    if partition != "natural":
        raise FedsecError("federation.partition.name: heart_disease uses its natural split (one hospital per "
                          f"source), got '{partition}'")
    return load_heart_disease(sites=scenario.federation.sites, data_dir=scenario.task.path, **opts)


@task("ehr_csv", domain="ehr_prediction", splits=("natural",), needs_path=True, inputs="patient records", options={
    **_EHR_OPTIONS, "hospital_column": "the column naming each record's hospital",
    "label_column": "the outcome column", "feature_columns": "the feature columns (default: all others)",
    "missing": "how missing values are written", "positive_labels": "values of the label counted positive"})
def build_ehr_csv(scenario) -> FederatedDataset:
    """Your own EHR table (CSV): one row per patient, a hospital column, a label column."""
    from fedsec.data.tabular import federate_table, read_ehr_csv

    if not scenario.task.path:
        raise FedsecError("task.path: the ehr_csv task needs the path of a CSV file")
    opts = _options(scenario)
    fed_opts = {k: opts.pop(k) for k in ("normalize", "test_fraction", "feature_stats") if k in opts}
    feats, labs, names, features, classes = read_ehr_csv(Path(scenario.task.path).expanduser(), **opts)
    if scenario.federation.sites:
        missing = [s for s in scenario.federation.sites if s not in names]
        if missing:
            raise FedsecError(f"federation.sites: {missing} not in the CSV's hospitals ({', '.join(names)})")
        idx = [names.index(s) for s in scenario.federation.sites]
        feats, labs, names = [feats[i] for i in idx], [labs[i] for i in idx], [names[i] for i in idx]
    return federate_table(feats, labs, names, features, classes, **fed_opts)


def _imaging(scenario, source: str) -> FederatedDataset:
    from fedsec.data.imaging import build_imaging_dataset

    opts = _options(scenario)
    fed = scenario.federation
    n = fed.hospitals if fed.hospitals is not None else (len(fed.sites) if fed.sites else 4)
    return build_imaging_dataset(
        source=source, path=scenario.task.path, hospitals=int(n), partition=dict(fed.partition),
        shift_strength=float(fed.acquisition_shift), seed=int(scenario.seed), **opts,
    )


@task("pneumonia", domain="image_classification", splits=("iid", "dirichlet", "quantity"),
      options=_IMAGING_OPTIONS, class_names=("normal", "pneumonia"), inputs="chest X-rays")
def build_pneumonia(scenario) -> FederatedDataset:
    """PneumoniaMNIST chest X-rays (embedded): normal vs pneumonia, divided among simulated hospitals."""
    return _imaging(scenario, "pneumonia")


@task("medmnist", domain="image_classification", splits=("iid", "dirichlet", "quantity"),
      options=_IMAGING_OPTIONS, needs_path=True, inputs="images")
def build_medmnist(scenario) -> FederatedDataset:
    """Any MedMNIST 2D .npz file of yours, divided among simulated hospitals."""
    if not scenario.task.path:
        raise FedsecError("task.path: the medmnist task needs the path of a MedMNIST .npz file")
    return _imaging(scenario, "medmnist")


@task("mednist", domain="image_classification", splits=("natural", "iid", "dirichlet", "quantity"),
      needs_path=True, inputs="images", options={**_IMAGING_OPTIONS, "test_fraction": "share held out for testing",
                                "val_fraction": "share held out for validation",
                                "sites": "sub-folders that are sites (natural split)"})
def build_mednist(scenario) -> FederatedDataset:
    """A MedNIST-style image folder of yours (one sub-folder per class, optionally per site)."""
    if not scenario.task.path:
        raise FedsecError("task.path: the mednist task needs a folder with one sub-folder per class")
    return _imaging(scenario, "mednist")


def split_validation(train: list, fraction, seed: int, hospital_ids: list[int] | None = None) -> tuple[list, list]:
    """Each hospital's training records -> (kept for training, validation): a stratified share
    ``fraction`` (at least one record per hospital, at least one left to train on), drawn with
    the scenario's seed so every cell of a sweep with that seed holds out the same records."""
    import numpy as np

    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise FedsecError(f"task.options.val_fraction: expected a number in [0, 1), got {fraction!r}")
    if fraction == 0:
        return list(train), None
    kept, val = [], []
    for i, split in enumerate(train):
        n = len(split)
        h = hospital_ids[i] if hospital_ids is not None else i
        rng = np.random.default_rng([int(seed), 4099, h])
        y = split.y.numpy()
        strata = y.argmax(1) if y.ndim == 2 else y
        pick = []
        for c in np.unique(strata):
            idx = np.flatnonzero(strata == c)
            k = int(round(fraction * len(idx)))
            pick.extend(rng.permutation(idx)[:k].tolist())
        if not pick and n > 1:
            pick = [int(rng.integers(n))]
        if len(pick) >= n:
            pick = pick[: n - 1]
        mask = np.zeros(n, dtype=bool)
        mask[pick] = True
        kept.append(split.subset(np.flatnonzero(~mask)))
        val.append(split.subset(np.flatnonzero(mask)))
    return kept, val


def cap_training(train: list, limit: int, seed: int, hospital_ids: list[int] | None = None) -> list:
    """Each hospital keeps ``limit`` of its training records, drawn with the scenario's seed
    (and the hospital's id): every cell of a sweep with that seed keeps the same records, and
    ten seeds give an inversion study ten different patients per hospital, not the first
    record of the file ten times."""
    import numpy as np

    out = []
    for i, split in enumerate(train):
        n = len(split)
        if n <= limit:
            out.append(split.subset(np.arange(n)))
            continue
        h = hospital_ids[i] if hospital_ids is not None else i
        rng = np.random.default_rng([int(seed), 8191, h])
        out.append(split.subset(np.sort(rng.permutation(n)[:limit])))
    return out


def build_task(scenario, hospital_ids: list[int] | None = None) -> Task:
    """hospital_ids: the federation's ids of the hospitals the data holds, when it holds not
    all of them (a deployment node holding only its own partition): the per-hospital draws
    below (validation split, membership holdout) are seeded by these ids, so a node draws
    what the simulation draws for that hospital."""
    builder = TASKS.get(scenario.task.name, key="task.name")
    data = builder(scenario)
    frac = (scenario.task.options or {}).get("val_fraction")
    if frac is not None:
        data.train, data.val = split_validation(data.train, frac, scenario.seed, hospital_ids)
    limit = (scenario.task.options or {}).get("max_train_per_hospital")
    if limit is not None:
        # e.g. 1 for a hospital whose update comes from a single patient (inversion studies)
        if not isinstance(limit, int) or limit < 1:
            raise FedsecError(f"task.options.max_train_per_hospital: expected an integer >= 1, got {limit!r}")
        data.train = cap_training(data.train, limit, scenario.seed, hospital_ids)
    from fedsec.attacks.membership import holdout_fraction_of, reserve_holdout

    fraction = holdout_fraction_of(scenario)
    if fraction is not None:  # membership inference's non-members: never trained on
        reserve_holdout(data, fraction, scenario.seed, hospital_ids)
    return Task(scenario.task.name, data, scenario.task.model, dict(scenario.task.model_options or {}))
