"""Agent configuration: one typed, frozen `Config`, validated once at the edge.

Every option is declared once, here, as a dataclass field carrying its default, its type, its
help text and its bounds (``metadata``: ``min``/``max`` for numbers, ``text`` (a character
rule of `TEXT_RULES`) and ``max_len`` for text and paths, ``absolute`` for paths, ``max_items``
for lists, ``check`` for a validator of its own). `load()` reads a YAML file, rejects unknown
keys and bad values with a one-line error that names the key and the file, and returns a frozen
`Config`; whatever the file holds, it raises nothing but `ConfigError`.
`render_default_yaml()` produces the documented ``config/agent.yaml`` from these declarations,
bounds included, so the shipped file and the code cannot drift apart (a unit test compares).

This module does no I/O except reading the one file passed to `load()`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import textwrap
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import yaml

from callerid.agent._configcheck import TEXT_RULES, ConfigError, build, describe, yaml_problem
from callerid.bus.peers import check_node_name

__all__ = [
    "MAX_FILE_SIZE",
    "MAX_TIMEOUT_MS",
    "TEXT_RULES",
    "BackendConfig",
    "CgroupBackendConfig",
    "Config",
    "ConfigError",
    "KeysConfig",
    "MetricsConfig",
    "PeerConfig",
    "PolicyConfig",
    "SlurmBackendConfig",
    "load",
    "parse",
    "render_default_yaml",
]

DEFAULT_PATH = Path("/etc/callerid/agent.yaml")
MAX_FILE_SIZE: Final = 1024 * 1024  # bytes of a config file (the default one is ~3 KiB)
MAX_TIMEOUT_MS: Final = 120_000  # every ms timeout: sshd's own LoginGraceTime is 120 s
MAX_PATH: Final = 4096  # PATH_MAX, in bytes
MAX_SOCKET_PATH: Final = 107  # sun_path holds 108 bytes with the final NUL
MAX_NAMES: Final = 1024  # entries of an exempt list
MAX_NAME: Final = 256  # a user or group name (the PAM protocol's bound on user=)
MAX_MESSAGE: Final = 256  # characters of deny_message: one line, ~3 KiB encoded at most

NoJobsAction = Literal["deny", "allow"]
UnknownAction = Literal["newest", "oldest", "random", "deny", "allow"]
AdoptFailureAction = Literal["deny", "allow"]
BackendType = Literal["cgroup", "slurm"]
NamespaceKind = Literal["user", "mnt", "pid", "net", "ipc", "uts", "cgroup"]  # /proc/<pid>/ns
Mode = Literal["enforce", "audit"]


# the bounds several options share (each option still declares its own, in its metadata)
_MS: Final = {"min": 1, "max": MAX_TIMEOUT_MS}
_DIR: Final = {"text": "printable", "max_len": MAX_PATH, "absolute": True}
_NAMES: Final = {"text": "name", "max_len": MAX_NAME, "max_items": MAX_NAMES}


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class KeysConfig:
    dir: Path = _opt(
        Path("/etc/callerid/keys"),
        "Directory with this node's keypair: <node_name>.key and <node_name>.key_secret "
        "(zmq certificate files, as `calleridctl keygen` writes them).",
        **_DIR,
    )
    authorized: Path = _opt(
        Path("/etc/callerid/keys/authorized"),
        "Directory with the public *.key file of every node allowed to query this agent "
        "(and whose agents this node may query). Reloaded on SIGHUP.",
        **_DIR,
    )


@dataclass(frozen=True)
class PeerConfig:
    timeout_ms: int = _opt(500, "Deadline of one query to a source agent, in ms.", **_MS)
    connect_timeout_ms: int = _opt(
        300, "TCP connect timeout towards a source agent (unanswered SYN), in ms.", **_MS
    )
    unreachable_ttl_s: float = _opt(
        30.0,
        "How long a host with no agent is skipped without a new attempt, in s.",
        min=0,
        max=86400,
    )
    pool_size: int = _opt(256, "Maximum number of open peer connections (LRU).", min=1, max=65536)


@dataclass(frozen=True)
class PolicyConfig:
    ignore_root: bool = _opt(True, "Allow root at once, with no lookup at all.")
    exempt_users: list[str] = _opt([], "Users always allowed, with no lookup at all.", **_NAMES)
    exempt_groups: list[str] = _opt([], "Members of these groups are always allowed.", **_NAMES)
    no_jobs: NoJobsAction = _opt("deny", "What to do when the user has no job on this node.")
    single_job_shortcut: bool = _opt(
        True, "A user with exactly one job here is adopted into it without asking the source."
    )
    unknown: UnknownAction = _opt(
        "newest",
        "What to do when the source job cannot be determined (no answer, not found): "
        "newest | oldest (by job start time, ties to the higher job id) | random | deny | allow.",
    )
    adopt_failure: AdoptFailureAction = _opt(
        "deny", "What to do when adoption into the chosen job fails."
    )
    wait_for_job_ms: int = _opt(
        500,
        "When the source names a job of the user that this node does not have yet (its "
        "prolog is still creating it: launchers ssh to every node of a new job at once), wait "
        "this long for it to appear before the other rules decide; 0: never wait. With it, a "
        "user without a job here is denied only after the source was asked. The wait never "
        "takes a decision past pam_timeout_ms (it is cut short 200 ms before).",
        min=0,
        max=MAX_TIMEOUT_MS,
    )
    deny_message: str = _opt(
        "Access denied by callerid: you have no active job on {node}",
        "Message shown to a denied user; {node} is replaced by this node's name.",
        text="printable",
        max_len=MAX_MESSAGE,
    )


@dataclass(frozen=True)
class CgroupBackendConfig:
    root: Path = _opt(Path("/sys/fs/cgroup"), "Mount point of the cgroup hierarchy.", **_DIR)
    jobs: str = _opt(
        "slurm/uid_{uid}/job_{job}",
        "Glob (relative to root) of job cgroup directories; {job} is the job id (digits), "
        "{uid} the owner's uid (optional: without it the owner is read from the job's "
        "processes).",
        text="printable",
        max_len=MAX_PATH,
    )
    extern: str = _opt(
        "step_extern",
        "Name of the extern-step cgroup inside a job cgroup.",
        text="name",
        max_len=255,
    )
    join_namespaces: bool = _opt(
        False,
        "An adopted session enters the job's namespaces: those of the owner's oldest process "
        "in the job that differ from the agent's own, of the kinds in namespace_kinds (the "
        "PAM module enters them; a login whose namespaces cannot be had is denied). Off: "
        "sessions stay in the node's namespaces.",
    )
    namespace_kinds: list[NamespaceKind] = _opt(
        ["user", "mnt", "pid", "ipc", "uts"],
        "The kinds join_namespaces enters, in this order (user first: as nsenter does): user, "
        "mnt, pid, net, ipc, uts, cgroup.",
        max_items=7,
    )


@dataclass(frozen=True)
class SlurmBackendConfig:
    spool_dir: Path = _opt(Path("/var/spool/slurmd"), "SlurmdSpoolDir (stepd sockets).", **_DIR)
    node_name: str | None = _opt(
        None, "Slurm NodeName of this node; default: guessed.", text="name", max_len=255
    )
    protocol_version: int | None = _opt(
        None,
        "Protocol version sent in the stepd handshake; default: the newest we know.",
        min=1,
        max=65535,
    )
    timeout_ms: int = _opt(
        1000,
        "Bound of each slurm backend call (all its slurmstepd exchanges together), in ms.",
        **_MS,
    )
    join_container: bool = _opt(
        True,
        "Enter the job's namespaces (job_container/tmpfs, namespace/tmpfs, namespace/linux: "
        "its private /tmp, PID namespace) on adoption, as pam_slurm_adopt's join_container.",
    )


@dataclass(frozen=True)
class BackendConfig:
    type: BackendType = _opt("cgroup", "Where jobs come from: cgroup | slurm.")
    cgroup: CgroupBackendConfig = field(default_factory=CgroupBackendConfig)
    slurm: SlurmBackendConfig = field(default_factory=SlurmBackendConfig)
    prime_migration: bool = _opt(
        True,
        "When a login is about to be adopted, start the kernel's wait for an RCU grace period "
        "(which every cgroup migration makes since Linux 6.0, unless favordynmods) while the "
        "decision goes on: a write of the agent's own pid into its own cgroup from a worker "
        "thread. Saves the decision's time from each adoption; nothing to do with favordynmods.",
    )


@dataclass(frozen=True)
class MetricsConfig:
    port: int | None = _opt(
        None,
        "TCP port of the Prometheus metrics endpoint (HTTP, /metrics); null: no endpoint. 0: "
        "any free port (calleridctl status shows it). Below 1024 needs a capability the unit "
        "does not keep.",
        min=0,
        max=65535,
    )
    address: str = _opt(
        "127.0.0.1",
        "Address the metrics endpoint binds (an IP literal); a loopback address unless "
        "allow_remote is true.",
        text="printable",
        max_len=64,
    )
    allow_remote: bool = _opt(
        False,
        "Let the metrics endpoint bind a non-loopback address. It has no authentication and "
        "no TLS: anyone who reaches it sees login rates, denials and peer counts.",
    )
    textfile: Path | None = _opt(
        None,
        "File for node_exporter's textfile collector (name ending in .prom), replaced "
        "atomically every interval_s and removed when the agent stops; null: none. The unit "
        "needs ReadWritePaths= for its directory.",
        **_DIR,
    )
    interval_s: float = _opt(15.0, "How often the textfile is rewritten, in s.", min=1, max=3600)

    def __post_init__(self) -> None:
        try:
            ip = ipaddress.ip_address(self.address)
        except ValueError as exc:
            msg = f"metrics.address: {self.address!r} is not an IP address literal"
            raise ConfigError(msg) from exc
        if not ip.is_loopback and not self.allow_remote:
            msg = (
                f"metrics.address: {self.address} is not a loopback address "
                "(set metrics.allow_remote: true to serve metrics beyond this host)"
            )
            raise ConfigError(msg)
        if self.textfile is not None and not self.textfile.name.endswith(".prom"):
            msg = f"metrics.textfile: {str(self.textfile)!r} must end in .prom (node_exporter)"
            raise ConfigError(msg)

    @property
    def enabled(self) -> bool:
        return self.port is not None or self.textfile is not None


@dataclass(frozen=True)
class Config:
    node_name: str | None = _opt(
        None,
        "Name of this node; default: the short hostname. Letters, digits, '_', '.', '-', "
        "at most 64 characters.",
        check=check_node_name,
    )
    listen: list[str] = _opt(
        ["0.0.0.0", "::"],
        "Addresses the mesh ROUTER binds (IPv4 and IPv6 literals).",
        text="printable",
        max_len=64,
        max_items=64,
    )
    port: int = _opt(6820, "Mesh TCP port.", min=1, max=65535)
    keys: KeysConfig = field(default_factory=KeysConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    pam_socket: Path = _opt(
        Path("/run/callerid/agent.sock"),
        "Unix socket the PAM module talks to (mode 0600).",
        **{**_DIR, "max_len": MAX_SOCKET_PATH},
    )
    pam_timeout_ms: int = _opt(
        2000,
        "The agent always replies to PAM within this many ms; keep it below the module's timeout=. "
        "peer.timeout_ms must be below it.",
        **_MS,
    )
    mode: Mode = _opt(
        "enforce",
        "enforce: deny what the policy denies. audit: decide and adopt as usual, but let "
        "through a login that enforce would deny (or fail), journaled as "
        "CALLERID_DECISION=allow CALLERID_REASON=audit with the would-be verdict and reason "
        "in CALLERID_WOULD_DECISION and CALLERID_WOULD_REASON (for a staged rollout).",
    )
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    journal: bool = _opt(True, "Write one structured record per decision to the journal.")
    scheduling: Literal["batch", "normal"] = _opt(
        "batch",
        "CPU scheduling policy of all the agent's threads, set at start. batch (SCHED_BATCH): "
        "woken by a login or a query, the agent does not preempt the running task (sshd writes "
        "its request first: one wake-up per login, not two; a job's processes are not "
        "interrupted at once); on a node whose every CPU is busy a decision may wait up to a "
        "scheduler tick (1-4 ms). normal (SCHED_OTHER): the kernel's default.",
    )
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        for addr in self.listen:
            try:
                ipaddress.ip_address(addr)
            except ValueError as exc:
                msg = f"listen: {addr!r} is not an IP address literal"
                raise ConfigError(msg) from exc
        if self.peer.timeout_ms >= self.pam_timeout_ms:
            msg = (
                f"peer.timeout_ms ({self.peer.timeout_ms}) must be below pam_timeout_ms "
                f"({self.pam_timeout_ms}) so a reply always reaches PAM in time"
            )
            raise ConfigError(msg)
        if "{job}" not in self.backend.cgroup.jobs:
            msg = "backend.cgroup.jobs: the pattern must contain {job}"
            raise ConfigError(msg)


# --------------------------------------------------------------------------- loading


def parse(data: Mapping[str, Any] | None) -> Config:
    """Validate a mapping (as loaded from YAML) into a `Config`; any other input: ConfigError."""
    if data is None:
        return Config()
    if not isinstance(data, Mapping):
        msg = "the top level must be a mapping of keys"
        raise ConfigError(msg)
    cfg: Config = build(Config, data)
    return cfg


def load(path: Path) -> Config:
    """Read and validate a YAML config file; errors name the file and the key.

    Whatever the file holds, the only exception is `ConfigError`, with a one-line message.
    """
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        msg = f"{path}: cannot read: {exc.strerror or exc}"
        raise ConfigError(msg) from exc
    if len(raw) > MAX_FILE_SIZE:
        msg = f"{path}: larger than {MAX_FILE_SIZE} bytes"
        raise ConfigError(msg)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"{path}: not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})"
        raise ConfigError(msg) from exc
    try:
        data = yaml.safe_load(text)
    except Exception as exc:  # YAMLError, and ValueError, RecursionError... for odd input
        msg = f"{path}: not valid YAML: {yaml_problem(exc)}"
        raise ConfigError(msg) from exc
    try:
        return parse(data)
    except ConfigError as exc:
        msg = f"{path}: {exc}"
        raise ConfigError(msg) from exc


# --------------------------------------------------------------------------- documentation


def _yaml_value(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    return (
        yaml.safe_dump(value, default_flow_style=True, width=1000)
        .strip()
        .removesuffix("\n...")
        .removesuffix(" ...")
    )


def _render(cls: Any, indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    default = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.extend(_render(type(value), indent + 1))
            continue
        for text in (f.metadata["help"], describe(hints[f.name], f.metadata)):
            lines.extend(
                f"{pad}# {line}" for line in textwrap.wrap(text or "", width=96 - len(pad))
            )
        lines.append(f"{pad}{f.name}: {_yaml_value(value)}")
    return lines


def render_default_yaml() -> str:
    """The documented default config file, generated from the declarations above."""
    head = [
        "# callerid agent configuration (/etc/callerid/agent.yaml).",
        "# Every key is optional; the values shown are the defaults. Unknown keys are errors.",
        "# Generated from callerid.agent.config: `calleridctl config --default`.",
        "",
    ]
    return "\n".join(head + _render(Config, 0)) + "\n"
