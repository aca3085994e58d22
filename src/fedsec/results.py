"""The results folder of one run (docs/design.md §6).

    scenario.yaml   fully resolved; ``fedsec run <dir>/scenario.yaml`` repeats the run
    manifest.json   versions, git commit, seed, engine, start/end, status
    rounds.jsonl    one record per round, appended and flushed (fsync) as each round ends
    summary.json    final figures (status "completed" | "failed" | "running")
    checkpoint.pt   after the last finished round: the global model and the server's state
                    (rule, attacks, central DP), so --resume ends exactly as an uninterrupted run

JSON files are written atomically (temp file + rename): a killed run never leaves a
half-written summary, and every finished round stays in rounds.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from fedsec.errors import FedsecError


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clean(obj):
    """JSON has no NaN: write null instead (readers get None)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _clean(obj.item())
    return obj


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(_clean(obj), indent=2) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


class RunDir:
    """One run's folder. Safe to create in the driver and re-open in a ServerApp process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "figures").mkdir(exist_ok=True)

    @classmethod
    def for_scenario(cls, scenario, out: str | Path | None = None) -> "RunDir":
        if out is not None:
            return cls(out)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return cls(Path(scenario.output.dir) / scenario.name / f"{stamp}-{scenario.digest()}")

    RUN_FILES = ("scenario.yaml", "manifest.json", "rounds.jsonl", "summary.json", "checkpoint.pt")

    def has_results(self) -> bool:
        return any((self.path / f).exists() for f in self.RUN_FILES)

    def clear(self) -> None:
        """Remove a previous run's files (a fresh run into an existing --out folder); other
        files the user keeps there are left alone."""
        import shutil

        for f in self.RUN_FILES:
            (self.path / f).unlink(missing_ok=True)
        for d in ("figures", "tensorboard", "deployment"):
            shutil.rmtree(self.path / d, ignore_errors=True)
        (self.path / "figures").mkdir(exist_ok=True)

    # files ---------------------------------------------------------------------------
    @property
    def rounds_file(self) -> Path:
        return self.path / "rounds.jsonl"

    @property
    def checkpoint_file(self) -> Path:
        return self.path / "checkpoint.pt"

    def write_scenario(self, scenario) -> None:
        atomic_write(self.path / "scenario.yaml", scenario.to_yaml())

    def write_manifest(self, manifest: dict) -> None:
        write_json(self.path / "manifest.json", manifest)

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / "summary.json", summary)

    def append_round(self, record: dict) -> None:
        with self.rounds_file.open("a") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_rounds(self) -> list[dict]:
        """Finished rounds; a torn last line (a kill mid-write) is ignored."""
        if not self.rounds_file.exists():
            return []
        out = []
        for line in self.rounds_file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return out

    def truncate_rounds(self, keep: int) -> None:
        """Keep the first ``keep`` records (those covered by the checkpoint) before resuming."""
        rounds = self.read_rounds()[:keep]
        atomic_write(self.rounds_file, "".join(json.dumps(r) + "\n" for r in rounds))

    CHECKPOINT_FORMAT = 2

    def save_checkpoint(self, server_round: int, state: dict, server: dict | None = None) -> None:
        """Atomically write checkpoint.pt: {"format", "round", "state" (the global model's
        state dict), "server" (FedsecStrategy.state_dict(): the aggregation rule's state,
        each attack's, central DP's clipping norm and accountant)}. Written after the round's
        record, so the checkpoint never runs ahead of rounds.jsonl."""
        import torch

        tmp = self.checkpoint_file.with_suffix(".tmp")
        torch.save({"format": self.CHECKPOINT_FORMAT, "round": int(server_round), "state": state,
                    "server": server}, tmp)
        os.replace(tmp, self.checkpoint_file)

    def load_checkpoint(self) -> dict | None:
        """checkpoint.pt as saved (None when there is none). "server" is None in a checkpoint
        from before the server's state was saved (format 1): such a run resumes with fresh
        rule and attack state."""
        import torch

        if not self.checkpoint_file.exists():
            return None
        try:
            ckpt = torch.load(self.checkpoint_file, weights_only=False)
        except Exception as err:  # a corrupt checkpoint must not be silently ignored
            raise FedsecError(f"{self.checkpoint_file}: cannot read the checkpoint ({err})") from None
        if not isinstance(ckpt, dict) or "round" not in ckpt or "state" not in ckpt:
            raise FedsecError(f"{self.checkpoint_file}: not a fedsec checkpoint (no 'round' / 'state')")
        ckpt.setdefault("server", None)
        return ckpt


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("fedsec", "flwr", "ray", "torch", "monai", "opacus", "omegaconf", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def new_manifest(scenario, run_dir: RunDir) -> dict:
    from fedsec.scenario import project_root

    return {
        "scenario": scenario.name,
        "seed": scenario.seed,
        "engine": scenario.to_dict()["engine"],
        "command": " ".join(sys.argv),
        "versions": versions(),
        "git_commit": git_commit(project_root()),
        "host": platform.node(),
        "started_at": utc_now(),
        "ended_at": None,
        "status": "running",
        "path": str(run_dir.path),
    }
