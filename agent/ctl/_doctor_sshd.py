"""`calleridctl doctor`: the effective sshd configuration, as `sshd -T` prints it.

What matters to callerid, from OpenSSH's own code (auth2.c `userauth_finish`, auth-pam.c):
- `UsePAM yes`, or sshd never runs the PAM account stack and nobody asks the agent;
- with UsePAM, sshd runs the account stack once the login is authenticated, whatever the
  method (publickey, password, hostbased, GSSAPI, keyboard-interactive): no method skips it.
  Under `AuthenticationMethods` lists it runs once the whole list has succeeded, except for
  PAM keyboard-interactive, whose helper runs it right after its own step;
- PAM keyboard-interactive (`KbdInteractiveAuthentication yes`, the older name
  `ChallengeResponseAuthentication`) runs pam_authenticate and the account stack in a child
  forked from the monitor (`sshd: USER [pam]`); the monitor keeps the connection, and that is
  the process callerid adopts.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

__all__ = ["parse_sshd_t", "run_sshd_t", "sshd_checks"]

Check = tuple[str, str, str]  # (level, what, advice)
SSHD_T_TIMEOUT_S = 10.0
KBDINT = "keyboard-interactive"


def run_sshd_t(sshd: Path, config: Path | None) -> tuple[str | None, str]:
    """(stdout of `sshd -T [-f config]`, "") or (None, why it failed)."""
    argv = [str(sshd), "-T", *(["-f", str(config)] if config else [])]
    try:
        r = subprocess.run(
            argv, capture_output=True, text=True, timeout=SSHD_T_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        return None, f"{sshd} is not installed"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{' '.join(argv)}: {exc}"
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        return None, f"{' '.join(argv)} failed: {lines[-1] if lines else f'exit {r.returncode}'}"
    return r.stdout, ""


def parse_sshd_t(text: str) -> dict[str, str]:
    """`sshd -T` lines `keyword value...` -> {keyword: value} (first one of a repeated key)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            out.setdefault(key.lower(), value.strip())
    return out


def _failed_advice(why: str) -> str:
    if "hostkey" in why.replace(" ", "").lower() or "host key" in why.lower():
        return "sshd -T loads the host keys: run doctor as root, or create them: ssh-keygen -A"
    if "not installed" in why:
        return "install openssh-server, or name the binary with --sshd"
    return "see what `sshd -t` says about the configuration"


def sshd_checks(sshd: Path, config: Path | None) -> Iterator[Check]:
    text, why = run_sshd_t(sshd, config)
    if text is None:
        yield "warn", f"cannot read sshd's effective config: {why}", _failed_advice(why)
        return
    yield from settings_checks(parse_sshd_t(text))


def settings_checks(opts: dict[str, str]) -> Iterator[Check]:
    """UsePAM, keyboard-interactive and AuthenticationMethods, from `sshd -T` settings."""
    if opts.get("usepam") != "yes":
        yield (
            "FAIL",
            f"sshd: UsePAM {opts.get('usepam', '(not shown)')}: sshd runs no PAM account "
            f"stack, so callerid is never asked and no login is adopted",
            "set 'UsePAM yes' in sshd_config (before any Match block) and reload sshd",
        )
        return
    yield "ok", "sshd: UsePAM yes (every login runs the PAM account stack)", ""
    kbd = opts.get("kbdinteractiveauthentication", opts.get("challengeresponseauthentication"))
    if kbd == "yes":
        yield (
            "ok",
            "sshd: KbdInteractiveAuthentication yes: PAM keyboard-interactive logins (MFA) "
            "run the account stack in a helper forked from sshd's monitor; callerid adopts "
            "the monitor, which holds the connection and outlives the helper",
            "",
        )
    else:
        yield "ok", "sshd: KbdInteractiveAuthentication no: the monitor runs the account stack", ""
    methods = opts.get("authenticationmethods", "any")
    if methods == "any":
        yield (
            "ok",
            "sshd: AuthenticationMethods any: one method logs in, then the account stack",
            "",
        )
        return
    lists = [m.split(",") for m in methods.split()]
    early = [",".join(m) for m in lists if any(x.startswith(KBDINT) for x in m[:-1])]
    note = (
        f"; in {' '.join(early)} the keyboard-interactive helper runs it (and the adoption) "
        "after its own step, before the methods that follow"
        if early
        else ""
    )
    yield (
        "ok",
        f"sshd: AuthenticationMethods {methods}: no method skips the account stack, it runs "
        f"once a list has succeeded{note}",
        "",
    )
