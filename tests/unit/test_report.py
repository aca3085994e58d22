"""fedsec report on small fake finished sweep / run folders: risk-matrix numbers and
readings, figures, the offline HTML page (checked in a real headless Chromium when one is
installed), and the generated threat map."""

import asyncio
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fedsec.analysis import report as rp
from fedsec.analysis.tables import collect_rows
from tests.unit.test_sweep import make_fake_sweep

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory):
    root = make_fake_sweep(tmp_path_factory.mktemp("fake") / "sweep")
    # an inversion attack's figure in one cell: the report must show it
    cell = next((root / "cells").iterdir())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.imshow([[0, 1], [1, 0]])
    (cell / "figures").mkdir(exist_ok=True)
    fig.savefig(cell / "figures" / "inversion_dlg_round1_hospital0.png")
    plt.close(fig)
    index = rp.report(root)
    return root, index


def test_matrix_numbers(fake_sweep):
    root, _ = fake_sweep
    rows, keys = collect_rows(root)
    m = rp.build_matrix(rows, keys, "attacks", "strategy", "auroc")
    assert m.defenses == ["fedavg", "flame"]
    c = m.cells[("ehr_trigger", "fedavg")]
    assert c.attack_metric == "asr" and c.success == pytest.approx(0.95) and c.utility == pytest.approx(0.80)
    # sign flip has no metric of its own: the share of skill above chance it destroys
    sf = m.cells[("sign_flip", "fedavg")]
    assert sf.clean_utility == pytest.approx(0.82) and sf.utility == pytest.approx(0.62)
    assert sf.success == pytest.approx((0.82 - 0.62) / (0.82 - 0.5))
    # flame's cost: AUROC without attack under FedAvg minus under FLAME = 0.82 - 0.79
    assert m.cells[("none", "flame")].cost == pytest.approx(0.03)
    assert m.cells[("sign_flip", "flame")].cost == pytest.approx(0.03)
    assert m.cells[("none", "fedavg")].cost == pytest.approx(0.0)
    assert m.cells[("none", "fedavg")].success is None
    labels = [g for g, _ in m.groups]
    assert labels[0] == "reference: no attack"
    assert "ehr prediction · hospital insider · integrity" in labels
    assert "ehr prediction · hospital insider · availability" in labels


def test_readings_follow_the_numbers(fake_sweep):
    root, _ = fake_sweep
    rows, keys = collect_rows(root)
    m = rp.build_matrix(rows, keys, "attacks", "strategy", "auroc")
    r = {k: c.reading for k, c in m.cells.items()}
    assert r[("ehr_trigger", "fedavg")].startswith(
        "A single malicious hospital (va) plants a backdoor that flips 95% of triggered 'disease' patient records "
        "to 'no disease'; FedAvg does not stop it")
    assert "FLAME stops it (FedAvg: 95%)" in r[("ehr_trigger", "flame")]
    assert "AUROC falls from 0.82 to 0.62 (62% of the skill above chance lost); FedAvg does not stop it" in \
        r[("sign_flip", "fedavg")]
    assert r[("sign_flip", "fedavg")].startswith("A single malicious hospital (va) sends reversed updates")
    assert "but with FLAME the model barely suffers: AUROC 0.79 (0.79 without the attack)" in r[("sign_flip", "flame")]
    assert r[("none", "flame")] == "No attack: with FLAME the model reaches AUROC 0.79, 0.03 below FedAvg."


def test_report_files_and_offline_html(fake_sweep):
    root, index = fake_sweep
    out = root / "report"
    assert index == out / "index.html"
    for name in ("risk_matrix.png", "risk_matrix.pdf"):
        assert (out / name).stat().st_size > 1000
    curves = sorted(out.glob("curves_*.png"))
    assert len(curves) == 6 and all(p.with_suffix(".pdf").exists() for p in curves)
    html = index.read_text()
    assert 'id="risk-matrix-table"' in html
    assert "<script" not in html.lower()
    # self-contained: every src / href is a data URI or an in-page anchor
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs)
    assert "http://" not in html and "https://" not in html
    assert "plants a backdoor" in html and "inversion_dlg_round1_hospital0.png" in html
    assert "varies no privacy setting" in html
    # an integrity attack in the sweep: balanced accuracy and accuracy beside AUROC (issue 13 item 9)
    assert 'id="summary-balanced_accuracy"' in html and 'id="summary-accuracy"' in html
    assert re.search(r"AUROC 0\.\d{3} ± 0\.\d{3} · balanced accuracy 0\.700 · accuracy 0\.700", html)
    assert (root / "summary.md").exists() and (root / "sweep.csv").exists()


def test_privacy_utility_curves(tmp_path):
    root = make_fake_sweep(tmp_path / "p", failed=None, privacy=True)
    index = rp.report(root)
    assert (root / "report" / "privacy_utility.png").exists()
    assert (root / "report" / "privacy_utility.pdf").exists()
    assert "privacy-utility curves" in index.read_text()


def test_report_of_one_run(fake_sweep, tmp_path):
    root, _ = fake_sweep
    cell = next(p for p in (root / "cells").iterdir()
                if p.name.startswith("attacks=ehr_trigger,strategy=fedavg,seed=0"))
    run = tmp_path / "run"
    shutil.copytree(cell, run)
    index = rp.report(run)
    html = index.read_text()
    assert 'id="risk-matrix-table"' in html and "plants a backdoor that flips 90%" in html
    assert (run / "report" / "risk_matrix.pdf").exists()
    assert list((run / "report").glob("curves_*.png"))


def test_not_a_results_folder(tmp_path):
    from fedsec.errors import FedsecError

    with pytest.raises(FedsecError, match="neither a sweep folder"):
        rp.report(tmp_path)
    assert rp.main([str(tmp_path / "nope")]) == 2


def test_threat_map_is_generated_from_the_presets():
    text = rp.threat_map_markdown()
    for preset in (ROOT / "attacks").glob("*.yaml"):
        assert f"`{preset.stem}`" in text, preset.stem
    for preset in (ROOT / "strategies").glob("*.yaml"):
        assert f"`strategy: {preset.stem}`" in text, preset.stem
    assert "## Still empty" in text and "`electrogram`" in text
    committed = (ROOT / "docs" / "threat-model.md").read_text()
    assert committed == text, ("docs/threat-model.md is out of date with attacks/ and strategies/: run "
                               "`python -m fedsec.analysis.report --threat-map docs/threat-model.md`")


def test_threat_map_measured_section_reads_strongest_studies(tmp_path):
    from fedsec.analysis.threat_map import measured_section

    study = {"title": "toy study", "command": "fedsec sweep sweeps/toy.yaml", "candidates": ["a", "b"],
             "selection_seeds": [0, 1], "report_seeds": [5, 6, 7], "not_measured": {"krum": "n too small"},
             "notes": {"flame": "read it with care."},
             "by_defense": {
                 "median": {"winner": "b", "test": {"kind": "asr", "mean": 0.1234, "low": 0.05, "high": 0.2,
                                                   "n": 3, "detectable": True}},
                 "flame": {"winner": "a", "test": {"kind": "damage", "mean": 0.01, "low": -0.02, "high": 0.04,
                                                  "n": 3, "detectable": False}},
                 "fedavg": {"winner": None, "test": {}},
                 # per family: one line per family, each with its own winner
                 "trimmed_mean": {"winner": "a", "test": {"kind": "damage", "mean": 0.02, "low": -0.01,
                                                         "high": 0.05, "n": 3, "detectable": False},
                                  "families": {
                                      "asr": {"winner": "b", "test": {"kind": "asr", "mean": 0.03, "low": 0.01,
                                                                      "high": 0.05, "n": 3, "detectable": True}},
                                      "damage": {"winner": "a", "test": {"kind": "damage", "mean": 0.02,
                                                                         "low": -0.01, "high": 0.05, "n": 3,
                                                                         "detectable": False}}}}}}
    (tmp_path / "toy.json").write_text(json.dumps(study))
    (tmp_path / "not_a_study.json").write_text("{}")
    lines = measured_section(tmp_path, ["fedavg", "median", "flame", "trimmed_mean", "krum", "bulyan"])
    text = "\n".join(lines)
    assert "| defense | toy study |" in text
    assert "| `median` | backdoor: `b` **+0.123 [+0.050, +0.200]** (n = 3) |" in lines
    assert "| `flame` | untargeted: `a` +0.010 [-0.020, +0.040] (no detectable effect) (n = 3) |" in lines
    assert ("| `trimmed_mean` | backdoor: `b` **+0.030 [+0.010, +0.050]** (n = 3)<br>untargeted: `a` +0.020 "
            "[-0.010, +0.050] (no detectable effect) (n = 3) |") in lines
    assert "| `fedavg` | — |" in lines
    assert "Not in this study: `krum` (n too small). `flame`: read it with care." in text
    assert "selected on seeds 0, 1, reported on seeds 5, 6, 7" in text
    # presets no study has as a column are named (fedavg, the reference, is not a defense)
    assert lines[-2] == "- Not yet measured against the strongest attack: `krum`, `bulyan`."
    assert measured_section(tmp_path / "missing", ["median"]) == []


def test_markdown_tables_become_html_with_sub_headings_and_bold_intervals():
    from fedsec.analysis.report import _markdown_html

    html_text = _markdown_html("# Title\n\nSome <text>.\n\n## Per family\n\n| a | b |\n|---|---|\n"
                               "| median | **+0.1 [+0.0, +0.2]** |\n\n- a bullet\n")
    assert "Title" not in html_text  # the page's section heading replaces the file's title
    assert "<h3>Per family</h3>" in html_text and "<p>Some &lt;text&gt;.</p>" in html_text
    assert "<td><b>+0.1 [+0.0, +0.2]</b></td>" in html_text and "<li>a bullet</li>" in html_text


# ---- a real browser ---------------------------------------------------------------------------

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).exists()), None)


class _Chromium:
    """Headless Chromium driven over the DevTools protocol (websockets)."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.ws_url = None
        found = threading.Event()

        def read():
            for line in self.proc.stderr:
                m = re.search(r"DevTools listening on (ws://\S+)", line)
                if m and not found.is_set():
                    self.ws_url = m.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(90):
            self.close()
            raise RuntimeError("chromium did not open its DevTools endpoint within 90 s")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


async def _load_and_inspect(ws_url: str, url: str, checks: dict[str, str]) -> tuple[dict, list[str]]:
    from websockets.asyncio.client import connect

    async with connect(ws_url, max_size=None) as ws:
        counter = 0
        events: list[dict] = []

        async def call(method, params=None, session=None):
            nonlocal counter
            counter += 1
            msg = {"id": counter, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            await ws.send(json.dumps(msg))
            while True:
                reply = json.loads(await ws.recv())
                if reply.get("id") == counter:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
                events.append(reply)

        target = (await call("Target.createTarget", {"url": "about:blank"}))["targetId"]
        session = (await call("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await call(f"{domain}.enable", session=session)
        await call("Page.navigate", {"url": url}, session=session)
        deadline = time.monotonic() + 60
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            if time.monotonic() > deadline:
                raise RuntimeError("the page did not finish loading within 60 s")
            events.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=60)))
        results = {}
        for name, expr in checks.items():
            res = await call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
            results[name] = res["result"].get("value")
        await asyncio.sleep(0.3)  # late console messages
        errors = []
        for e in events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(p.get("exceptionDetails", {}))[:300])
            elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(json.dumps(p.get("args"))[:300])
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append(p["entry"].get("text", "")[:300])
        return results, errors


@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser: install Debian's chromium "
                                             "(apt-get install -y chromium) to check the report page in one")
def test_report_page_in_headless_chromium(fake_sweep, tmp_path):
    _, index = fake_sweep
    checks = {
        "has_matrix": "document.querySelector('#risk-matrix-table') !== null",
        "matrix_cells": "document.querySelectorAll('#risk-matrix-table td.cell').length",
        "group_rows": "document.querySelectorAll('#risk-matrix-table tr.group').length",
        "images": "document.images.length",
        "images_ok": "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
        "external_loads": "performance.getEntriesByType('resource').filter(e => !e.name.startsWith('data:')).length",
        "first_reading": "document.querySelector('#risk-matrix-table td.cell .reading').textContent",
        "title": "document.title",
    }
    browser = _Chromium(tmp_path / "profile")
    try:
        results, errors = asyncio.run(_load_and_inspect(browser.ws_url, index.resolve().as_uri(), checks))
    finally:
        browser.close()
    assert errors == [], errors
    assert results["has_matrix"] is True
    assert results["matrix_cells"] == 3 * 2 and results["group_rows"] == 3
    assert results["images"] >= 8 and results["images_ok"] is True
    assert results["external_loads"] == 0
    assert results["first_reading"].startswith("No attack: with FedAvg")
    assert results["title"].startswith("fedsec report")


def test_matrix_cell_reads_its_attack_metric_against_the_null(fake_sweep):
    """With summary.json's attack.stats (value, null, effect per seed), a cell whose effect's
    interval over seeds includes 0 is "at floor" and coloured as no success."""
    root, _ = fake_sweep
    rows, keys = collect_rows(root)
    import itertools

    for r, effect in zip([r for r in rows if r.get("attacks") == "ehr_trigger"], itertools.cycle([0.05, -0.04])):
        r["_summary"] = {**(r.get("_summary") or {}), "attack": {"asr": 0.3, "stats": {"asr": {
            "value": 0.3, "null": 0.3 - effect, "effect": effect, "null_kind": "untrained"}}}}
    m = rp.build_matrix(rows, keys, "attacks", "strategy", "auroc")
    c = m.cells[("ehr_trigger", "fedavg")]
    assert c.over_null is not None and c.over_null["at_floor"] and c.success == 0.0
    assert "At floor: no detectable difference from its null" in c.reading and "an untrained model" in c.reading
    for r in rows:  # a clear effect over the null: coloured by the effect, not the raw value
        if r.get("attacks") == "ehr_trigger":
            r["_summary"]["attack"]["stats"]["asr"].update(effect=0.6, null=0.2)
    c = rp.build_matrix(rows, keys, "attacks", "strategy", "auroc").cells[("ehr_trigger", "fedavg")]
    assert not c.over_null["at_floor"] and c.success == pytest.approx(0.6) and "Above its null" in c.reading
