"""`calleridctl doctor`: sshd's PAM stacks, read as PAM reads them (includes and substacks).

Two traps: the account line must come after the system's account stack (pam_nologin,
pam_unix, ...), and pam_systemd in the session stack moves the adopted session out of its
job. Pure reading of files under one PAM directory; nothing is changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PamLine", "account_checks", "read_stack", "session_checks"]

Check = tuple[str, str, str]  # (level, what, advice)
MAX_DEPTH = 8  # include nesting we follow (a loop stops here)
HARMLESS_AFTER = {"pam_permit.so"}  # an account module that may follow ours
SHARED_STACKS = "common-account, system-auth, password-auth"


@dataclass(frozen=True)
class PamLine:
    """One module line of a stack, with the chain of files that led to it."""

    kind: str  # account, auth, password, session
    control: str  # required, requisite, sufficient, optional or [value=action ...]
    module: str  # pam_x.so or a path
    via: tuple[str, ...]  # file names, the service file first
    lineno: int

    @property
    def name(self) -> str:
        return Path(self.module).name

    def where(self) -> str:
        return f"{' -> '.join(self.via)} line {self.lineno}"


def _logical_lines(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, tokens): comments cut, backslash continuations joined, [..] kept whole."""
    pending, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0]
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        tokens: list[str] = []
        for word in line.split():
            if tokens and tokens[-1].startswith("[") and not tokens[-1].endswith("]"):
                tokens[-1] += " " + word
            else:
                tokens.append(word)
        if tokens:
            yield start, tokens


def read_stack(
    path: Path, kind: str, *, via: tuple[str, ...] = (), depth: int = 0
) -> list[PamLine]:
    """The module lines of type ``kind`` that PAM runs for the service file ``path``, in order.

    ``@include F`` (every type of F), ``kind include F`` and ``kind substack F`` are followed;
    relative names are in ``path``'s directory. A file that cannot be read adds nothing."""
    here = (*via, path.name)
    try:
        text = path.read_text()
    except OSError:
        return []
    out: list[PamLine] = []
    for lineno, tokens in _logical_lines(text):
        if tokens[0] == "@include" and len(tokens) > 1:
            if depth < MAX_DEPTH:
                out += read_stack(path.parent / tokens[1], kind, via=here, depth=depth + 1)
            continue
        if len(tokens) < 3 or tokens[0].lstrip("-") != kind:
            continue
        control, module = tokens[1], tokens[2]
        if control in ("include", "substack"):
            if depth < MAX_DEPTH:
                out += read_stack(path.parent / module, kind, via=here, depth=depth + 1)
            continue
        out.append(PamLine(kind, control, module, here, lineno))
    return out


def account_checks(pam_file: Path) -> Iterator[Check]:
    """Our account line: present, in the service file, `required`, after the system stack."""
    if not pam_file.is_file():
        yield "warn", f"cannot read {pam_file}", "give sshd's PAM file with --pam-file"
        return
    stack = read_stack(pam_file, "account")
    ours = [ln for ln in stack if ln.name == "pam_callerid.so"]
    if not ours:
        yield (
            "warn",
            f"{pam_file}: no 'account ... pam_callerid.so' line (callerid decides no login here)",
            f"on a compute node add 'account required pam_callerid.so' after the system "
            f"account stack in {pam_file} (login nodes need no line)",
        )
        return
    line = ours[-1]
    shared = [ln for ln in ours if len(ln.via) > 1]
    if shared:
        yield (
            "FAIL",
            f"pam_callerid.so is in a file other services include ({shared[0].where()})",
            f"every service using it denies users without a job (console, su, cron): remove it "
            f"there ({SHARED_STACKS} are shared) and put it in {pam_file} only",
        )
    after = [ln for ln in stack[stack.index(line) + 1 :] if ln.name not in HARMLESS_AFTER]
    after = [ln for ln in after if ln.name != "pam_callerid.so"]
    if after:
        names = ", ".join(f"{ln.name} ({ln.where()})" for ln in after[:3])
        yield (
            "FAIL",
            f"pam_callerid.so ({line.where()}) runs before other account modules: {names}",
            "move 'account required pam_callerid.so' below '@include common-account' (RHEL: "
            "'account include password-auth'): the system checks (nologin, expired or locked "
            "accounts) must refuse a login before it is adopted into a job, and a job's "
            "module belongs last in the account stack (pam_slurm_adopt's documentation "
            "says the same)",
        )
    else:
        yield "ok", f"pam_callerid.so is the last account module ({line.where()})", ""
    if line.control in ("required", "requisite"):
        return
    if line.control in ("sufficient", "optional"):
        yield (
            "FAIL",
            f"pam_callerid.so is '{line.control}' ({line.where()}): its denial is ignored",
            "use 'account required pam_callerid.so'",
        )
    else:
        yield (
            "warn",
            f"pam_callerid.so has the control {line.control} ({line.where()})",
            "make sure a denial fails the stack, or use 'required'",
        )


def session_checks(pam_file: Path) -> Iterator[Check]:
    """pam_systemd in sshd's session stack, and our session line after it if it stays."""
    stack = read_stack(pam_file, "session")
    systemd = [i for i, ln in enumerate(stack) if ln.name == "pam_systemd.so"]
    if not systemd:
        if pam_file.is_file():
            yield "ok", f"no pam_systemd.so in the session stack of {pam_file}", ""
        return
    where = stack[systemd[-1]].where()
    readopt = [ln for ln in stack[systemd[-1] + 1 :] if ln.name == "pam_callerid.so"]
    if readopt:
        yield (
            "warn",
            f"pam_systemd.so in sshd's session stack ({where}); pam_callerid.so after it "
            f"({readopt[0].where()}) puts the session back into its job",
            "recommended on compute nodes: take pam_systemd out of sshd's session stack "
            "(logind still moves the session first, and a user slice outlives the job)",
        )
        return
    yield (
        "FAIL",
        f"pam_systemd.so in sshd's session stack ({where}): logind moves every session into "
        f"a session-N.scope of the user's slice, out of the job it was adopted into",
        f"remove pam_systemd from sshd's session stack (copy the included session lines into "
        f"{pam_file} without it), or add 'session optional pam_callerid.so' at its end",
    )
