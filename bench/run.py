"""`make bench`: every benchmark part, then ONE table of callerid beside pam_slurm_adopt.

Each part runs as its own process (its own set-up and clean-up, a time limit), writes its
rows as JSON, and its full output to build/bench/<part>.log. The table (Markdown, also saved
as build/bench/results.md) has one row per figure: what was measured, N, callerid's figure,
the reference's (Slurm 22.05 pam_slurm_adopt / slurmd, run here the same way), the ratio, the
target and whether it was met, and the number of the command that reproduces the row. The
login part runs once per Slurm release (22.05, 24.11, 26.05), each against that release's own
pam_slurm_adopt.so and slurmd; 24.11 and 26.05 with the slurm backend only, `OTHER_ROUNDS`
rounds and no stalled phase (their rows say so), to keep `make bench` short.

    sudo .venv/bin/python -m bench.run [--only login,storm] [--quick]   (from the repo top)

Needs root: it creates throwaway users, cgroups, sshd instances with their own PAM services,
a private Slurm (tests/support/slurm.py, which waits for the machine-wide Slurm lock) and
many agents, and removes all of it again. See docs/performance.md for what was learned.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench._common import TOP, Row, bench_argv, need_root, read_rows, reproduce

OUT = TOP / "build" / "bench"
CLEANUP_S = 180  # a part stopped for overrunning gets this long to clean up
ORDER = ["1a", "1b", "1c", "1d", "2a", "2e", "2f", "2b", "2c", "2d", "3", "4", "5", "6"]
OTHER_RELEASES = ("24.11", "26.05")  # besides Debian's 22.05, the full login part
OTHER_ROUNDS = "20"
OTHER_TARGETS = "plain,psa,psa-rpc,cid-slurm,cid-slurm-rpc"


@dataclass(frozen=True)
class Part:
    name: str
    argv: list[str]  # the bench module (bench.<argv[0]>) and its options
    timeout_s: float
    quick: list[str]  # the argv with --quick (smaller N), for a smoke run


def parts() -> list[Part]:
    sizes = [("1000", "500", "50"), ("10000", "2000", "30"), ("50000", "10000", "20")]
    out = [
        Part("decision", ["decision", "--rounds", "300"], 300, ["decision", "--rounds", "50"]),
    ]
    for sockets, procs, slurm_n in sizes:
        argv = [
            "resolution",
            "--sockets",
            sockets,
            "--sleepers",
            procs,
            "--scenarios",
            "fresh-cold,fresh-default,default",
            "--slurm-lookups",
            slurm_n,
        ]
        out.append(Part(f"resolution-{sockets}", argv, 300, [*argv[:-1], "5"]))
    out += [
        Part("storm", ["storm"], 300, ["storm", "--requests", "2"]),
        Part(
            "scale",
            ["scale", "--agents", "200", "--agents", "1000"],
            900,
            ["scale", "--agents", "50"],
        ),
        Part(
            "login",
            ["login", "--rounds", "30", "--stalled", "3", "--favordynmods", "20"],
            1500,
            ["login", "--rounds", "5", "--stalled", "1", "--favordynmods", "3"],
        ),
    ]
    for release in OTHER_RELEASES:
        argv = ["login", "--release", release, "--stalled", "0", "--targets", OTHER_TARGETS]
        out.append(
            Part(
                f"login-{release}",
                [*argv, "--rounds", OTHER_ROUNDS],
                900,
                [*argv, "--rounds", "3"],
            )
        )
    return out


def row_key(row: Row) -> tuple[int, str]:
    """Table order: by row number ("1b"), then release ("1b", "1b (24.11)", "1b (26.05)")."""
    base = row.row.split(" ")[0]
    return (ORDER.index(base) if base in ORDER else 99, row.row)


def run_part(part: Part, quick: bool) -> tuple[list[Row], str]:
    """Run one part; its rows (or one FAILED row) and a one-line status."""
    argv = part.quick if quick else part.argv
    js, log = OUT / f"{part.name}.json", OUT / f"{part.name}.log"
    js.unlink(missing_ok=True)
    cmd = bench_argv(argv[0], *argv[1:], "--json", str(js))
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=TOP)
        try:
            rc: int | str = proc.wait(part.timeout_s)
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = f"stopped after {part.timeout_s:.0f} s"
        except BaseException:  # we are interrupted: let the part clean up first
            stop(proc)
            raise
    took = time.monotonic() - t0
    if js.exists():
        rows, _ = read_rows(js)
        return rows, f"{part.name}: {took:.0f} s, exit {rc}"
    failed = Row(
        row="?",
        what=f"{part.name} FAILED (exit {rc}; see {log.relative_to(TOP)})",
        n="-",
        ours="-",
        reference="-",
        ratio="-",
        target="-",
        met="NO",
        reproduce=reproduce(argv[0], argv[1:]),
    )
    return [failed], f"{part.name}: FAILED after {took:.0f} s (exit {rc}), log {log}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the part unwinds and cleans up, bench/_common.py), SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(CLEANUP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def table(rows: list[Row]) -> str:
    """The Markdown table, then the numbered reproduce commands."""
    commands: list[str] = []
    lines = [
        "| row | what | N | callerid | pam_slurm_adopt / slurmd | ratio | target | met | cmd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=row_key):
        if r.reproduce not in commands:
            commands.append(r.reproduce)
        ref = commands.index(r.reproduce) + 1
        cells = [r.row, r.what, r.n, r.ours, r.reference, r.ratio, r.target, r.met, f"[{ref}]"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines.append("")
    lines += [f"[{i}] sudo {c}" for i, c in enumerate(commands, 1)]
    return "\n".join(lines)


def leftovers(before_dev_log: bool) -> list[str]:
    found = [str(p) for p in Path("/etc/pam.d").glob("sshd-cidb*")]
    for pattern in ("cidlogin-*", "cidscale-*", "cidstorm-*", "cid-bench-*"):
        found += [str(p) for p in Path("/tmp").glob(pattern)]
    for root in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/freezer")):
        found += [str(p) for p in root.glob("cid*bench-*")]
    if Path("/dev/log").exists() != before_dev_log:
        found.append("/dev/log (changed)")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated part names (prefixes): decision,login ...")
    ap.add_argument("--quick", action="store_true", help="small N: a smoke run, not results")
    args = ap.parse_args()
    need_root()
    OUT.mkdir(parents=True, exist_ok=True)
    dev_log = Path("/dev/log").exists()
    chosen = [
        p
        for p in parts()
        if not args.only or any(p.name.startswith(o) for o in args.only.split(","))
    ]
    rows: list[Row] = []
    t0 = time.monotonic()
    for i, part in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {part.name} ...", file=sys.stderr, flush=True)
        got, status = run_part(part, args.quick)
        rows += got
        print(f"      {status}", file=sys.stderr, flush=True)
    text = table(rows)
    (OUT / "results.md").write_text(text + "\n")
    print(text)
    print(
        f"\n# {os.cpu_count()} cpus; total {time.monotonic() - t0:.0f} s; logs and JSON in "
        f"{OUT.relative_to(TOP)}/; notes per row in the JSON files"
    )
    left = leftovers(dev_log)
    if left:
        print(f"# LEFTOVERS: {left}")
    return 1 if left or any(r.row == "?" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
