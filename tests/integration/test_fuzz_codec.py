"""pam/codec.c under libFuzzer with ASan and UBSan, for a short fixed budget each.

The harnesses (pam/fuzz/fuzz_*.c) check the C wire code against references written from
pam/client.h: reply parsing, request encoding with arbitrary field strings, and cid_sanitize.
Each runs CALLERID_FUZZ_SECONDS (default 10) from a copy of its seed corpus, all three at once,
built and run under tmp_path: nothing is written into the tree. `make fuzz` runs them longer.
The reply harness also parses lines written by the agent's own encoder, which must all parse.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from callerid.agent.pamproto import PamReply, format_reply

REPO = Path(__file__).resolve().parents[2]
PAM_DIR = REPO / "pam"
FUZZ_DIR = PAM_DIR / "fuzz"
FUZZERS = ("reply", "request", "sanitize")
SECONDS = int(os.environ.get("CALLERID_FUZZ_SECONDS", "10"))


@pytest.fixture(scope="module")
def fuzz_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The harnesses, built by `make -C pam fuzz-build` into a private directory."""
    if shutil.which("clang") is None:
        pytest.skip("clang is missing (Debian: clang libclang-rt-14-dev; `make apt` installs it)")
    out = tmp_path_factory.mktemp("fuzz-build")
    proc = subprocess.run(
        ["make", "-s", "-C", str(PAM_DIR), "fuzz-build", f"FUZZ_OUT={out}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def campaigns(
    fuzz_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[subprocess.Popen[bytes], Path]]]:
    """The three fuzzers, started together; each test waits for its own."""
    runs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for name in FUZZERS:
        work = tmp_path_factory.mktemp(f"fuzz-{name}")
        corpus = work / "corpus"
        shutil.copytree(FUZZ_DIR / "corpus" / name, corpus)
        (work / "artifacts").mkdir()
        cmd = [
            str(fuzz_bin / f"fuzz-{name}"),
            f"-max_total_time={SECONDS}",
            "-timeout=10",
            "-print_final_stats=1",
            f"-dict={FUZZ_DIR / f'{name}.dict'}",
            f"-artifact_prefix={work / 'artifacts'}/",
            str(corpus),
        ]
        with (work / "log").open("wb") as log:  # a file, not a pipe nobody reads meanwhile
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        runs[name] = (proc, work)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", FUZZERS)
def test_fuzzer_finds_nothing(
    name: str, campaigns: dict[str, tuple[subprocess.Popen[bytes], Path]]
) -> None:
    proc, work = campaigns[name]
    proc.wait(timeout=SECONDS + 60)
    output = (work / "log").read_text(errors="replace")
    crashes = sorted(p.name for p in (work / "artifacts").iterdir())
    assert proc.returncode == 0 and not crashes, f"fuzz-{name}: {crashes}\n{output[-4000:]}"
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", output))
    assert int(stats["number_of_executed_units"]) > 0, output[-2000:]
    runs, per_s, new = (stats[k] for k in ("number_of_executed_units", "average_exec_per_sec",
                                           "new_units_added"))  # fmt: skip
    print(f"fuzz-{name}: {runs} runs in {SECONDS} s, {per_s} exec/s, {new} new units")


_POOLS = (
    "abc XYZ-_.:/@+,[]=%",
    "\x00\x01\x1b\t\n\x7f",
    "\u0080\u009b\u00e9\u202e\u4e2d",
    "\U0001f600",
)


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(rng.choice(_POOLS)) for _ in range(n))


def agent_replies(count: int) -> Iterator[bytes]:
    """Lines from the agent's encoder: every verdict, odd reasons, jobs and gids (the
    encoder leaves out those the module would refuse), long messages."""
    rng = random.Random(1234)  # fixed: the same lines each run
    jobs = [None, "42", "42_7.extern-x", "j" * 64, "j" * 65, "4/2", "", "a b"]
    gids = [None, 0, 1003, 2**32 - 2, 2**32 - 1, -1, 2**40]
    for i in range(count):
        yield format_reply(
            PamReply(
                rng.choice(["adopt", "allow", "deny", "error"]),
                _text(rng, rng.choice([0, 8, 400])),
                rng.choice(jobs),
                _text(rng, rng.choice([0, 20, 700, 3000]) if i % 4 else 5000),
                rng.choice(gids),
            )
        )


def test_the_module_parses_every_reply_the_agent_writes(fuzz_bin: Path, tmp_path: Path) -> None:
    files = []
    for i, line in enumerate(agent_replies(400)):
        files.append(tmp_path / f"r{i:03d}")
        files[-1].write_bytes(line)
    proc = subprocess.run(  # given files, libFuzzer runs each once and nothing else
        [str(fuzz_bin / "fuzz-reply"), f"-artifact_prefix={tmp_path}/", *map(str, files)],
        env=os.environ | {"CID_FUZZ_EXPECT_OK": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
