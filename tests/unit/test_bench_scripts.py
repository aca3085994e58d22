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
