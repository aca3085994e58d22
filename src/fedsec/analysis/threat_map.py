"""docs/threat-model.md, generated from the attack and strategy presets and the components' declarations.

    python -m fedsec.analysis.report --threat-map docs/threat-model.md"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fedsec.analysis.runs import _attack_cls

# --------------------------------------------------------------------------------------
# Threat map (docs/threat-model.md)
# --------------------------------------------------------------------------------------

# Which data an attack implementation works on (the rest work on any model update).
DOMAIN_MODALITY = {"image_classification": "image", "image_detection": "image", "image_segmentation": "image",
                   "imaging": "image", "ehr_prediction": "tabular", "electrogram": "signal",
                   "multi_omics": "tabular", "cross_modal": "multi"}
# What a robust aggregation rule is built against (robust rules: hospital insiders poisoning training).
ROBUST_TARGETS = {"goals": ("integrity", "availability"), "adversaries": ("hospital_insider",), "phase": "training"}
# The server's own availability defenses (scenario keys, not components): docs/scenarios.md,
# "Participation".
AVAILABILITY_DEFENSES = [
    ("federation.participation", "a round deadline (policy: proceed) leaves late or missing replies out instead "
                                 "of waiting for them"),
    ("federation.min_hospitals", "the fewest usable replies a round may go on with"),
    ("federation.max_reply_mb", "a reply larger than the limit is dropped before it is unpacked (replies whose "
                                "arrays are not the model's are always dropped)"),
]


def _privacy_defenses() -> list:
    """(scenario key, title) of every registered privacy defense."""
    from fedsec.registry import PRIVACY

    return [(f"privacy.{name}", cls.title) for name, cls in PRIVACY.items()]


SCENARIO_FILE_THREATS = [
    "## The scenario file itself", "",
    "A scenario is input from someone else: a colleague's shared file, or, in a deployment, the text the "
    "server sends every hospital. Its threat model: the author may be careless or hostile; fedsec must not "
    "let it run code, read secrets, write outside the results folder, exhaust the machine, or silently "
    "change what is measured.", "",
    "| threat | what fedsec does |", "|---|---|",
    "| code execution (`attack: \"os:system\"`) | components are looked up among registered classes only; "
    "no value is imported or called |",
    "| secrets copied into results (`${oc.env:SECRET}`) | interpolation is refused |",
    "| writes elsewhere (`name: ../../x`, absolute `output.dir`) | `name` is a plain name, `output.dir` relative; "
    "`--out` is the one deliberate way out |",
    "| exhaustion (a symlink to `/dev/zero`, an alias bomb, `rounds: 1e12`) | regular files up to 1 MiB, "
    "bounded aliases and values, documented numeric ranges |",
    "| silent changes (duplicate keys or sites, ignored `hospitals`) | errors naming the key |", "",
    "Details and the full list: [scenarios.md](scenarios.md#what-a-scenario-file-may-contain-and-why).", "",
]


# Measured strongest attacks: `strongest.json` of a strongest-attack sweep (fedsec.analysis.strongest)
# copied into docs/measured/ with a "title" and the "command" that made it, so that the map can
# be regenerated from committed files (runs/ is not committed).
MEASURED_DIR = ("docs", "measured")
EFFECT_WORDING = {"backdoor": "ASR above the clean-model floor", "untargeted": "share of the AUROC skill lost"}
FAMILY_LABEL = {"asr": "backdoor", "damage": "untargeted"}


def _fmt_effect(test: dict) -> str:
    text = f"{test['mean']:+.3f} [{test['low']:+.3f}, {test['high']:+.3f}]"
    return f"**{text}**" if test.get("detectable") else f"{text} (no detectable effect)"


def _seeds(v) -> str:
    return ", ".join(str(x) for x in v) if v else "?"


def measured_section(folder: Path, strategies: list[str]) -> list[str]:
    """The "Measured" section: per defense, the strongest attack of each study in ``folder``
    (``*.json``: a sweep's strongest.json plus ``title``, ``command``, ``not_measured``:
    {defense: why it is not a column}, and ``notes``: {defense: how to read its cell}) with its test effect
    and 95% CI; the strategy presets no study measured are named."""
    studies = []
    for f in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
        data = json.loads(f.read_text())
        if isinstance(data.get("by_defense"), dict):
            studies.append(data)
    if not studies:
        return []
    defenses: list[str] = []
    for st in studies:
        defenses += [d for d in st["by_defense"] if d not in defenses]
    L = ["## Measured: the strongest attack per defense", "",
         "Each cell: per family, the backdoor and the untargeted attack that did the most harm on the validation "
         "split of the selection seeds (each selected within its family: the two effects are on different "
         "scales), and its effect on the test split of the other seeds, mean [95% CI] (bold: the interval "
         "excludes 0). " + "; ".join(f"{k}: {v}" for k, v in EFFECT_WORDING.items()) + ". Details, nulls and "
         "per-candidate effects: [results.md](results.md#strongest-attack-per-defense).", ""]
    L.append("| defense | " + " | ".join(st.get("title", "?") for st in studies) + " |")
    L.append("|---|" + "---|" * len(studies))
    for d in defenses:
        cells = []
        for st in studies:
            e = st["by_defense"].get(d) or {}
            # per family when the study has it (fedsec.analysis.strongest.FAMILIES), else the one winner
            picks = ([(FAMILY_LABEL.get(k, k), f) for k, f in e["families"].items()] if e.get("families")
                     else [(FAMILY_LABEL.get((e.get("test") or {}).get("kind"), "?"), e)])
            parts = [f"{label}: `{f['winner']}` {_fmt_effect(f['test'])} (n = {f['test'].get('n')})"
                     for label, f in picks if (f.get("test") or {}).get("mean") is not None]
            cells.append("<br>".join(parts) if parts else "—")
        L.append(f"| `{d}` | " + " | ".join(cells) + " |")
    L.append("")
    for st in studies:
        L.append(f"- {st.get('title', '?')}: `{st.get('command', '?')}`; candidates "
                 + ", ".join(f"`{c}`" for c in st.get("candidates", [])) + f"; selected on seeds "
                 f"{_seeds(st.get('selection_seeds'))}, reported on seeds {_seeds(st.get('report_seeds'))}."
                 + "".join(f" Not in this study: `{d}` ({why})." for d, why in (st.get("not_measured") or {}).items())
                 + "".join(f" `{d}`: {why}" for d, why in (st.get("notes") or {}).items()))
    unmeasured = [s for s in strategies if s != "fedavg" and s not in defenses]
    if unmeasured:
        L.append("- Not yet measured against the strongest attack: " + ", ".join(f"`{s}`" for s in unmeasured)
                 + ".")
    return L + [""]


def threat_map_markdown() -> str:
    """docs/threat-model.md, generated from attacks/*.yaml and strategies/*.yaml."""
    from fedsec.registry import TASKS
    from fedsec.scenario import TAXONOMY, list_presets, project_root

    root = project_root()
    attacks = []
    for name, path in sorted(list_presets("attacks").items()):
        data = yaml.safe_load(path.read_text()) or {}
        attacks.append({"preset": name, "attack": data.get("attack"), "threat": data.get("threat") or {},
                        "description": " ".join(str(data.get("description", "")).split())})
    strategies = []
    for name, path in sorted(list_presets("strategies").items()):
        data = yaml.safe_load(path.read_text()) or {}
        strategies.append({"preset": name, "rule": data.get("rule"),
                           "description": " ".join(str(data.get("description", "")).split())})
    tasks_by_domain: dict[str, list[str]] = {}
    for task, builder in TASKS.items():
        tasks_by_domain.setdefault(builder.spec.domain, []).append(task)
    domains = [d for d in TAXONOMY["domain"] if d != "imaging"]
    covered_domains = [d for d in domains if d in tasks_by_domain]

    def applies(a, domain) -> bool:
        modality = DOMAIN_MODALITY.get(domain)
        cls = _attack_cls(a["attack"])
        if cls is not None and cls.modality != "any":
            return modality == cls.modality
        return True

    L = ["# Threat model: what fedsec covers", "",
         "<!-- generated by `python -m fedsec.analysis.report --threat-map docs/threat-model.md` from attacks/*.yaml and "
         "strategies/*.yaml; edit those, then regenerate -->", "",
         "fedsec tags every scenario, attack preset and report with the taxonomy of Chang et al., "
         "\"SoK: Security and Privacy Risks of Healthcare AI\" (arXiv 2409.07415): **domain** x **adversary "
         "role** x **knowledge** x **phase** x **goal** (docs/design.md §2). A scenario's `threat_model` tags "
         "are checked against its attacks' tags, left-out tags are derived from the task and the attacks, and "
         "`fedsec report` groups the risk matrix by (domain, adversary, goal).", "",
         "## The taxonomy", "",
         "| axis | values | meaning |", "|---|---|---|",
         "| domain | " + ", ".join(f"`{d}`" for d in domains) + " | the clinical data / task "
         "(`imaging` is accepted as a synonym of image classification) |",
         "| adversary | " + ", ".join(f"`{a}`" for a in TAXONOMY["adversary"]) + " | who attacks: a patient, a "
         "clinician, an insider of a participating hospital, a third-party vendor, the (honest-but-)curious FL "
         "server, an outsider |",
         "| knowledge | " + ", ".join(f"`{k}`" for k in TAXONOMY["knowledge"]) + " | what the adversary knows; "
         "`omniscient` = a coalition that sees every benign update of the round (simulation only) |",
         "| phase | " + ", ".join(f"`{p}`" for p in TAXONOMY["phase"]) + " | when it acts |",
         "| goal | " + ", ".join(f"`{g}`" for g in TAXONOMY["goal"]) + " | integrity: poisoning, backdoors, "
         "evasion; confidentiality: membership inference, model inversion, data reconstruction; availability: "
         "degrading or stalling training |", "",
         "## Tasks per domain", "", "| domain | fedsec tasks |", "|---|---|"]
    for d in domains:
        L.append(f"| `{d}` | " + (", ".join(f"`{t}`" for t in tasks_by_domain.get(d, [])) or "— (none yet)") + " |")
    L += ["", "## Attacks per (domain, adversary) x goal", "",
          "Each entry: attack preset (knowledge, phase). Only domains that have a task are listed; "
          "an attack appears under a domain when its implementation works on that domain's data "
          "(image triggers and image inversion need images, EHR triggers and tabular inversion need tables).", ""]
    goals = list(TAXONOMY["goal"])
    L.append("| domain | adversary | " + " | ".join(goals) + " |")
    L.append("|---|---|" + "---|" * len(goals))
    empty_cells = []
    for d in covered_domains:
        for adv in TAXONOMY["adversary"]:
            row = []
            for g in goals:
                hits = [a for a in attacks if a["threat"].get("adversary") == adv and a["threat"].get("goal") == g
                        and applies(a, d)]
                if hits:
                    row.append(", ".join(f"`{a['preset']}` ({a['threat'].get('knowledge', '?')}, "
                                         f"{a['threat'].get('phase', '?')})" for a in hits))
                else:
                    row.append("—")
                    empty_cells.append((d, adv, g))
            L.append(f"| `{d}` | `{adv}` | " + " | ".join(row) + " |")
    L += ["", "## Defenses", "",
          "| defense | what it is | built against | status |", "|---|---|---|---|"]
    for s in strategies:
        if s["rule"] == "fedavg":
            L.append(f"| `strategy: {s['preset']}` | {s['description']} | nothing (the undefended reference) "
                     "| available |")
            continue
        L.append(f"| `strategy: {s['preset']}` | {s['description']} | hospital insiders, integrity + availability, "
                 "training | available |")
    for key, desc in _privacy_defenses():
        L.append(f"| `{key}` | {desc} | curious server / external, confidentiality | available |")
    for key, desc in AVAILABILITY_DEFENSES:
        L.append(f"| `{key}` | {desc} | hospital insiders and faults, availability | available |")
    L += ["", "## Coverage: which (domain, adversary, goal) cells have attacks and defenses", "",
          "| goal | adversary | attacks | defenses |", "|---|---|---|---|"]
    robust = [s["preset"] for s in strategies if s["rule"] != "fedavg"]
    privacy = [k for k, _ in _privacy_defenses()]
    for g in goals:
        for adv in TAXONOMY["adversary"]:
            hits = [a["preset"] for a in attacks
                    if a["threat"].get("adversary") == adv and a["threat"].get("goal") == g]
            if not hits:
                continue
            if g in ROBUST_TARGETS["goals"] and adv in ROBUST_TARGETS["adversaries"]:
                defs = ", ".join(f"`{r}`" for r in robust) or "—"
                if g == "availability":
                    defs = ", ".join(f"`{k}`" for k, _ in AVAILABILITY_DEFENSES) + ", " + defs
            elif g == "confidentiality":
                defs = ", ".join(f"`{p}`" for p in privacy) or "— (privacy defenses not yet in this version)"
            else:
                defs = "—"
            L.append(f"| {g} | `{adv}` | " + ", ".join(f"`{h}`" for h in hits) + f" | {defs} |")
    L += ["", "## Still empty", ""]
    missing_domains = [d for d in domains if d not in tasks_by_domain]
    if missing_domains:
        L.append("- Domains without a task (so without any attack): "
                 + ", ".join(f"`{d}`" for d in missing_domains) + ".")
    unused_adv = [a for a in TAXONOMY["adversary"] if not any(x["threat"].get("adversary") == a for x in attacks)]
    if unused_adv:
        L.append("- Adversary roles no preset plays: " + ", ".join(f"`{a}`" for a in unused_adv) + ".")
    for k in ("knowledge", "phase"):
        unused = [v for v in TAXONOMY[k] if not any(x["threat"].get(k) == v for x in attacks)]
        if unused:
            L.append(f"- {k.capitalize()} values no preset uses: " + ", ".join(f"`{v}`" for v in unused)
                     + (" (no evasion / test-time attack yet)" if k == "phase" and "inference" in unused else "") + ".")
    for g in goals:
        for ph in TAXONOMY["phase"]:
            if not any(x["threat"].get("goal") == g and x["threat"].get("phase") == ph for x in attacks):
                what = {("integrity", "inference"): " (evasion: adversarial examples at test time)",
                        ("availability", "inference"): " (e.g. sponge / denial-of-service inputs)"}.get((g, ph), "")
                L.append(f"- No {g} attack in the {ph} phase{what}.")
    by_goal_adv = {}
    for d, adv, g in empty_cells:
        by_goal_adv.setdefault((adv, g), []).append(d)
    have_attack = {(a["threat"].get("adversary"), a["threat"].get("goal")) for a in attacks}
    partial = [(adv, g, ds) for (adv, g), ds in by_goal_adv.items() if (adv, g) in have_attack]
    for adv, g, ds in partial:
        L.append(f"- `{adv}` x {g} has attacks, but none for " + ", ".join(f"`{d}`" for d in ds) + ".")
    goals_without_def = [g for g in goals if g == "confidentiality" and not privacy]
    if goals_without_def:
        L.append("- Confidentiality attacks have no defense that runs in this version yet "
                 "(DP-SGD, central DP and secure aggregation are in the schema).")
    L += ["", f"{len(attacks)} attack presets, {len(strategies)} strategy presets "
          f"({sum(1 for s in strategies if s['rule'] != 'fedavg')} robust rules).", ""]
    L += measured_section(root.joinpath(*MEASURED_DIR), [s["preset"] for s in strategies])
    L += SCENARIO_FILE_THREATS
    del root
    return "\n".join(L)
