"""A Task = a dataset divided into hospitals + a model factory + its loss and scores.

Task builders are registered by name in :data:`fedsec.registry.TASKS`; each takes the
scenario and returns a FederatedDataset. Nothing here runs at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
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

    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over classes, or BCE per label for multi-label tasks."""
        if self.multilabel:
            return nn.functional.binary_cross_entropy_with_logits(logits, y.float(), reduction=reduction)
        return nn.functional.cross_entropy(logits, y, reduction=reduction)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [N, K] -> probabilities [N, K] (softmax, or sigmoid per label)."""
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)


_ALLOWED_OPTIONS = {
    "heart_disease": {"normalize", "test_fraction"},
    "ehr_csv": {"hospital_column", "label_column", "feature_columns", "missing", "positive_labels",
                "normalize", "test_fraction"},
    "pneumonia": {"root_fraction", "image_size", "merge_val"},
    "medmnist": {"root_fraction", "image_size", "merge_val"},
    "mednist": {"root_fraction", "image_size", "test_fraction", "val_fraction", "sites", "merge_val"},
}


# Options every task takes, applied after the data is built.
_GENERIC_OPTIONS = {"max_train_per_hospital"}


def _options(scenario) -> dict:
    opts = {k: v for k, v in (scenario.task.options or {}).items() if k not in _GENERIC_OPTIONS}
    allowed = _ALLOWED_OPTIONS.get(scenario.task.name, set())
    for k in opts:
        if k not in allowed:
            raise FedsecError(f"task.options.{k}: not an option of task '{scenario.task.name}'; "
                              f"options are {', '.join(sorted(allowed | _GENERIC_OPTIONS))}")
    return opts


def build_heart_disease(scenario) -> FederatedDataset:
    from fedsec.data.heart import load_heart_disease

    opts = _options(scenario)
    partition = scenario.federation.partition.get("name", "natural")
    if partition != "natural":
        raise FedsecError("federation.partition.name: heart_disease uses its natural split (one hospital per "
                          f"source), got '{partition}'")
    return load_heart_disease(sites=scenario.federation.sites, data_dir=scenario.task.path, **opts)


def build_ehr_csv(scenario) -> FederatedDataset:
    from fedsec.data.tabular import federate_table, read_ehr_csv

    if not scenario.task.path:
        raise FedsecError("task.path: the ehr_csv task needs the path of a CSV file")
    opts = _options(scenario)
    fed_opts = {k: opts.pop(k) for k in ("normalize", "test_fraction") if k in opts}
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


def build_pneumonia(scenario) -> FederatedDataset:
    return _imaging(scenario, "pneumonia")


def build_medmnist(scenario) -> FederatedDataset:
    if not scenario.task.path:
        raise FedsecError("task.path: the medmnist task needs the path of a MedMNIST .npz file")
    return _imaging(scenario, "medmnist")


def build_mednist(scenario) -> FederatedDataset:
    if not scenario.task.path:
        raise FedsecError("task.path: the mednist task needs a folder with one sub-folder per class")
    return _imaging(scenario, "mednist")


def build_task(scenario) -> Task:
    builder = TASKS.get(scenario.task.name, key="task.name")
    data = builder(scenario)
    limit = (scenario.task.options or {}).get("max_train_per_hospital")
    if limit is not None:
        # e.g. 1 for a hospital whose update comes from a single patient (inversion studies)
        if not isinstance(limit, int) or limit < 1:
            raise FedsecError(f"task.options.max_train_per_hospital: expected an integer >= 1, got {limit!r}")
        data.train = [s.subset(range(min(limit, len(s)))) for s in data.train]
    return Task(scenario.task.name, data, scenario.task.model, dict(scenario.task.model_options or {}))
