"""The figures of tests/integration/test_attacks.py, and the "Attacks" text of docs/reliability.md.

Each attack test calls `record(test_name, figures)`: the figures are printed (see them with
``pytest -s``) and merged into build/reliability/attacks.json under the test's name, so a
``-k`` run updates only its own entry. ``python -m tests.support.attack_report`` prints the
Markdown of the doc's "Attacks" section from that file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["REPORT", "record", "render"]

REPORT = Path(__file__).resolve().parents[2] / "build" / "reliability" / "attacks.json"
COMMAND = ".venv/bin/python -m pytest -q tests/integration/test_attacks.py -k {name}"


def load(path: Path = REPORT) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data


def record(name: str, figures: dict[str, Any], path: Path = REPORT) -> None:
    print(f"\nATTACK {name} {json.dumps(figures, sort_keys=True)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = load(path)
    data[name] = figures
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _probes(p: dict[str, Any]) -> str:
    root, login = p["root"], p["login"]
    text = (
        f"root probe worst {_ms(root['max_ms'])} (median {_ms(root['median_ms'])}, "
        f"{root['count']} probes"
    )
    text += f", {root['failure_count']} failed)" if root["failure_count"] else ")"
    if login["count"] or login["failure_count"]:
        reasons = ", ".join(f"{k} x{v}" for k, v in sorted(login["replies"].items()))
        text += (
            f"; cross-node login worst {_ms(login['max_ms'])} (median "
            f"{_ms(login['median_ms'])}, {login['count']} logins: {reasons}"
        )
        text += f", {login['failure_count']} failed)" if login["failure_count"] else ")"
    return text


def _vitals(v: dict[str, Any]) -> str:
    b, p, a = v["before"], v["peak"], v["after"]
    return (
        f"RSS {b['rss_kb']} -> peak {p['rss_kb']} -> {a['rss_kb']} KiB, "
        f"fds {b['fds']} -> peak {p['fds']} -> {a['fds']}"
    )


def _row(name: str, f: dict[str, Any]) -> str:
    p, v = f["probes"], f["vitals"]
    after = v["after"] or {"rss_kb": "-", "fds": "-"}
    result = "held" if not f["violations"] else "**fails**"
    return (
        f"| {f['title']} (`-k {name}`) | {_ms(p['root']['max_ms'])} / "
        f"{_ms(p['login']['max_ms'])} | {v['before']['rss_kb']} -> {v['peak']['rss_kb']} -> "
        f"{after['rss_kb']} | {v['before']['fds']} -> {v['peak']['fds']} -> {after['fds']} | "
        f"{f['log_lines']} | {result} |"
    )


def render(data: dict[str, Any]) -> str:
    ordered = sorted(data.items(), key=lambda kv: kv[1].get("order", 0))
    out = [
        "| attack | worst probe: root / cross-node login | RSS KiB before -> peak -> after"
        " | fds before -> peak -> after | log lines | result |",
        "|---|---|---|---|---|---|",
        *(_row(name, f) for name, f in ordered),
        "",
    ]
    for name, f in ordered:
        result = "held" if not f["violations"] else "FAILS: " + "; ".join(f["violations"])
        out += [
            f"### {f['title']}",
            "",
            f"- Tried: {f['tried']} (against agent {f['target']}, {f['seconds']:.1f} s).",
            f"- Seen: {f['seen']}.",
            f"- Probes during the attack: {_probes(f['probes'])}.",
            f"- Agent: {_vitals(f['vitals'])}; the attack added {f['log_lines']} log lines"
            f" ({f['log_growth_bytes']} bytes).",
            f"- Result: {result}.",
            f"- Reproduce: `{COMMAND.format(name=name)}`",
            "",
        ]
    return "\n".join(out)


def main() -> int:
    data = load()
    if not data:
        print(f"no figures in {REPORT}: run test_attacks.py first", file=sys.stderr)
        return 1
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
