"""The benchmark and table scripts (bench/, scripts/) import fedsec lazily, inside the
functions a worker process runs: a module that moved breaks them only when someone runs
them. Every ``from fedsec... import name`` in them, at any depth, must resolve."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(list((ROOT / "bench").glob("*.py")) + list((ROOT / "scripts").glob("*.py")))


def _fedsec_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fedsec":
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fedsec":
                    yield node.lineno, a.name, []


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_fedsec_import_resolves(path):
    assert SCRIPTS, "no scripts found"
    missing = []
    for line, module, names in _fedsec_imports(path):
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            missing.append(f"line {line}: {module} ({err})")
            continue
        for name in names:
            if name != "*" and not hasattr(mod, name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    missing.append(f"line {line}: {module}.{name}")
    assert not missing, f"{path.relative_to(ROOT)}: " + "; ".join(missing)


def _fake_sweep(tmp_path: Path) -> Path:
    """A sweep folder with a no-attack and an ALIE row under Krum, seeds 0-2, 3 rounds each."""
    import json

    folder = tmp_path / "sweep"
    cells = []
    # balanced accuracy: none 0.80, 0.82, 0.78; alie 0.60, 0.70, 0.50 -> paired losses 0.2, 0.12, 0.28
    bal = {"none": [0.80, 0.82, 0.78], "alie": [0.60, 0.70, 0.50]}
    for attack in ("none", "alie"):
        for seed in range(3):
            path = f"cells/attacks={attack},seed={seed}"
            (folder / path).mkdir(parents=True)
            attackers = ([{"attack": "alie", "hospitals": ["hospital_0", "hospital_1"], "rounds": [2, 3]}]
                         if attack == "alie" else [])
            summary = {"status": "completed", "rounds": 3, "attackers": attackers,
                       "final": {"auroc": 0.9, "balanced_accuracy": bal[attack][seed]}}
            (folder / path / "summary.json").write_text(json.dumps(summary))
            # round 1: hospital_0 kept but not attacking yet; round 2: kept while attacking;
            # round 3: both attackers flagged (only in seed 0 is hospital_1 kept in round 3)
            flagged = [["hospital_1", "hospital_2"], ["hospital_1", "hospital_2"],
                       ["hospital_0", "hospital_1"] if seed else ["hospital_0", "hospital_2"]]
            (folder / path / "rounds.jsonl").write_text("\n".join(
                json.dumps({"round": i + 1, "defense": {"flagged": f}}) for i, f in enumerate(flagged)))
            cells.append({"values": {"attacks": attack, "strategy": "krum"}, "seed": seed, "path": path})
    (folder / "sweep.json").write_text(json.dumps({"cells": cells}))
    return folder


def test_integrity_tables_paired_losses_and_krum_selections(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    sys.modules.pop("integrity_tables", None)
    import integrity_tables

    folder = _fake_sweep(tmp_path)
    monkeypatch.setattr(sys, "argv", ["integrity_tables.py", str(folder), "--paired"])
    integrity_tables.main()
    out = capsys.readouterr().out
    # mean paired loss 0.200, t interval [0.001, 0.399] excludes 0: bold; one seed ends at 0.50 (collapsed)
    assert "| alie | **+0.200 [+0.001, +0.399]** (1) |" in out
    # AUROC unchanged: loss 0 with a zero-width interval, not bold
    assert "| alie | +0.000" in out and "**+0.000" not in out
    # Krum kept an active attacker in round 2 of every seed and in round 3 of seed 0 only;
    # round 1 (before the attack window) does not count
    assert "| alie | 2, 1, 1 | 3 |" in out
