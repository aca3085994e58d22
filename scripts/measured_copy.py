"""Copy a sweep's strongest.json into docs/measured/, keeping the committed copy's own keys
(``title``, ``command``, ``not_measured``, ``notes``), so that the threat map can be regenerated
from committed files (fedsec.analysis.threat_map.measured_section):

    .venv/bin/python scripts/measured_copy.py runs/heart-strongest docs/measured/heart_strongest.json
    python -m fedsec.analysis.report --threat-map docs/threat-model.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OWN_KEYS = ("title", "command", "not_measured", "notes")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = Path(argv[0]) / "strongest.json", Path(argv[1])
    if not src.is_file():
        print(f"error: {src} not found: run `fedsec report {argv[0]}` first", file=sys.stderr)
        return 1
    fresh = json.loads(src.read_text())
    own = json.loads(dst.read_text()) if dst.is_file() else {}
    missing = [k for k in ("title", "command") if k not in own]
    if missing:
        print(f"error: {dst} needs {', '.join(missing)} (add them by hand once)", file=sys.stderr)
        return 1
    out = {k: own[k] for k in OWN_KEYS if k in own} | fresh
    dst.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
