"""``fedsec report RUN_OR_SWEEP_DIR``: figures and one offline HTML page per results folder.

Writes into ``<dir>/report/``:

    index.html                    self-contained (images as base64 data URIs, inline CSS, no JS)
    risk_matrix.png / .pdf        attacks x defenses, colour = attack success, corner = defense cost
    curves_<run>.png / .pdf       learning curves (global + per hospital), attack rounds shaded,
                                  the attack's metric (ASR, PSNR, ...) over rounds when recorded
    privacy_utility.png / .pdf    utility / leakage vs privacy settings (only when a sweep varies privacy.*)

plus, in a sweep folder, fresh ``sweep.csv`` / ``summary.csv`` / ``summary.md`` (see
:mod:`fedsec.sweep`). Reconstructions an inversion attack wrote under ``figures/`` are shown
next to their originals as they are.

The risk matrix reads a sweep whose grid varies ``attacks`` (rows) and ``strategy``
(columns) — or the keys given with --rows / --cols. For each cell:

- attack success (the colour): the backdoor's attack success rate (asr); for privacy attacks the
  leakage scaled to [0, 1] (membership AUROC 0.5 -> 0, 1 -> 1; PSNR 10 dB -> 0, 30 dB -> 1;
  share of records recovered); for attacks without a metric of their own (label flipping,
  Byzantine updates) the share of the model's skill above chance that the attack destroys,
  (utility without attack - utility under attack) / (utility without attack - chance), which
  needs the no-attack row (``attacks=none``).
- defense cost (the corner): how much utility the defense gives up without an attack, the
  no-attack row's utility under FedAvg minus under the defense (needs ``attacks=none`` and a
  ``fedavg`` column).
- a one-line reading generated from these numbers, the number of malicious hospitals, the
  task's domain and class names.

``python -m fedsec.analysis.report --threat-map [FILE]`` writes the taxonomy coverage table
(docs/threat-model.md) from the attack and strategy presets.
"""


from __future__ import annotations

import argparse
import base64
import html
import re
import sys
from pathlib import Path

from fedsec.analysis.figures import (
    COST_FULL,
    _cost_cmap,
    _hex,
    _success_cmap,
    plot_learning_curves,
    plot_privacy_utility,
    plot_risk_matrix,
)
from fedsec.analysis.matrix import (
    RiskMatrix,
    _is_none,
    _metric_name,
    build_matrix,
    matrix_axes,
)
from fedsec.analysis.runs import REFERENCE_DEFENSE, RunInfo, _num
from fedsec.analysis.threat_map import threat_map_markdown
from fedsec.errors import FedsecError

# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.meta{color:#555;font-size:.9em}nav a{margin-right:14px}
table{border-collapse:collapse;margin:8px 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:5px 8px;vertical-align:top;text-align:left}
th{background:#f4f4f4}
table.risk td.cell{width:230px;position:relative;padding-right:18px}
table.risk td.cell .num{font-weight:600}
table.risk td.cell .cost{position:absolute;top:0;right:0;width:12px;height:100%}
table.risk tr.group th{background:#eaeaf2;font-style:italic;font-weight:normal}
.reading{font-size:.92em;margin-top:3px}
.legend span{display:inline-block;padding:2px 8px;margin-right:4px;border:1px solid #ccc;font-size:.85em}
figure{margin:12px 0;display:inline-block;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
.note{background:#fff8e1;border-left:4px solid #f0c000;padding:6px 10px;font-size:.9em}
.failed{color:#b00020}
code{background:#f4f4f4;padding:1px 4px}
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _figure(path: Path, caption: str) -> str:
    return f"<figure>{_img(path, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def risk_matrix_html(m: RiskMatrix) -> str:
    cmap, ccmap = _success_cmap(), _cost_cmap()
    e = html.escape
    out = ['<table class="risk" id="risk-matrix-table">',
           f"<thead><tr><th>attack ({e(m.row_key)}) \\ defense ({e(m.col_key)})</th>"
           + "".join(f"<th>{e(m.column_title(d))}<br><code>{e(d)}</code></th>" for d in m.defenses)
           + "</tr></thead><tbody>"]
    for label, members in m.groups:
        out.append(f'<tr class="group"><th colspan="{len(m.defenses) + 1}">{e(label)}</th></tr>')
        for a in members:
            desc = _attack_description(m, a)
            out.append(f'<tr><th title="{e(desc)}">{e(a)}</th>')
            for d in m.defenses:
                c = m.cells[(a, d)]
                bg = "#eeeeee" if c.success is None else _hex(cmap(c.success))
                nums = []
                if c.winner:
                    t = c.effect or {}
                    ci = f" [{t['low']:+.2f}, {t['high']:+.2f}]" if t.get("low") is not None else ""
                    what = "ASR over floor" if t.get("kind") == "asr" else "skill lost"
                    nums.append(f"winner {c.winner}" + (f": {what} {t['mean']:+.2f}{ci}" if t.get("mean") is not None
                                                        else ""))
                if c.utility is not None:
                    nums.append(f"{_metric_name(m.metric)} {c.utility:.3f}"
                                + (f" ± {c.utility_std:.3f}" if c.utility_std is not None else ""))
                if _shows_also(c, m):  # a label flip can cost accuracy while AUROC barely moves
                    nums += [f"{_metric_name(k)} {v:.3f}" for k, v in c.also.items() if v is not None]
                if c.attack_metric and c.attack_value is not None:
                    nums.append(f"{c.attack_metric} {c.attack_value:.2f}"
                                + (f" ± {c.attack_std:.2f}" if c.attack_std is not None else ""))
                elif c.damage is not None and not _is_none(a):
                    nums.append(f"damage {max(c.damage, 0):.0%}")
                if c.cost is not None and d != REFERENCE_DEFENSE:
                    nums.append(f"cost {c.cost:+.3f}")
                nums.append(f"n={c.n}" + (f" ({c.n_cells - c.n} not completed)" if c.n < c.n_cells else ""))
                cost_bar = ""
                if c.cost is not None:
                    cc = _hex(ccmap(max(0.0, min(1.0, c.cost / COST_FULL))))
                    cost_bar = f'<span class="cost" style="background:{cc}" title="defense cost {c.cost:+.3f}"></span>'
                success = "" if c.success is None else f"{c.success:.3f}"
                out.append(f'<td class="cell" style="background:{bg}" data-success="{success}">'
                           f'<div class="num">{e(" · ".join(nums))}</div><div class="reading">{e(c.reading)}</div>'
                           f"{cost_bar}</td>")
            out.append("</tr>")
    out.append("</tbody></table>")
    legend = ['<p class="legend">attack success: ']
    for v, t in ((0.0, "0 (attack fails)"), (0.5, "0.5"), (1.0, "1 (attack succeeds)")):
        legend.append(f'<span style="background:{_hex(cmap(v))}">{t}</span>')
    legend.append('<span style="background:#eeeeee">not measurable</span> · defense cost (right edge): ')
    for v, t in ((0.0, "0"), (COST_FULL / 2, f"{COST_FULL / 2:.2f}"), (COST_FULL, f"≥ {COST_FULL:.2f}")):
        legend.append(f'<span style="background:{_hex(ccmap(v / COST_FULL))}">{t}</span>')
    legend.append("</p>")
    notes = "".join(f'<p class="note">{e(n)}</p>' for n in m.notes)
    return "".join(legend) + "\n".join(out) + notes


def _shows_also(c, m: RiskMatrix) -> bool:
    """Accuracy and balanced accuracy beside the matrix's metric: for integrity attacks (and the
    no-attack row they are read against)."""
    if not any(v is not None for v in c.also.values()):
        return False
    integrity = any(x.threat.get("goal") == "integrity" for x in m.cells.values())
    return c.threat.get("goal") == "integrity" or (_is_none(c.attack) and integrity)


def _attack_description(m: RiskMatrix, attack: str) -> str:
    for d in m.defenses:
        sc = m.cells[(attack, d)].scenario
        for a in sc.get("attacks") or []:
            if a.get("description"):
                return str(a["description"])
    return "no attack" if _is_none(attack) else attack


def _table_html(headers: list[str], rows: list[list], cls: str = "") -> str:
    e = html.escape
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{e(str(h))}</th>" for h in headers)
           + "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{e('' if v is None else str(v))}</td>" for v in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _markdown_html(text: str) -> str:
    """The tables, paragraphs and bullet lines of strongest.md / hospitals.md as HTML (no heading)."""
    e = html.escape
    out, table, bullets = [], [], []

    def flush():
        if table:
            head, *body = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table
                           if not set(r.replace("|", "").strip()) <= set("-: ")]
            out.append(_table_html(head, body, "summary"))
            table.clear()
        if bullets:
            out.append("<ul>" + "".join(f"<li>{e(b)}</li>" for b in bullets) + "</ul>")
            bullets.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        if line.startswith("- "):
            bullets.append(line[2:])
            continue
        flush()
        if line.startswith("## "):  # a sub-heading (the file's own "# " title is the section's)
            out.append(f"<h3>{e(line[3:])}</h3>")
        elif line.strip() and not line.startswith("#"):
            out.append(f"<p>{e(line)}</p>")
    flush()
    # Markdown bold (an interval that excludes 0) as <b>; everything else stays escaped text
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", "".join(out))


def _page(title: str, meta: str, sections: list[tuple[str, str, str]]) -> str:
    nav = "".join(f'<a href="#{sid}">{html.escape(t)}</a>' for sid, t, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{html.escape(t)}</h2>{content}</section>' for sid, t, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=\"meta\">{meta}</p><nav>{nav}</nav>{body}</body></html>\n")


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "run"


def _reconstructions(runs: list[RunInfo], limit: int = 24) -> str:
    figs = [(r, f) for r in runs for f in r.figures]
    if not figs:
        return ("<p>No reconstructions: no run wrote figures (inversion attacks with <code>save_grid: true</code> "
                "do).</p>")
    parts = ["<p>Originals next to the attack's reconstructions, as the inversion attack saved them "
             "(top: originals, bottom: reconstructions; titles give each image's PSNR).</p>"]
    for run, f in figs[:limit]:
        parts.append(_figure(f, f"{run.label}: {f.name}"))
    if len(figs) > limit:
        parts.append(f"<p>{len(figs) - limit} more under the runs' figures/ folders.</p>")
    return "".join(parts)


def report_run(run_dir: Path, metric: str = "auroc", out: Path | None = None) -> Path:
    run = RunInfo.load(run_dir)
    if not run.summary and not run.rounds:
        raise FedsecError(f"{run_dir}: no summary.json or rounds.jsonl: not a results folder")
    out = out or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    s = run.summary
    name = s.get("scenario") or run.scenario.get("name") or run_dir.name
    # a one-cell risk matrix from the run itself
    from fedsec.analysis.tables import attack_metric_of

    am, av = attack_metric_of(s.get("attack") or {})
    row = {"status": s.get("status"), **{k: _num(v) for k, v in (s.get("final") or {}).items()},
           metric: _num((s.get("final") or {}).get(metric)), "attack_metric": am,
           "attack_value": av, "_summary": s, "_dir": str(run_dir), "_scenario": run.scenario}
    matrix = build_matrix([row], [], None, None, metric)
    png = plot_risk_matrix(matrix, out / "risk_matrix", f"{name}: risk")
    sections.append(("risk-matrix", "Risk matrix",
                     risk_matrix_html(matrix) + _figure(png, "risk matrix (PNG; PDF next to it)")))
    curves = plot_learning_curves([run], metric, out / f"curves_{_slug(run_dir.name)}",
                                  f"{name} (seed {s.get('seed')})")
    curve_figs = _figure(curves, "learning curves")
    if (s.get("threat_model") or {}).get("goal") == "integrity":
        # a label flip can leave AUROC where it was and still cost accuracy: draw what moves too
        for extra in ("balanced_accuracy", "accuracy"):
            if extra != metric:
                png_x = plot_learning_curves([run], extra, out / f"curves_{_slug(run_dir.name)}_{extra}",
                                             f"{name} (seed {s.get('seed')}): {_metric_name(extra)}")
                curve_figs += _figure(png_x, f"learning curves, {_metric_name(extra)}")
    sections.append(("curves", "Learning curves", "<p>Attack rounds shaded.</p>" + curve_figs))
    sections.append(("final", "Final metrics", final_metrics_html(s)))
    nulls_html = attack_nulls_html(s.get("attack") or {})
    if nulls_html:
        sections.append(("nulls", "Attack metrics against their nulls", nulls_html))
    sections.append(("reconstructions", "Reconstructions", _reconstructions([run])))
    ledger = _privacy_ledger_html(s)
    if ledger:
        sections.append(("privacy-ledger", "Privacy ledger (DP-SGD)", ledger))
    defense = matrix.column_title(matrix.defenses[0]) if matrix.defenses else ""
    attackers = "; ".join(f"{a['attack']} by {', '.join(a['hospitals']) or 'no hospital'} in rounds "
                          f"{a['rounds'][0]}-{a['rounds'][1]}" for a in s.get("attackers") or [])
    meta = (f"run <code>{html.escape(str(run_dir))}</code> · status {html.escape(str(s.get('status')))} · "
            f"{s.get('rounds')} rounds · defense {html.escape(defense or 'FedAvg')}"
            + f" · attack {html.escape(attackers or 'none')}"
            + f" · threat model {html.escape(_tags(s.get('threat_model')))}")
    page = _page(f"fedsec report — {name}", meta, sections)
    (out / "index.html").write_text(page)
    return out / "index.html"


def final_metrics_html(s: dict) -> str:
    """The final metrics of the union and of each hospital, with its test / training records
    and role; a metric undefined for a hospital reads "undefined (reason)" (summary.json's
    ``per_hospital_undefined``), never a blank."""
    final = s.get("final") or {}
    ph = s.get("per_hospital") or {}
    undefined = s.get("per_hospital_undefined") or {}
    hosp = s.get("hospitals") or {}
    keys = list(final) or list(next(iter(ph.values()), {}) or {})
    headers = ["", "test records", "training records", "role", *keys]
    total = sum(v.get("test_n") or 0 for v in hosp.values()) or ""
    rows = [["union", total, sum(v.get("train_n") or 0 for v in hosp.values()) or "", "",
             *(_fmt(final.get(k)) or "undefined" for k in keys)]]
    for h in dict.fromkeys([*ph, *hosp]):
        v, info, why = ph.get(h) or {}, hosp.get(h) or {}, undefined.get(h) or {}
        role = ("malicious (" + ", ".join(info.get("attacks") or []) + ")") if info.get("malicious") else (
            "benign" if info else "")
        cells = []
        for k in keys:
            text = _fmt(v.get(k))
            cells.append(text if text else (f"undefined ({why[k]})" if k in why else "undefined" if v else "not evaluated"))
        rows.append([h, info.get("test_n", ""), info.get("train_n", ""), role, *cells])
    return _table_html(headers, [[("" if c is None else c) for c in r] for r in rows])


def _privacy_ledger_html(s: dict) -> str:
    """summary.json's DP-SGD ledger per hospital (epsilon spent, delta, rounds trained, last
    round, and with ``privacy.dp_sgd.budgets`` the budget and the round it stopped at), or ""."""
    dp = ((s.get("privacy") or {}).get("dp_sgd") or {})
    ledger = dp.get("ledger") or {}
    if not ledger:
        return ""
    budgets = any("budget" in e for e in ledger.values())
    headers = ["hospital", "epsilon spent", "delta", "rounds trained", "last round"]
    headers += ["budget", "stopped at round"] if budgets else []
    rows = []
    for h, e in ledger.items():
        row = [h, _fmt(e.get("epsilon")), e.get("budget_delta", e.get("delta")), e.get("rounds"), e.get("last_round")]
        if budgets:
            row += [_fmt(e.get("budget")) or "none", e.get("stopped_at") or "-"]
        rows.append(row)
    text = f"<p>Largest epsilon over every hospital and round: {_fmt(dp.get('epsilon_max'))}.</p>"
    if s.get("status") == "budget_exhausted":
        text += f"<p>The run ended early: {html.escape(str(s.get('error')))}</p>"
    return text + _table_html(headers, rows)


def attack_nulls_html(attack: dict) -> str:
    """summary.json's ``attack.stats`` (each metric with its null, effect and 95% CI; "at floor"
    when the effect's CI includes 0), ``durability`` and ``main_task_cost`` as HTML ("" if none)."""
    stats = attack.get("stats") or {}
    parts = []
    if stats:
        rows = []
        for name, st in stats.items():
            ci, eci = st.get("ci") or [None, None], st.get("effect_ci") or [None, None]
            verdict = ("at floor: no detectable difference" if st.get("at_floor") is True
                       else "above its null" if st.get("at_floor") is False else "")
            rows.append([name, _fmt(st.get("value")), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]",
                         f"{_fmt(st.get('null'))} ({st.get('null_kind') or '?'})", _fmt(st.get("effect")),
                         f"[{_fmt(eci[0])}, {_fmt(eci[1])}]", verdict])
        parts.append("<p>Each attack metric beside the same metric where the attack cannot work (its null), "
                     "with 95% bootstrap intervals over the records scored.</p>")
        parts.append(_table_html(["metric", "value", "95% CI", "null", "effect", "effect 95% CI", "verdict"], rows))
    d = attack.get("durability")
    if d:
        after = ", ".join(f"{k} round(s) later {_fmt(v)}" for k, v in (d.get("after") or {}).items())
        back = (f"back at its floor {d['rounds_to_floor']} round(s) after the attack stopped"
                if d.get("rounds_to_floor") is not None
                else f"not back at its floor within the {d.get('censored_after')} round(s) watched")
        parts.append(f"<p>Durability ({html.escape(str(d.get('attack')))}, rounds {d['window'][0]}-{d['window'][1]}): "
                     f"{html.escape(d.get('metric', ''))} {_fmt(d.get('at_end_of_attack'))} at the end of the attack; "
                     f"{html.escape(after)}; {back}.</p>")
    cost = attack.get("main_task_cost")
    if cost:
        items = "; ".join(f"{k} {_fmt(v['attacked'])} vs {_fmt(v['no_attack'])} without the attack "
                          f"(cost {_fmt(v['cost'])})" for k, v in cost.items() if isinstance(v, dict))
        parts.append(f"<p>Main-task cost against the no-attack run of the same seed: {html.escape(items)}.</p>")
    return "".join(parts)


def _fmt(v, digits=3):
    v = _num(v)
    return "" if v is None else f"{v:.{digits}f}"


def _tags(t) -> str:
    return ", ".join(f"{k} {v}" for k, v in (t or {}).items() if v) or "(none)"


def report_sweep(sweep_dir: Path, rows: str | None = None, cols: str | None = None, metric: str | None = None,
                 out: Path | None = None, max_curves: int = 60) -> Path:
    from fedsec.analysis.tables import collect_rows, default_axes, load_sweep, write_tables

    meta = load_sweep(sweep_dir)
    opts = meta.get("table") or {}
    metric = metric or opts.get("metric") or "auroc"
    tables = write_tables(sweep_dir, rows=rows, cols=cols, metric=metric)
    data, keys = collect_rows(sweep_dir)
    row_key, col_key = default_axes(keys, rows or opts.get("rows"), cols or opts.get("cols"))
    out = out or sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    e = html.escape
    sections = []

    # risk matrix
    m_row, m_col, averaged = matrix_axes(keys, rows or opts.get("rows"), cols or opts.get("cols"))
    matrix = build_matrix(data, keys, m_row, m_col, metric)
    if tables.get("strongest_json"):
        import json as _json

        from fedsec.analysis.matrix import add_strongest_row

        # with separate selection seeds, the row's numbers come from the reporting seeds' cells only
        add_strongest_row(matrix, _json.loads(Path(tables["strongest_json"]).read_text()), data, keys)
    if averaged:
        matrix.notes.append(f"averaged over the grid key(s) {', '.join(averaged)} as well as the seeds; "
                            "give --rows / --cols to choose the axes")
    name = next((r["_summary"].get("scenario") for r in data if r.get("_summary")), None) \
        or Path(str(meta.get("scenario"))).stem
    png = plot_risk_matrix(matrix, out / "risk_matrix", f"{name}: attacks x defenses "
                                                        f"({len(meta.get('seeds') or [None])} seed(s) each)")
    content = ("<p>Each cell: the final utility under attack (mean ± std over seeds), the attack's own "
               "metric, and a reading generated from the numbers. Colour: attack success; right edge: "
               "what the defense costs without an attack. Rows are grouped by the threat-model tags "
               "(domain · adversary · goal).</p>" + risk_matrix_html(matrix)
               + _figure(png, "risk matrix (risk_matrix.png / risk_matrix.pdf)"))
    sections.append(("risk-matrix", "Risk matrix", content))

    # summary table (summary.md as HTML)
    from fedsec.analysis.tables import aggregate, format_cell

    agg = aggregate(data, keys, row_key, col_key, metric)
    extra = [k for k in keys if k not in (row_key, col_key) and k != "seed"]
    col_values = list(dict.fromkeys(a["col"] for a in agg))
    row_ids = list(dict.fromkeys((tuple(a[k] for k in extra), a["row"]) for a in agg))
    by = {(tuple(a[k] for k in extra), a["row"], a["col"]): a for a in agg}
    headers = [*extra, f"{row_key or ''} \\ {col_key or ''}"] + [str(c) for c in col_values]
    trows = [[*ex, r] + [format_cell(by.get((ex, r, c))) for c in col_values] for ex, r in row_ids]
    sections.append(("summary", f"Summary ({_metric_name(metric)}, mean ± std over seeds)",
                     _table_html(headers, trows, "summary")
                     + f"<p>Files: <code>{e(tables['summary_md'].name)}</code>, "
                       f"<code>{e(tables['summary_csv'].name)}</code>, "
                       f"<code>{e(tables['sweep_csv'].name)}</code> in the sweep folder.</p>"))

    # a label flip can barely move AUROC and still cost accuracy: with integrity attacks in the
    # sweep, the same table for balanced accuracy and accuracy
    if any(((r.get("_summary") or {}).get("threat_model") or {}).get("goal") == "integrity" for r in data):
        for other in ("balanced_accuracy", "accuracy"):
            if other == metric:
                continue
            agg_x = aggregate(data, keys, row_key, col_key, other)
            by_x = {(tuple(a[k] for k in extra), a["row"], a["col"]): a
                    for a in agg_x}
            xrows = [[*ex, r] + [format_cell(by_x.get((ex, r, c))) for c in col_values] for ex, r in row_ids]
            sections.append((f"summary-{other}", f"Summary ({_metric_name(other)}, mean ± std over seeds)",
                             _table_html(headers, xrows, "summary")))

    # strongest attack per defense, harm per hospital (their Markdown files as HTML)
    for key, anchor, title in (("strongest_md", "strongest", "Strongest attack per defense"),
                               ("hospitals_md", "hospitals", "Harm per hospital")):
        if tables.get(key):
            sections.append((anchor, title, _markdown_html(Path(tables[key]).read_text())))

    # learning curves: one figure per configuration (seeds as separate lines)
    configs: dict[tuple, list[RunInfo]] = {}
    for r in data:
        if r["status"] not in ("completed", "failed", "interrupted"):
            continue
        cfg = tuple((k, r.get(k)) for k in keys)
        run = RunInfo.load(r["_dir"], label=r["cell"])
        if run.rounds:
            configs.setdefault(cfg, []).append(run)
    parts = ["<p>Global and per-hospital utility per round (one line per seed; the malicious hospital dashed), "
             "the attack's metric over rounds when it has one; red band: rounds in which the attack is active.</p>"]
    for i, (cfg, runs) in enumerate(configs.items()):
        if i >= max_curves:
            parts.append(f"<p>{len(configs) - max_curves} more configurations not drawn.</p>")
            break
        label = ", ".join(f"{k}={v}" for k, v in cfg) or "base"
        png = plot_learning_curves(runs, metric, out / f"curves_{_slug(label)}", label)
        parts.append(_figure(png, label))
    sections.append(("curves", "Learning curves", "".join(parts)))

    # privacy-utility
    png = plot_privacy_utility(data, keys, metric, out / "privacy_utility")
    sections.append(("privacy", "Privacy vs utility",
                     _figure(png, "privacy-utility curves") if png else
                     "<p>This sweep varies no privacy setting (no <code>privacy.*</code> grid key): "
                     "no privacy-utility curve.</p>"))

    # reconstructions
    runs_all = [RunInfo.load(r["_dir"], label=r["cell"]) for r in data]
    sections.append(("reconstructions", "Reconstructions", _reconstructions(runs_all)))

    # cells
    crow = [[r["cell"], r["status"], _fmt(r.get(metric)), r.get("attack_metric") or "", _fmt(r.get("attack_value")),
             _fmt(r.get("timing.wall_s"), 1), (r.get("error") or "")[:200]] for r in data]
    cell_headers = ["cell", "status", metric, "attack metric", "value", "wall s", "error"]
    sections.append(("cells", "Cells", _table_html(cell_headers,
                                                    crow, "cells")))
    n_ok = sum(r["status"] == "completed" for r in data)
    meta_line = (f"sweep <code>{e(str(sweep_dir))}</code> of <code>{e(str(meta.get('scenario')))}</code> · "
                 f"{n_ok}/{len(data)} cells completed · grid "
                 + e("; ".join(f"{k} = {', '.join(v)}" for k, v in (meta.get("grid") or {}).items()))
                 + (f" · seeds {e(', '.join(map(str, meta['seeds'])))}" if meta.get("seeds") else "")
                 + f"<br>command: <code>{e(meta.get('command') or '')}</code>")
    page = _page(f"fedsec report — sweep of {name}", meta_line, sections)
    (out / "index.html").write_text(page)
    return out / "index.html"


def report(path, rows: str | None = None, cols: str | None = None, metric: str | None = None,
           out=None) -> Path:
    """Write ``<path>/report/`` for a sweep folder (sweep.json) or a run folder; returns index.html."""
    path = Path(path)
    if not path.is_dir():
        raise FedsecError(f"{path}: no such results folder")
    out = Path(out) if out else None
    if (path / "sweep.json").exists():
        return report_sweep(path, rows, cols, metric, out)
    if (path / "summary.json").exists() or (path / "rounds.jsonl").exists():
        return report_run(path, metric or "auroc", out)
    raise FedsecError(f"{path}: neither a sweep folder (sweep.json) nor a run folder (summary.json)")


# --------------------------------------------------------------------------------------
# Command line (the lead wires add_report_parser into fedsec.cli)
# --------------------------------------------------------------------------------------


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="figures + one offline HTML page (risk matrix) for a run or sweep folder",
                              description="Writes <DIR>/report/index.html (self-contained) and PNG/PDF figures.")
    p.add_argument("path", nargs="?", metavar="RUN_OR_SWEEP_DIR")
    p.add_argument("--rows", metavar="KEY", help="grid key of the attack axis (default: attacks)")
    p.add_argument("--cols", metavar="KEY", help="grid key of the defense axis (default: strategy)")
    p.add_argument("--metric", default=None, help="utility metric (default: auroc)")
    p.add_argument("--out", help="report folder (default <DIR>/report)")
    p.add_argument("--threat-map", nargs="?", const="-", metavar="FILE",
                   help="write the taxonomy coverage table (docs/threat-model.md) to FILE or stdout, and exit")
    p.set_defaults(fn=cmd_report)
    return p


def cmd_report(args) -> int:
    if args.threat_map:
        text = threat_map_markdown()
        if args.threat_map == "-":
            print(text)
        else:
            Path(args.threat_map).write_text(text)
            print(f"wrote {args.threat_map}")
        return 0
    if not args.path:
        raise FedsecError("give a run or sweep folder (or --threat-map)")
    from fedsec.analysis.tables import METRIC_KEYS

    if args.metric and args.metric not in METRIC_KEYS:
        raise FedsecError(f"--metric '{args.metric}': one of {', '.join(METRIC_KEYS)}")
    index = report(args.path, rows=args.rows, cols=args.cols, metric=args.metric, out=args.out)
    print(f"report: {index}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fedsec.analysis.report ...`` = ``fedsec report ...``."""
    from fedsec.cli import main as cli_main

    return cli_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
