"""What one login says: its PAM reply and its journal record (`login.LoginFlow`).

`decided` for a decision, `failed` for verdict=error; both apply audit mode (a login that
enforce mode would deny, or fail, is let through: reply allow, reason audit, and the record
says what enforce would have done). Pure: the clock's reading comes in as ``now``.
"""

from __future__ import annotations

import dataclasses

from callerid.agent import policy
from callerid.agent._loginstate import Login, Outcome
from callerid.agent.backends.base import JobNamespaces
from callerid.agent.config import Mode
from callerid.agent.journal import DecisionRecord
from callerid.agent.pamproto import PamReply

__all__ = ["decided", "failed"]


def decided(
    login: Login, d: policy.Decision, ns: JobNamespaces | None, *, node: str, mode: Mode, now: float
) -> Outcome:
    """The reply and record of a decided login (``ns``: the namespaces sent with it)."""
    job = d.job.id if d.job else None
    uid = login.facts.uid
    who = f"{login.req.user} (uid {uid})" if uid is not None else login.req.user
    where = f" from {login.conn.remote}" if login.conn else ""
    what = {"adopt": f"adopted into job {job}", "allow": "allowed", "deny": "denied"}[d.verdict]
    waited = f", after waiting {login.waited_ms} ms for job {login.facts.callerid_job}"
    kinds = ns.kinds if ns is not None else ()
    joins = f", entering its namespaces {','.join(kinds)}" if kinds else ""
    text = f"{who}{where} {what}{joins} ({d.reason}{waited if login.waited_ms else ''})"
    gid = d.job.gid if d.job else None
    outcome = Outcome(
        PamReply(d.verdict, d.reason, job, d.user_message, gid=gid, ns=kinds),
        _record(login, d.verdict, d.reason, job, text, node=node, now=now),
        ns,
    )
    return _audited(outcome, f"{who}{where}", mode)


def failed(login: Login, reason: str, text: str, *, node: str, mode: Mode, now: float) -> Outcome:
    """verdict=error: the PAM module's on_error= decides (default deny)."""
    message = f"{login.req.user}: {text} ({reason})"
    record = _record(login, "error", reason, None, message, node=node, now=now)
    return _audited(Outcome(PamReply("error", reason), record), login.req.user, mode)


def _audited(outcome: Outcome, who: str, mode: Mode) -> Outcome:
    rec = outcome.record
    if mode != "audit" or rec.decision not in ("deny", "error"):
        return outcome
    would = "denied" if rec.decision == "deny" else "refused (error)"
    message = f"{who} would be {would} ({rec.reason}); allowed: audit mode"
    record = dataclasses.replace(
        rec, decision="allow", reason="audit", message=message,
        would_decision=rec.decision, would_reason=rec.reason,
    )  # fmt: skip
    return Outcome(PamReply("allow", "audit"), record)


def _record(
    login: Login,
    decision: str,
    reason: str,
    job: str | None,
    message: str,
    *,
    node: str,
    now: float,
) -> DecisionRecord:
    conn = login.conn
    return DecisionRecord(
        decision=decision,
        reason=reason,
        user=login.req.user,
        uid=login.facts.uid,
        pid=login.target_pid if login.target_pid is not None else login.caller_pid,
        job=job,
        src=str(conn.remote) if conn else None,
        dst=str(conn.local) if conn else None,
        peer_status=login.peer_status or None,
        latency_us=int((now - login.started) * 1e6),
        message=message,
        service=login.req.service or None,
        node=node,
        waited_ms=login.waited_ms,
    )
