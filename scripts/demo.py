"""`make demo`: callerid on a 3-node virtual cluster on this machine, with real ssh logins.

Brings up three nodes (network namespaces with a real sshd each, pam_callerid.so first in
their account stack, a real callerid-agent, cgroup job trees, a private journald), plays the
main scenarios as a throwaway user and prints, for each login, what ran, the decision and its
journal record. Everything is torn down at the end, leaving the machine as it was.
Needs root (namespaces, cgroups, users, sshd).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from tests.support.callerid_cluster import CalleridCluster, cgroup_line  # noqa: E402
from tests.support.cluster import ClusterUser, Node  # noqa: E402

SHOWN_FIELDS = (
    "CALLERID_DECISION",
    "CALLERID_REASON",
    "CALLERID_JOB_ID",
    "CALLERID_USER",
    "CALLERID_UID",
    "CALLERID_PID",
    "CALLERID_SRC",
    "CALLERID_DST",
    "CALLERID_PEER_STATUS",
    "CALLERID_LATENCY_US",
    "MESSAGE_ID",
    "PRIORITY",
)
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str = "") -> None:
    print(text, flush=True)


def show_record(rec: dict[str, Any]) -> None:
    latency = int(rec.get("CALLERID_LATENCY_US", "0")) / 1000
    job = f" job {rec['CALLERID_JOB_ID']}" if "CALLERID_JOB_ID" in rec else ""
    say(
        f"   decision: {BOLD}{rec['CALLERID_DECISION']}{job}{RESET} "
        f"(reason {rec['CALLERID_REASON']}, source agent: {rec.get('CALLERID_PEER_STATUS')}, "
        f"{latency:.1f} ms in the agent)"
    )
    say(f"   journal:  {DIM}MESSAGE={json.dumps(rec['MESSAGE'])}{RESET}")
    fields = " ".join(f"{k}={rec[k]}" for k in SHOWN_FIELDS if k in rec)
    say(f"             {DIM}{fields}{RESET}")


def scenario(
    cc: CalleridCluster,
    title: str,
    src: Node,
    dst: Node,
    user: ClusterUser,
    *,
    job: str | None = None,
    cmd: str = "cat /proc/self/cgroup",
    login: Callable[..., Any] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    say()
    say(f"{BOLD}-- {title}{RESET}")
    where = f"inside job {job}" if job else "outside any job"
    say(f"   {user.name}@{src.name} ({where}) $ ssh {dst.name} {cmd}")
    before = len(cc.decisions(dst, user))
    run = login or src.ssh
    r = run(user, dst.name, cmd, job=job, **kw)
    rec = cc.next_decision(dst, user, before)
    if r.returncode == 0:
        shell = cgroup_line(r.stdout) or r.stdout.strip().splitlines()[-1]
        say(f"   remote shell's cgroup: {shell}")
    else:
        seen = [ln for ln in r.stderr.splitlines() if "denied" in ln] or r.stderr.splitlines()[-1:]
        say(f"   ssh exit {r.returncode}; the user saw: {' / '.join(seen)}")
    show_record(rec)
    return rec


def play(cc: CalleridCluster) -> None:
    n1, n2, n3 = cc.cluster.nodes
    user = cc.cluster.add_user(password="demo-" + os.urandom(4).hex())
    say(f"user {user.name} (uid {user.uid}); nodes:")
    for node in cc.cluster:
        say(f"   {node.name}: {node.ipv4}  [{node.ipv6}]  agent log {node.agent_log}")
    for node in (n1, n2):
        node.add_job("42", user)

    scenario(
        cc, "1. one job on node2: adopted into it (single-job shortcut)", n1, n2, user, job="42"
    )
    for node in (n1, n2):
        node.add_job("43", user)
    scenario(
        cc,
        "2. two jobs: node2 asks node1's agent which job the ssh came from",
        n1,
        n2,
        user,
        job="42",
    )
    scenario(cc, "   ... and from the other job", n1, n2, user, job="43")
    scenario(cc, "3. from outside any job: unknown policy 'newest'", n1, n2, user)
    n1.add_job("44", user)
    scenario(
        cc, "4. no job on node3: denied with a message, once job 44 did not appear there within "
        "policy.wait_for_job_ms", n1, n3, user, job="44",
    )  # fmt: skip
    scenario(cc, "5. over IPv6", n1, n2, user, job="42", ipv6=True)
    for node in (n2, n3):
        node.add_job("45", user)
    n1.add_job("45", user)
    hop = (
        "ssh -4 -o BatchMode=yes -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes "
        f"-i {user.key} node3 cat /proc/self/cgroup"
    )
    before3 = len(cc.decisions(n3, user))
    scenario(
        cc,
        "6. multi-hop node1 -> node2 -> node3 (node2's decision)",
        n1,
        n2,
        user,
        job="45",
        cmd=hop,
    )
    say("   node3's decision:")
    show_record(cc.next_decision(n3, user, before3))
    scenario(
        cc,
        "7. keyboard-interactive (password via sshpass): the sshd monitor is adopted",
        n1,
        n2,
        user,
        job="43",
        login=n1.ssh_password,
    )
    cc.cluster.stop_agent(n1)
    try:
        scenario(
            cc,
            "8. node1's agent is down: refused at once, 'newest' decides",
            n1,
            n2,
            user,
            job="42",
        )
    finally:
        cc.cluster.start_agent(n1)
    say()
    say(f"{BOLD}-- 9. root: allowed by the agent without any lookup{RESET}")
    before = len(cc.decisions(n2, "root"))
    cc.pam_request(n2, "root")
    show_record(cc.next_decision(n2, "root", before))
    say()
    say("An admin audits with e.g.: journalctl -o json CALLERID_DECISION=deny")
    deny = cc.jd.read(CALLERID_DECISION="deny")
    say(f"   {len(deny)} deny record(s) in this demo's journal")


def main() -> int:
    if os.geteuid() != 0:
        say("make demo needs root: it creates network namespaces, cgroups, users and sshd's.")
        return 1
    for tool in ("sshd", "ssh", "sshpass", "ip", "nsenter"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            say(f"make demo needs {tool}: run `make deps` (apt-get) first")
            return 1
    say(f"{BOLD}callerid demo: a 3-node virtual cluster on this machine{RESET}")
    with CalleridCluster(3) as cc:
        play(cc)
        say()
        say("tearing down ...")
    left = cc.cluster.leftovers()
    say("done; nothing left behind." if not left else f"left behind: {left}")
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
