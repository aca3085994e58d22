"""``docs/components.md``: every registered component with its options and capabilities,
generated from the declarations on the classes (nothing here lists names).

    python -m fedsec.components_doc docs/components.md

A unit test fails when the checked-in file is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedsec.registry import ATTACKS, MODELS, PARTITIONERS, PRIVACY, RULES, TASKS, options_of


def _default(value) -> str:
    import dataclasses

    if value is dataclasses.MISSING:
        return "(required)"
    return "null" if value is None else f"`{value!r}`".replace("'", "") if not isinstance(value, str) else f"`{value}`"


def _options_table(obj) -> list[str]:
    specs = options_of(obj)
    if specs is None:
        return ["Options are passed through to the underlying library.", ""]
    if not specs:
        return ["No options.", ""]
    lines = ["| option | type | default | range | meaning |", "|---|---|---|---|---|"]
    for s in specs:
        doc = (s.doc or "").replace("|", "\\|")
        lines.append(f"| `{s.name}` | {s.type_name().replace('|', '/')} | {_default(s.default)} | "
                     f"{s.range_text() or ''} | {doc} |")
    return lines + [""]


def _summary(obj) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip().split("\n\n")[0]
    return " ".join(doc.split())


def components_markdown() -> str:
    out = ["# Components", "",
           "Generated from the declarations on the classes by `python -m fedsec.components_doc "
           "docs/components.md`: do not edit by hand. A scenario's options are checked against these "
           "tables when it is loaded (`fedsec validate`).", ""]
    out += ["## Tasks", "", "| task | domain | partitions | sites | needs `task.path` | `task.options` |",
            "|---|---|---|---|---|---|"]
    for name, fn in TASKS.items():
        sp = fn.spec
        out.append(f"| `{name}` | {sp.domain} | {', '.join(sp.splits)} | {', '.join(sp.sites or []) or '-'} | "
                   f"{'yes' if sp.needs_path else 'no'} | {', '.join(f'`{k}`' for k in sp.options)} |")
    out += ["", "## Models", ""]
    for name, obj in MODELS.items():
        out += [f"### `{name}`", "", _summary(obj), ""] + _options_table(obj)
    out += ["## Partitioners (`federation.partition`)", ""]
    for name, obj in PARTITIONERS.items():
        out += [f"### `{name}`", "", _summary(obj), ""] + _options_table(obj)
    out += ["## Aggregation rules (`strategy`)", ""]
    for name, cls in RULES.items():
        sp = cls.spec()
        caps = [f"tolerates: {sp.tolerates}",
                "needs each hospital's update (not with secure aggregation)" if sp.needs_individual_updates
                else "works on the sum (secure aggregation compatible)"]
        if sp.mean_like:
            caps.append("a weighted mean")
        if sp.needs_root_data:
            caps.append("needs the server's root data")
        if sp.stateful:
            caps.append("keeps state between rounds")
        out += [f"### `{name}`", "", _summary(cls), "", "Capabilities: " + "; ".join(caps) + ".", ""]
        out += _options_table(cls)
    out += ["## Attacks (`attacks[i]`)", "",
            "Every attack entry also takes the framework keys `hospitals`, `fraction`, `rounds`, "
            "`only_when_selected` (docs/scenarios.md).", ""]
    for name, cls in ATTACKS.items():
        sp = cls.spec()
        caps = [f"goal {sp.goal}", f"kind {sp.kind}", "hooks " + ", ".join(sp.hooks)]
        if sp.server_only:
            caps.append("needs no malicious hospital")
        if sp.simulation_only:
            caps.append("simulation only (omniscient)")
        if sp.targets:
            caps.append("adapts to " + ", ".join(f"`{t}`" for t in sp.targets))
        if sp.success_metric:
            caps.append(f"success: `{sp.success_metric}` ({sp.success_wording})")
        alias = f" (the same class as `{sp.name}`)" if sp.name != name else ""
        out += [f"### `{name}`{alias}", "", _summary(cls), "", "Capabilities: " + "; ".join(caps) + ".", ""]
        out += _options_table(cls)
    out += ["## Privacy defenses (`privacy.<name>`)", ""]
    for name, cls in PRIVACY.items():
        caps = [f"acts in: {cls.acts_in}",
                "hides individual updates from the server" if cls.hides_individual_updates
                else "the server still sees each hospital's update"]
        out += [f"### `privacy.{name}`", "", cls.title[0].upper() + cls.title[1:] + ".", "",
                "Capabilities: " + "; ".join(caps) + ".", ""]
        out += _options_table(cls)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = components_markdown()
    if argv:
        Path(argv[0]).write_text(text)
        print(f"wrote {argv[0]}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
