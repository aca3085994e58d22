"""The results folder of one run (docs/design.md §6).

    scenario.yaml   fully resolved; ``fedsec run <dir>/scenario.yaml`` repeats the run
    manifest.json   versions, git commit, seed, engine, start/end, status
    rounds.jsonl    one record per round, appended and flushed (fsync) as each round ends
    summary.json    final figures (status "completed" | "completed_with_failures" | "failed" |
                    "interrupted" | "running") and every hospital failure (round, hospital, reason)
    checkpoint.pt   after the last finished round: the global model and the server's state
                    (rule, attacks, central DP), so --resume ends exactly as an uninterrupted run
    failures.log    the full traceback of every hospital failure (only when one failed)
    error.log       the full traceback of an unexpected error that stopped the run

JSON files are written atomically (temp file + rename): a killed run never leaves a
half-written summary, and every finished round stays in rounds.jsonl.

A results folder is recognised by its manifest.json (``"fedsec_results": 1``, or an older
manifest's ``versions`` and ``status``). fedsec writes a run only into a new folder, an
empty one or an earlier run's folder; ``--force`` lets it write into any other folder
without touching the files already there. The manifest lists the files the run created
(``files``): a later run into the same folder removes those and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
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


# What fedsec writes at the top of a results folder, and the folders it owns there.
RUN_FILES = ("scenario.yaml", "manifest.json", "rounds.jsonl", "summary.json", "checkpoint.pt", "checkpoint.tmp",
             "failures.log", "error.log")
RUN_SUBDIRS = ("figures", "tensorboard", "deployment")
MANIFEST_MARK = "fedsec_results"


def is_results_folder(path: str | Path) -> bool:
    """True when ``path`` holds a fedsec run (its manifest.json says so)."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and (MANIFEST_MARK in manifest or {"versions", "status"} <= set(manifest))


def safe_name(name: str) -> str:
    """``scenario.name`` as one path component: never '..', a separator or an absolute path."""
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._")
    return text or "scenario"


def check_out_folder(out: str | Path, force: bool = False, *, ours=None, names=None,
                     kind: str = "a fedsec results folder (it has no fedsec manifest.json)",
                     writer: str = "a run") -> None:
    """Refuse (FedsecError: exit 2) an ``--out`` folder a fresh run must not write into: a
    non-empty folder that is not fedsec's own (``ours(path)``, default: a run's folder), unless
    ``force``; and, even with ``force``, one holding a file of fedsec's ``names`` that fedsec
    did not write (it would be overwritten). Sweeps call it with their own ``ours`` / ``names``."""
    ours = ours or is_results_folder
    names = RUN_FILES if names is None else names
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise FedsecError(f"--out {path}: is a file, not a folder")
    if not path.exists() or ours(path) or not any(path.iterdir()):
        return
    if not force:
        raise FedsecError(f"--out {path}: the folder is not empty and is not {kind}; give a new or empty folder, "
                          "or add --force to write into it (fedsec then removes and overwrites nothing that is "
                          "already there)")
    clash = sorted(n for n in names if (path / n).exists())
    if clash:
        raise FedsecError(f"--out {path}: holds {', '.join(clash)}, which {writer} would overwrite and which fedsec "
                          "did not write (even with --force); move them or give another folder")


def _files_under(root: Path) -> set[str]:
    out = set()
    for dirpath, _, names in os.walk(root):
        for n in names:
            out.add(os.path.relpath(os.path.join(dirpath, n), root))
    return out


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\[[0-9;]*m")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning|Failure)): (.*\S)")


def one_line_reason(text: str, limit: int = 300) -> str:
    """A hospital's failure in one line, without ANSI colour codes: the root exception of a
    traceback ("RuntimeError: disk full"), else the text's last line."""
    text = _ANSI.sub("", str(text))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = [m for m in map(_EXC_LINE.match, lines)
             if m and not m.group(1).startswith(("flwr.", "ray.")) and "ClientAppException" not in m.group(1)]
    line = f"{found[0].group(1).rsplit('.', 1)[-1]}: {found[0].group(2)}" if found else (lines[-1] if lines else "")
    line = re.sub(r"^Exception ClientAppException occurred\. Message: ", "", line)
    line = line.removesuffix("'>").strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


class RunDir:
    """One run's folder. Safe to create in the driver and re-open in a ServerApp process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._before: set[str] | None = None  # files present when this run began (not ours)
        self._owned: set[str] = set()  # files an earlier run into this folder created (resume)
        (self.path / "figures").mkdir(exist_ok=True)

    @classmethod
    def for_scenario(cls, scenario, out: str | Path | None = None, force: bool = False) -> "RunDir":
        """The results folder of a fresh run: ``out``, or ``<output.dir>/<name>/<UTC time>-<hash>``
        (always inside ``output.dir``, whatever the name). ``out`` must be new, empty, or an
        earlier run's folder (whose files are then removed); any other folder is refused
        unless ``force``, and even then no file already there is removed or overwritten."""
        if out is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            base = Path(scenario.output.dir)
            path = base / safe_name(scenario.name) / f"{stamp}-{scenario.digest()}"
            if not path.resolve().is_relative_to(base.resolve()):  # defence in depth
                raise FedsecError(f"scenario.name={scenario.name!r} would put the results outside output.dir")
            return cls(path)
        check_out_folder(out, force)
        run_dir = cls(out)
        if run_dir.has_results():  # a fresh run must not append to an earlier run's records
            print(f"fedsec: replacing the earlier run in {run_dir.path} (finish an interrupted run "
                  "with --resume instead)", file=sys.stderr)
            run_dir.clear()
        return run_dir

    def has_results(self) -> bool:
        return is_results_folder(self.path)

    def clear(self) -> None:
        """Remove a previous run's files (a fresh run into an earlier run's folder): the files
        its manifest lists as created by it, and fedsec's own names at the top. Anything
        else there (a figure, notes, a hand-written scenario of the user's) is left alone."""
        try:
            manifest = read_json(self.path / "manifest.json")
        except (OSError, ValueError):
            manifest = {}
        listed = manifest.get("files")
        if listed is None:  # killed before it could list its files: go by name and time
            listed = self._guess_created(manifest.get("started_at"))
        root = self.path.resolve()
        for rel in list(listed) + list(RUN_FILES):
            f = (self.path / rel)
            if f.resolve().is_relative_to(root) and (f.is_file() or f.is_symlink()):
                f.unlink()
        for d in RUN_SUBDIRS:  # now-empty folders of the old run
            for dirpath, _, _ in sorted(os.walk(self.path / d), reverse=True):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
        (self.path / "figures").mkdir(exist_ok=True)

    def _guess_created(self, started_at: str | None) -> list[str]:
        """A run that died without listing its files: the files in fedsec's own sub-folders
        that were written after it started."""
        try:
            t0 = datetime.strptime(started_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
        except (TypeError, ValueError):
            return []
        out = []
        for d in RUN_SUBDIRS:
            for rel in _files_under(self.path / d):
                if (self.path / d / rel).stat().st_mtime >= t0 - 1:
                    out.append(os.path.join(d, rel))
        return out

    # which files this run created ------------------------------------------------------
    def begin(self, previous_manifest: dict | None = None) -> None:
        """Note the files already here (they are not this run's); a resumed run keeps the
        earlier run's list."""
        self._before = _files_under(self.path)
        self._owned = set((previous_manifest or {}).get("files") or [])

    def claim(self, subdir: str) -> None:
        """Count the files already in ``subdir`` as this run's (``fedsec deploy`` writes the
        nodes' logs into deployment/ before the ServerApp opens the folder)."""
        self._before = {f for f in (self._before or set()) if not f.startswith(subdir.rstrip("/") + "/")}

    def created_files(self) -> list[str]:
        now = _files_under(self.path)
        mine = (now - (self._before or set())) | (self._owned & now)
        return sorted(f for f in mine if not os.path.basename(f).startswith(".manifest.json."))

    # failures ------------------------------------------------------------------------
    @property
    def failures_log(self) -> Path:
        return self.path / "failures.log"

    @property
    def error_log(self) -> Path:
        return self.path / "error.log"

    def log_failure(self, server_round: int, hospital: str, phase: str, detail: str) -> None:
        """Append one hospital failure's full text (e.g. its traceback) to failures.log."""
        with self.failures_log.open("a") as fh:
            fh.write(f"=== round {server_round}, {phase}, {hospital} ({utc_now()})\n"
                     f"{_ANSI.sub('', str(detail)).rstrip()}\n\n")

    def write_error(self, text: str) -> Path:
        atomic_write(self.error_log, text)
        return self.error_log

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

    # rounds.jsonl is flushed at every round (a killed or crashed run keeps every finished
    # round: the data is in the kernel) and forced to disk (fsync) at most every SYNC_EVERY_S
    # and when the run ends: an fsync costs 5-10 ms on this machine's disk, half of a small
    # round's fixed-cost target, and only a power loss or a kernel crash needs it.
    SYNC_EVERY_S = 2.0

    def append_round(self, record: dict) -> None:
        import time

        with self.rounds_file.open("a") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")
            fh.flush()
            now = time.monotonic()
            if now - getattr(self, "_synced_at", float("-inf")) >= self.SYNC_EVERY_S:
                os.fsync(fh.fileno())
                self._synced_at = now

    def sync_rounds(self) -> None:
        """Force rounds.jsonl to disk (the run's end)."""
        if self.rounds_file.exists():
            with self.rounds_file.open("a") as fh:
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


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return int(torch.get_num_threads())


def new_manifest(scenario, run_dir: RunDir) -> dict:
    from fedsec.scenario import project_root

    return {
        MANIFEST_MARK: 1,
        "scenario": scenario.name,
        "seed": scenario.seed,
        "engine": scenario.to_dict()["engine"],
        "command": " ".join(sys.argv),
        "versions": versions(),
        "git_commit": git_commit(project_root()),
        "host": platform.node(),
        # the server side's torch threads (a sweep worker's share of the cores; the hospitals
        # run with engine.num_cpus): recorded because the timings depend on it
        "torch_threads": _torch_threads(),
        "started_at": utc_now(),
        "ended_at": None,
        "status": "running",
        "path": str(run_dir.path),
    }
