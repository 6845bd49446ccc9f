"""`calleridctl doctor`: each check on real files, the real `sshd -T`, and one whole run.

PAM stacks are real files in tmp dirs (read with includes and substacks as PAM reads them);
sshd's effective config comes from the installed `/usr/sbin/sshd -T -f <tmp config>` with a
tmp host key; mountinfo is this machine's own and synthetic text; the whole run is
`python -m callerid.agent.ctl doctor` against two real loopback agents.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from callerid.agent.ctl._doctor import key_mode_checks
from callerid.agent.ctl._doctor_kernel import (
    cgroup_migration_checks,
    kernel_version,
    parse_mountinfo,
)
from callerid.agent.ctl._doctor_pam import account_checks, read_stack, session_checks
from callerid.agent.ctl._doctor_sshd import parse_sshd_t, sshd_checks
from tests.support.agents import LoopbackAgents
from tests.support.cgroups import JobTree, require_cgroups

SSHD = Path("/usr/sbin/sshd")
Check = tuple[str, str, str]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks expect root")


def levels(checks: Iterator[Check]) -> list[tuple[str, str]]:
    return [(level, what) for level, what, _ in checks]


def only(checks: Iterator[Check]) -> Check:
    out = list(checks)
    assert len(out) == 1, out
    return out[0]


def pam_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path / "sshd"


DEBIAN_ACCOUNT = (
    "account [success=1 new_authtok_reqd=done default=ignore] pam_unix.so\n"
    "account requisite pam_deny.so\n"
    "account required pam_permit.so\n"
)

# ---------------------------------------------------------------------------- PAM: account


def test_account_line_after_the_debian_stack_is_ok(tmp_path: Path) -> None:
    sshd = pam_dir(
        tmp_path,
        {
            "sshd": "account required pam_nologin.so\n@include common-account\n"
            "account    required     pam_callerid.so   # ours\n",
            "common-account": DEBIAN_ACCOUNT,
        },
    )
    assert levels(account_checks(sshd)) == [
        ("ok", "pam_callerid.so is the last account module (sshd line 3)")
    ]


def test_account_line_before_the_system_stack_fails(tmp_path: Path) -> None:
    sshd = pam_dir(
        tmp_path,
        {
            "sshd": "account required pam_callerid.so\n@include common-account\n",
            "common-account": DEBIAN_ACCOUNT,
        },
    )
    level, what, advice = only(account_checks(sshd))
    assert level == "FAIL"
    assert "pam_unix.so (sshd -> common-account line 1)" in what
    assert "pam_deny.so" in what and "pam_permit.so" not in what  # pam_permit is harmless
    assert "below '@include common-account'" in advice and "pam_slurm_adopt" in advice


def test_rhel_include_and_substack_are_followed(tmp_path: Path) -> None:
    sshd = pam_dir(
        tmp_path,
        {
            "sshd": "account required pam_callerid.so\naccount include password-auth\n"
            "session substack password-auth\n",
            "password-auth": "account required pam_unix.so\n"
            "-session optional pam_systemd.so\nsession required pam_unix.so\n",
        },
    )
    assert [ln.name for ln in read_stack(sshd, "account")] == ["pam_callerid.so", "pam_unix.so"]
    assert only(account_checks(sshd))[0] == "FAIL"
    level, what, _ = only(session_checks(sshd))
    assert level == "FAIL" and "sshd -> password-auth line 2" in what


@pytest.mark.parametrize(
    ("control", "level"),
    [
        ("required", None),
        ("requisite", None),
        ("sufficient", "FAIL"),
        ("optional", "FAIL"),
        ("[success=ok default=bad]", "warn"),
    ],
)
def test_account_control(tmp_path: Path, control: str, level: str | None) -> None:
    sshd = pam_dir(
        tmp_path, {"sshd": f"@include common-account\naccount {control} pam_callerid.so\n"}
    )
    (tmp_path / "common-account").write_text(DEBIAN_ACCOUNT)
    got = levels(account_checks(sshd))
    assert got[0][0] == "ok"
    assert [lv for lv, _ in got[1:]] == ([level] if level else [])


def test_account_line_in_a_shared_stack_fails(tmp_path: Path) -> None:
    sshd = pam_dir(
        tmp_path,
        {
            "sshd": "@include common-account\n",
            "common-account": DEBIAN_ACCOUNT + "account required pam_callerid.so\n",
        },
    )
    got = levels(account_checks(sshd))
    assert got[0][0] == "FAIL" and "other services include" in got[0][1]


def test_no_account_line_and_no_file_warn(tmp_path: Path) -> None:
    sshd = pam_dir(tmp_path, {"sshd": "@include common-account\n", "common-account": ""})
    assert only(account_checks(sshd))[0] == "warn"
    assert only(account_checks(tmp_path / "missing"))[0] == "warn"


def test_pam_syntax_comments_continuations_and_loops(tmp_path: Path) -> None:
    sshd = pam_dir(
        tmp_path,
        {
            "sshd": "# account required pam_deny.so\n@include loop\naccount \\\n"
            "  required pam_callerid.so\n",
            "loop": "@include loop\naccount required pam_unix.so # pam_callerid.so\n",
        },
    )
    names = [ln.name for ln in read_stack(sshd, "account")]
    assert names[-1] == "pam_callerid.so" and set(names[:-1]) == {"pam_unix.so"}
    assert levels(account_checks(sshd))[0] == (
        "ok",
        "pam_callerid.so is the last account module (sshd line 3)",
    )


# ---------------------------------------------------------------------------- PAM: session


def test_pam_systemd_in_an_included_session_stack_fails(tmp_path: Path) -> None:
    sshd = pam_dir(
        tmp_path,
        {
            "sshd": "@include common-session\n",
            "common-session": "session required pam_unix.so\nsession optional pam_systemd.so\n",
        },
    )
    level, what, advice = only(session_checks(sshd))
    assert level == "FAIL" and "(sshd -> common-session line 2)" in what
    assert "session optional pam_callerid.so" in advice


def test_pam_systemd_followed_by_our_session_line_warns(tmp_path: Path) -> None:
    sshd = pam_dir(
        tmp_path,
        {
            "sshd": "@include common-session\nsession optional pam_callerid.so\n",
            "common-session": "session optional pam_systemd.so\n",
        },
    )
    assert only(session_checks(sshd))[0] == "warn"


def test_no_pam_systemd_is_ok(tmp_path: Path) -> None:
    sshd = pam_dir(
        tmp_path,
        {
            "sshd": "@include common-session\nsession optional pam_systemd_home.so\n"
            "account required pam_systemd.so\n",  # not the session stack
            "common-session": "session required pam_unix.so\n",
        },
    )
    assert only(session_checks(sshd))[0] == "ok"


# ---------------------------------------------------------------------------- sshd -T


@pytest.fixture
def sshd_config(tmp_path: Path) -> Iterator[Path]:
    if not SSHD.exists():
        pytest.skip("sshd is not installed")
    key = tmp_path / "host_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
    )
    cfg = tmp_path / "sshd_config"
    cfg.write_text(f"HostKey {key}\n")
    yield cfg


def sshd_with(cfg: Path, lines: str) -> list[tuple[str, str]]:
    cfg.write_text(cfg.read_text().splitlines()[0] + "\n" + lines)
    return levels(sshd_checks(SSHD, cfg))


def test_sshd_usepam_no_fails(sshd_config: Path) -> None:
    got = sshd_with(sshd_config, "UsePAM no\n")
    assert got[0][0] == "FAIL" and "UsePAM no" in got[0][1] and len(got) == 1


def test_sshd_usepam_yes_plain(sshd_config: Path) -> None:
    got = sshd_with(sshd_config, "UsePAM yes\nKbdInteractiveAuthentication no\n")
    assert [lv for lv, _ in got] == ["ok", "ok", "ok"]
    assert "UsePAM yes" in got[0][1] and "KbdInteractiveAuthentication no" in got[1][1]
    assert "AuthenticationMethods any" in got[2][1]


@pytest.mark.parametrize(
    "kbd", ["KbdInteractiveAuthentication yes", "ChallengeResponseAuthentication yes"]
)
def test_sshd_keyboard_interactive_and_methods(sshd_config: Path, kbd: str) -> None:
    got = sshd_with(
        sshd_config,
        f"UsePAM yes\n{kbd}\n"
        "AuthenticationMethods keyboard-interactive,publickey publickey,password\n",
    )
    assert [lv for lv, _ in got] == ["ok", "ok", "ok"]
    assert "forked" in got[1][1] and "adopts the monitor" in got[1][1]
    assert "no method skips the account stack" in got[2][1]
    assert "in keyboard-interactive,publickey the keyboard-interactive helper" in got[2][1]


def test_sshd_without_host_keys_warns(sshd_config: Path, tmp_path: Path) -> None:
    sshd_config.write_text(f"HostKey {tmp_path / 'none'}\n")
    level, what, advice = only(sshd_checks(SSHD, sshd_config))
    assert level == "warn" and "no hostkeys available" in what
    assert "ssh-keygen -A" in advice


def test_sshd_not_installed_warns(tmp_path: Path) -> None:
    level, what, advice = only(sshd_checks(tmp_path / "sshd", None))
    assert level == "warn" and "not installed" in what and "--sshd" in advice


def test_parse_sshd_t() -> None:
    opts = parse_sshd_t("usepam yes\nhostkey /a\nhostkey /b\nAuthenticationMethods any\n\n")
    assert opts == {"usepam": "yes", "hostkey": "/a", "authenticationmethods": "any"}


# ---------------------------------------------------------------------------- keys


@needs_root
def test_key_modes(tmp_path: Path) -> None:
    keys, authorized = tmp_path / "keys", tmp_path / "keys" / "authorized"
    authorized.mkdir(parents=True)
    keys.chmod(0o700)
    authorized.chmod(0o755)
    secret = keys / "n.key_secret"
    secret.write_text("x")
    secret.chmod(0o600)
    (authorized / "n.key").write_text("x")
    (authorized / "n.key").chmod(0o644)
    assert [lv for lv, _ in levels(key_mode_checks(secret, keys, authorized))] == ["ok", "ok"]
    secret.chmod(0o640)
    (authorized / "n.key").chmod(0o664)
    authorized.chmod(0o777)
    got = list(key_mode_checks(secret, keys, authorized))
    assert [c[0] for c in got] == ["FAIL", "FAIL"]
    assert "mode 640" in got[0][1] and "chmod 600" in got[0][2]
    assert f"{authorized} (777" in got[1][1] and "n.key (664" in got[1][1]
    os.chown(secret, 1, -1)
    secret.chmod(0o600)
    assert "owner uid 1" in next(key_mode_checks(secret, keys, authorized))[1]


# ---------------------------------------------------------------------------- kernel

V2 = (
    "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n"
)
V1 = "40 31 0:37 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n"
OTHER = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
FEATURES = "nsdelegate\nfavordynmods\nmemory_localevents\n"


def test_parse_mountinfo_synthetic() -> None:
    text = OTHER + V2 + "garbage line\n" + r"7 1 0:5 / /mnt/a\040b rw - cgroup2 none rw" + "\n"
    mounts = parse_mountinfo(text)
    assert [m.point for m in mounts] == ["/", "/sys/fs/cgroup", "/mnt/a b"]
    v2 = mounts[1]
    assert v2.fstype == "cgroup2" and v2.super_options == (
        "rw",
        "nsdelegate",
        "memory_recursiveprot",
    )
    assert {"nosuid", "nsdelegate"} <= v2.options


def test_parse_mountinfo_real() -> None:
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    assert "/" in [m.point for m in mounts]
    assert all(m.fstype and m.point.startswith("/") for m in mounts)


def test_kernel_version() -> None:
    assert kernel_version("6.18.44-fc-v595") == (6, 18)
    assert kernel_version("5.14.0-427.el9.x86_64") == (5, 14)
    assert kernel_version("weird") is None


def test_v2_without_favordynmods_warns_with_the_exact_remount() -> None:
    level, what, advice = only(cgroup_migration_checks(OTHER + V2, "6.1.0-18-amd64", FEATURES))
    assert level == "warn" and "~14 ms" in what and "0.25 ms" in what
    assert "mount -o remount,nsdelegate,memory_recursiveprot,favordynmods /sys/fs/cgroup" in advice
    assert "cgroup_favordynmods=true" in advice


def test_favordynmods_mounted_is_ok() -> None:
    text = V2.replace("memory_recursiveprot", "favordynmods,memory_recursiveprot")
    level, what, _ = only(cgroup_migration_checks(text, "6.1.0", FEATURES))
    assert level == "ok" and "/sys/fs/cgroup is mounted favordynmods" in what
    assert (
        only(
            cgroup_migration_checks(
                V1.replace("freezer\n", "freezer,favordynmods\n"), "6.8", FEATURES
            )
        )[0]
        == "ok"
    )


def test_v1_only_needs_the_kernel_command_line() -> None:
    level, _, advice = only(cgroup_migration_checks(V1, "6.8.0", FEATURES))
    assert level == "warn" and "remount" in advice and "cgroup_favordynmods=true" in advice
    assert "mount -o" not in advice


@pytest.mark.parametrize(
    ("release", "features", "level"),
    [
        ("5.10.0-28-amd64", "nsdelegate\nmemory_localevents\n", "ok"),  # cheap by itself
        ("5.15.0", None, "ok"),
        ("6.1.0", None, "warn"),
        ("5.14.0-427.el9.x86_64", FEATURES, "warn"),  # the RHEL 9 backport
    ],
)
def test_kernel_support(release: str, features: str | None, level: str) -> None:
    assert only(cgroup_migration_checks(V2, release, features))[0] == level


def test_no_cgroup_mount_warns() -> None:
    assert only(cgroup_migration_checks(OTHER, "6.1.0", FEATURES))[0] == "warn"


def test_this_machine() -> None:
    try:
        features: str | None = Path("/sys/kernel/cgroup/features").read_text()
    except OSError:
        features = None
    got = list(
        cgroup_migration_checks(
            Path("/proc/self/mountinfo").read_text(), os.uname().release, features
        )
    )
    assert len(got) == 1 and got[0][0] in ("ok", "warn")


# ---------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def agents() -> Iterator[LoopbackAgents]:
    require_cgroups("v2")
    with JobTree("v2") as a, JobTree("v2") as b, LoopbackAgents({"a": a, "b": b}) as ag:
        yield ag


def doctor(agents: LoopbackAgents, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "callerid.agent.ctl", "--config", str(agents.config("b"))]
    return subprocess.run([*argv, "doctor", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.root
def test_doctor_run_against_real_agents(
    agents: LoopbackAgents, sshd_config: Path, tmp_path: Path
) -> None:
    agents.write_config("b")
    sshd_config.write_text(sshd_config.read_text() + "UsePAM yes\n")
    sshd = pam_dir(
        tmp_path,
        {
            "sshd": "account required pam_nologin.so\n@include common-account\n"
            "account required pam_callerid.so\n@include common-session\n",
            "common-account": DEBIAN_ACCOUNT,
            "common-session": "session required pam_unix.so\n",
        },
    )
    opts = ["--ping", "--pam-file", str(sshd), "--sshd-config", str(sshd_config)]
    r = doctor(agents, *opts)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    for line in (
        "ok    config: node b",
        "ok    keypair",
        "ok    2 authorized peer key(s)",
        "ok    cgroup backend readable",
        "ok    agent answers on",
        "ok    sshd: UsePAM yes",
        "ok    sshd: KbdInteractiveAuthentication",
        "ok    pam_callerid.so is the last account module (sshd line 3)",
        "ok    no pam_systemd.so in the session stack",
        "ok    ping a at 127.0.0.2: ok",
    ):
        assert line in out, (line, out)
    assert "favordynmods" in out  # the kernel line, ok or warn
    assert "FAIL" not in out
    # one line per check, each not-ok line followed by its fix
    lines = out.splitlines()
    for i, line in enumerate(lines):
        assert line[:6] in ("ok    ", "warn  ", "FAIL  ", "      ")
        if line.startswith(("warn", "FAIL")):
            assert lines[i + 1].startswith("      -> ")

    (tmp_path / "sshd").write_text(
        "account required pam_callerid.so\n@include common-account\n@include common-session\n"
    )
    (tmp_path / "common-session").write_text("session optional pam_systemd.so\n")
    (tmp_path / "nopam").write_text(sshd_config.read_text().replace("UsePAM yes", "UsePAM no"))
    r = doctor(agents, "--pam-file", str(sshd), "--sshd-config", str(tmp_path / "nopam"))
    assert r.returncode == 1
    fails = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL")]
    assert len(fails) == 3, r.stdout
    assert "UsePAM no" in fails[0]
    assert "runs before other account modules" in fails[1]
    assert "pam_systemd.so in sshd's session stack" in fails[2]

    r = doctor(agents, "--pam-file", str(sshd), "--sshd", str(tmp_path / "no-sshd"))
    assert (
        f"warn  cannot read sshd's effective config: {tmp_path}/no-sshd is not installed"
        in r.stdout
    )
