"""Offline experiment tracking: TensorBoard event files per run (``output.tensorboard: true``).

    tensorboard --logdir runs/          # every run's <run>/tensorboard/ side by side

One :class:`TensorBoardTracker` per run takes the round records the server appends to
rounds.jsonl (the same dict) and logs them as scalars at step = round:

    global/<metric>                  loss, accuracy, auroc, sensitivity, specificity, balanced_accuracy
    hospital/<name>/<metric>         each hospital's test metrics
    train/<name>/loss                each hospital's local training loss
    attack/<key>                     the attack's numbers (asr, psnr, ...)
    defense/<key>                    the defense's numbers; defense/flagged = how many hospitals it flagged
    time/round_s                     the round's wall time

Nothing leaves the machine: event files only (no server, no account).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from fedsec.errors import FedsecError

_TAG = re.compile(r"[^A-Za-z0-9_./-]+")


def _tag(*parts: str) -> str:
    return "/".join(_TAG.sub("_", str(p)) for p in parts)


def _scalar(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v


def scalars_of(record: dict) -> dict[str, float]:
    """The scalars of one round record, by TensorBoard tag (NaN / non-numbers left out)."""
    out: dict[str, float] = {}

    def put(tag, v):
        v = _scalar(v)
        if v is not None:
            out[tag] = v

    for k, v in (record.get("global") or {}).items():
        put(_tag("global", k), v)
    for name, metrics in (record.get("per_hospital") or {}).items():
        for k, v in (metrics or {}).items():
            put(_tag("hospital", name, k), v)
    for name, info in (record.get("train") or {}).items():
        put(_tag("train", name, "loss"), (info or {}).get("loss"))
    for k, v in (record.get("attack") or {}).items():
        put(_tag("attack", k), v)
    defense = record.get("defense") or {}
    for k, v in defense.items():
        if k == "flagged" and isinstance(v, list):
            put("defense/flagged", len(v))
        else:
            put(_tag("defense", k), v)
    put("time/round_s", record.get("time_s"))
    return out


class TensorBoardTracker:
    """Writes a run's round records as TensorBoard scalars under ``<run>/tensorboard/``.

    ``purge_step``: on resume, the first round that runs again (TensorBoard then hides the
    older events of that round and later ones)."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # tensorboard is an optional dependency
            raise FedsecError("output.tensorboard: true needs the 'tensorboard' package "
                              f"(pip install tensorboard): {err}") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    @classmethod
    def for_run(cls, scenario, run_dir, resumed_from_round: int = 0) -> "TensorBoardTracker | None":
        """A tracker when the scenario asks for one (``output.tensorboard``), else None."""
        if not getattr(scenario.output, "tensorboard", False):
            return None
        path = Path(getattr(run_dir, "path", run_dir)) / "tensorboard"
        tracker = cls(path, purge_step=resumed_from_round + 1 if resumed_from_round else None)
        tracker.writer.add_text("scenario", f"```\n{scenario.to_yaml()}\n```", 0)
        return tracker

    def __call__(self, record: dict) -> None:
        step = int(record["round"])
        for tag, value in scalars_of(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
