"""Name -> implementation lookups for tasks, models, partitioners, attacks and rules.

Entries are ``"module:attr"`` strings resolved on first use, so listing names never
imports torch-heavy modules (``fedsec list`` stays fast, Ray workers import little).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

from fedsec.errors import FedsecError


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    """A named catalogue. ``kind`` is used in error messages ("unknown model 'resnet'")."""

    def __init__(self, kind: str, entries: dict[str, str | Callable[..., Any]] | None = None):
        self.kind = kind
        self._entries: dict[str, str | Callable[..., Any]] = dict(entries or {})

    def register(self, name: str, target: str | Callable[..., Any]) -> None:
        self._entries[name] = target

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str, key: str | None = None) -> Any:
        """Return the implementation for ``name``; ``key`` is the scenario key path for errors."""
        if name not in self._entries:
            where = f"{key}: " if key else ""
            raise FedsecError(
                f"{where}unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; "
                f"available: {', '.join(self.names())}"
            )
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[name] = target
        return target


TASKS = Registry(
    "task",
    {
        "heart_disease": "fedsec.tasks:build_heart_disease",
        "ehr_csv": "fedsec.tasks:build_ehr_csv",
        "pneumonia": "fedsec.tasks:build_pneumonia",
        "medmnist": "fedsec.tasks:build_medmnist",
        "mednist": "fedsec.tasks:build_mednist",
    },
)

MODELS = Registry(
    "model",
    {
        "logistic": "fedsec.models:LogisticRegression",
        "mlp": "fedsec.models:MLP",
        "small_cnn": "fedsec.models:SmallCNN",
        "densenet121": "fedsec.models:monai_densenet121",
        "resnet10": "fedsec.models:monai_resnet10",
        "resnet18": "fedsec.models:monai_resnet18",
        "efficientnet_b0": "fedsec.models:monai_efficientnet_b0",
    },
)
