"""The scale benchmark's results: what the agents' logs and memory say, its printout, its row.

`summarize` reads the waves' replies (bench/_standin_sshd.py), the agents' decision records
and the memory of every forked agent; `report` prints it; `rows` is its line of the
`make bench` table.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from bench._common import Row, median, met, pct, reproduce, rss_mb
from bench._scale_fleet import Fleet

TARGET_RSS_MB = 60.0


def summarize(fleet: Fleet, got: dict[str, Any]) -> dict[str, Any]:
    res: dict[str, Any] = {"agents": len(fleet.pids)}
    for w, label in enumerate(("cold", "warm")):
        go = got["gos"][w]["go"]
        done = [(r[w]["at"] - go) * 1000 for r in got["results"]]
        replies = [r[w]["reply"] for r in got["results"]]
        good = sum(
            1
            for x in replies
            if (x.get("verdict"), x.get("reason"), x.get("job")) == ("adopt", "callerid", "42")
        )
        res[label] = {
            "answered": len(done),
            "callerid": good,
            "p50": median(done),
            "p99": pct(done, 99),
            "max": max(done, default=float("nan")),
            "reasons": dict(Counter(x.get("reason", "?") for x in replies)),
        }
    lat: list[list[float]] = [[], []]
    status: list[Counter[str]] = [Counter(), Counter()]
    for name in fleet.names()[: len(fleet.pids)]:
        text = (fleet.top / "log" / f"{name}.log").read_text()
        for w, m in enumerate(re.findall(r"CALLERID_LATENCY_US=(\d+)", text)[:2]):
            lat[w].append(int(m) / 1000)
        for w, m in enumerate(re.findall(r"CALLERID_PEER_STATUS=(\w+)", text)[:2]):
            status[w][m] += 1
    for w, label in enumerate(("cold", "warm")):
        res[label].update(
            agent_p50=median(lat[w]), agent_p99=pct(lat[w], 99), peer_status=dict(status[w])
        )
    mem = [rss_mb(p) for p in fleet.forked()]
    res["mem"] = {
        "rss_median": median([m[0] for m in mem]),
        "rss_max": max((m[0] for m in mem), default=0.0),
        "pss_median": median([m[1] for m in mem]),
        "uss_median": median([m[2] for m in mem]),
        "pss_total_mb": sum(m[1] for m in mem),
    }
    assert fleet.source is not None
    res["source_mem"] = rss_mb(fleet.source.pid)
    return res


def report(res: dict[str, Any]) -> None:
    n, m, sm, lm = res["agents"], res["mem"], res["source_mem"], res["source_mem_light"]
    print(
        f"scale: {n} destination agents (of {res['wanted']} wanted) query one source at once"
        f" (started in {res['startup_s']:.0f} s)"
    )
    for label in ("cold", "warm"):
        w = res[label]
        print(
            f"  {label} logins: {w['callerid']}/{w['answered']} callerid; answered after p50 "
            f"{w['p50']:.0f} / p99 {w['p99']:.0f} / max {w['max']:.0f} ms from the start; "
            f"in agent p50 {w['agent_p50']:.1f} / p99 {w['agent_p99']:.1f} ms; peer status "
            f"{w['peer_status']}; replies {w['reasons']}"
        )
    for label in ("cold", "warm"):
        w = res["light"][label]
        print(
            f"  {label} queries from {n} client-only MeshClients: round trip p50 {w['p50']:.1f}"
            f" / p99 {w['p99']:.1f} / max {w['max']:.1f} ms; found {w['found']}; {w['status']}; "
            f"SYNs dropped by full accept queues meanwhile: {w['listen_drops']}; source CPU "
            f"{w['source_cpu_ms']:.2f} ms per query"
        )
    print(
        f"  memory per destination agent: RSS {m['rss_median']:.1f} MB (max {m['rss_max']:.1f}),"
        f" PSS {m['pss_median']:.1f}, USS {m['uss_median']:.1f}; all agents' PSS "
        f"{m['pss_total_mb'] / 1024:.2f} GB"
    )
    print(
        f"  source agent RSS/PSS/USS: {sm[0]:.1f}/{sm[1]:.1f}/{sm[2]:.1f} MB with {n} peer "
        f"agents; {lm[0]:.1f}/{lm[1]:.1f}/{lm[2]:.1f} MB with {n} more client-only peers"
    )


def rows(results: list[dict[str, Any]]) -> list[Row]:
    out = []
    for res in results:
        n, w, m, light = res["agents"], res["warm"], res["mem"], res["light"]["warm"]
        fit = "" if n == res["wanted"] else f" (only {n} of {res['wanted']} fit in memory)"
        src_rss = res["source_mem"][0]  # with the N peer agents connected
        both_rss = res["source_mem_light"][0]  # with N more client-only peers as well
        ours = (
            f"source answers {n} at once: p99 {light['p99']:.0f} ms; logins all done p99 "
            f"{w['p99']:.0f} ms, {w['callerid']}/{n} callerid; RSS/agent "
            f"{m['rss_median']:.0f} MB (USS {m['uss_median']:.0f}), source {src_rss:.0f} MB "
            f"with {n} peers connected ({both_rss:.0f} MB with {2 * n})"
        )
        out.append(
            Row(
                row="6",
                what=f"scale: {n} agents query one source at once{fit}",
                n=f"{n} x 2 waves",
                ours=ours,
                reference="-",
                ratio="-",
                target=f"RSS <= {TARGET_RSS_MB:.0f} MB",
                met=f"agents {met(m['rss_max'] <= TARGET_RSS_MB)}, "
                f"source {met(src_rss <= TARGET_RSS_MB)}",
                reproduce=reproduce("scale", ["--agents", str(res["wanted"])]),
                notes=[
                    f"cold logins p99 {res['cold']['p99']:.0f} ms, "
                    f"peer {res['cold']['peer_status']}",
                    f"warm logins peer {w['peer_status']}, in-agent p99 {w['agent_p99']:.0f} ms",
                    f"client-only cold p99 {res['light']['cold']['p99']:.0f} ms",
                ],
            )
        )
    return out
