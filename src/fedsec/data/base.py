"""The in-memory shapes every dataset, partitioner, attack and model agrees on.

A dataset is small enough (MedMNIST, EHR tables) to live as tensors in memory,
so a hospital's data is one :class:`Split` per phase, not a DataLoader pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Split:
    """One hospital's (or the union's) samples.

    x: float32, tabular ``[N, F]`` (standardised features) or images ``[N, C, H, W]`` in [0, 1].
    y: int64 ``[N]`` class index, or float32 ``[N, K]`` 0/1 for multi-label tasks.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, index) -> "Split":
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.x[index], self.y[index])

    @staticmethod
    def concat(splits: list["Split"]) -> "Split":
        return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))


@dataclass
class FederatedDataset:
    """A task's data already divided into hospitals.

    ``train[i]`` / ``test[i]`` belong to hospital ``hospitals[i]``; the union of ``test`` is
    the global test set. ``root`` is an optional small clean server-side set (FLTrust).
    """

    hospitals: list[str]
    train: list[Split]
    test: list[Split]
    num_classes: int
    input_shape: tuple[int, ...]
    multilabel: bool = False
    class_names: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)
    modality: str = "tabular"  # "tabular" | "image"
    root: Split | None = None
    # Records of each hospital reserved out of training (membership inference's non-members;
    # see fedsec.attacks.membership.reserve_holdout), or None.
    holdout: list[Split] | None = None
    # ``val[i]``: records hospital i set aside from its training data (``task.options.val_fraction``);
    # never trained on, never the test set. Read by the strongest-attack selection (fedsec.analysis.strongest).
    val: list[Split] | None = None
    # What built it, for the resolved run record and reports (e.g. source path, partition
    # options, each hospital's acquisition-shift profile). Free-form, JSON-serialisable.
    info: dict = field(default_factory=dict)

    @property
    def num_hospitals(self) -> int:
        return len(self.hospitals)

    def union_test(self) -> Split:
        return Split.concat(self.test)
