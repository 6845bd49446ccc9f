"""This machine's plain-sshd login time: the yardstick printed beside the login storm.

    plain_logins(n) -> [ms, ...]     (bench/storm.py calls it before its storm starts)

One real OpenSSH sshd on 127.0.0.3 (bench/_sshbench.py's `SshdFarm`, target "plain": Debian's
sshd PAM stack, no callerid, no pam_slurm_adopt), a throwaway user with an ssh key, and
``n`` timed `ssh -p PORT 127.0.0.3 true` logins run as that user (wall time around each ssh
process), after one warm-up login that is not counted. No syslog sink: sshd logs to a file
(-E) and PAM's syslog(3) lines are dropped when there is no /dev/log. Everything (the user
and its home, the sshd, its PAM service file, the temp dir) is removed again, also on failure.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench._sshbench import SSHD_HOST, SshdFarm, user_keys
from tests.support.users import ThrowawayUser, throwaway_user

WARMUP = 1


def plain_logins(n: int) -> list[float]:
    """Wall time (ms) of ``n`` plain-sshd logins; [] when ``n`` <= 0."""
    if n <= 0:
        return []
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="cidstorm-plain-", dir="/tmp"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        user = stack.enter_context(throwaway_user(home=True, shell="/bin/bash", locked=False))
        farm = SshdFarm(work, f"cidb{secrets.token_hex(2)}", [])
        stack.callback(farm.close)
        port = farm.add("plain", None)
        argv = ["ssh", *user_keys(user, farm), "-p", str(port), SSHD_HOST, "true"]
        for _ in range(WARMUP):
            login(argv, user)
        return [login(argv, user) for _ in range(n)]


def login(argv: list[str], user: ThrowawayUser) -> float:
    """One ssh login as ``user``; its wall time in ms (RuntimeError if it fails)."""
    assert user.home is not None
    env = {"HOME": str(user.home), "USER": user.name, "LOGNAME": user.name, "PATH": "/usr/bin:/bin"}
    t0 = time.perf_counter()
    r = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        user=user.uid,
        group=user.gid,
        extra_groups=[],
        env=env,
        cwd=user.home,
        timeout=60,
    )
    took = (time.perf_counter() - t0) * 1000
    if r.returncode != 0:
        msg = f"plain ssh login failed ({r.returncode}): {r.stderr.decode(errors='replace')}"
        raise RuntimeError(msg)
    return took
