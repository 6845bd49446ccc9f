"""Agent configuration: one typed, frozen `Config`, validated once at the edge.

Every option is declared once, here, as a dataclass field carrying its default, its type and
its help text (``metadata["help"]``). `load()` reads a YAML file, rejects unknown keys and bad
values with an error that names the key and the file, and returns a frozen `Config`.
`render_default_yaml()` produces the documented ``config/agent.yaml`` from these declarations,
so the shipped file and the code cannot drift apart (a unit test compares them).

This module does no I/O except reading the one file passed to `load()`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "BackendConfig",
    "CgroupBackendConfig",
    "Config",
    "ConfigError",
    "KeysConfig",
    "PeerConfig",
    "PolicyConfig",
    "SlurmBackendConfig",
    "load",
    "parse",
    "render_default_yaml",
]

DEFAULT_PATH = Path("/etc/callerid/agent.yaml")

NoJobsAction = Literal["deny", "allow"]
UnknownAction = Literal["newest", "oldest", "random", "deny", "allow"]
AdoptFailureAction = Literal["deny", "allow"]
BackendType = Literal["cgroup", "slurm"]


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key and the file."""


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
    )
    authorized: Path = _opt(
        Path("/etc/callerid/keys/authorized"),
        "Directory with the public *.key file of every node allowed to query this agent "
        "(and whose agents this node may query). Reloaded on SIGHUP.",
    )


@dataclass(frozen=True)
class PeerConfig:
    timeout_ms: int = _opt(500, "Deadline of one query to a source agent, in ms.", min=1)
    connect_timeout_ms: int = _opt(
        300, "TCP connect timeout towards a source agent (unanswered SYN), in ms.", min=1
    )
    unreachable_ttl_s: float = _opt(
        30.0, "How long a host with no agent is skipped without a new attempt, in s.", min=0
    )
    pool_size: int = _opt(256, "Maximum number of open peer connections (LRU).", min=1)


@dataclass(frozen=True)
class PolicyConfig:
    ignore_root: bool = _opt(True, "Allow root at once, with no lookup at all.")
    exempt_users: list[str] = _opt([], "Users always allowed, with no lookup at all.")
    exempt_groups: list[str] = _opt([], "Members of these groups are always allowed.")
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
    deny_message: str = _opt(
        "Access denied by callerid: you have no active job on {node}",
        "Message shown to a denied user; {node} is replaced by this node's name.",
    )


@dataclass(frozen=True)
class CgroupBackendConfig:
    root: Path = _opt(Path("/sys/fs/cgroup"), "Mount point of the cgroup hierarchy.")
    jobs: str = _opt(
        "slurm/uid_{uid}/job_{job}",
        "Glob (relative to root) of job cgroup directories; {job} is the job id (digits), "
        "{uid} the owner's uid (optional: without it the owner is read from the job's "
        "processes).",
    )
    extern: str = _opt("step_extern", "Name of the extern-step cgroup inside a job cgroup.")


@dataclass(frozen=True)
class SlurmBackendConfig:
    spool_dir: Path = _opt(Path("/var/spool/slurmd"), "SlurmdSpoolDir (stepd sockets).")
    node_name: str | None = _opt(None, "Slurm NodeName of this node; default: guessed.")
    protocol_version: int | None = _opt(
        None, "Protocol version sent in the stepd handshake; default: the newest we know."
    )
    timeout_ms: int = _opt(
        1000,
        "Bound of each slurm backend call (all its slurmstepd exchanges together), in ms.",
        min=1,
    )


@dataclass(frozen=True)
class BackendConfig:
    type: BackendType = _opt("cgroup", "Where jobs come from: cgroup | slurm.")
    cgroup: CgroupBackendConfig = field(default_factory=CgroupBackendConfig)
    slurm: SlurmBackendConfig = field(default_factory=SlurmBackendConfig)


@dataclass(frozen=True)
class Config:
    node_name: str | None = _opt(None, "Name of this node; default: the short hostname.")
    listen: list[str] = _opt(
        ["0.0.0.0", "::"], "Addresses the mesh ROUTER binds (IPv4 and IPv6 literals)."
    )
    port: int = _opt(6820, "Mesh TCP port.", min=1, max=65535)
    keys: KeysConfig = field(default_factory=KeysConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    pam_socket: Path = _opt(
        Path("/run/callerid/agent.sock"), "Unix socket the PAM module talks to (mode 0600)."
    )
    pam_timeout_ms: int = _opt(
        2000,
        "The agent always replies to PAM within this many ms; keep it below the module's timeout=.",
        min=1,
    )
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    journal: bool = _opt(True, "Write one structured record per decision to the journal.")

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


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, meta: Mapping[str, Any]) -> Any:  # noqa: PLR0912
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, meta)
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]", {}) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise bad
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int or tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        if tp is int and not isinstance(value, int):
            raise bad
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            msg = f"{key}: {value} is out of range [{lo}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(msg)
        return tp(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
        raise bad
    raise bad  # pragma: no cover - a declaration this loader does not know


def _build(cls: Any, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        msg = f"unknown key {prefix}{unknown[0]!s} (known here: {known})"
        raise ConfigError(msg)
    kwargs = {
        name: _convert(value, hints[name], prefix + name, fields[name].metadata)
        for name, value in data.items()
    }
    return cls(**kwargs)


def parse(data: Mapping[str, Any] | None) -> Config:
    """Validate a mapping (as loaded from YAML) into a `Config`."""
    if data is None:
        return Config()
    if not isinstance(data, Mapping):
        msg = "the top level must be a mapping of keys"
        raise ConfigError(msg)
    cfg: Config = _build(Config, data)
    return cfg


def load(path: Path) -> Config:
    """Read and validate a YAML config file; errors name the file and the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"{path}: cannot read: {exc.strerror}"
        raise ConfigError(msg) from exc
    try:
        data = yaml.safe_load(text)
        return parse(data)
    except yaml.YAMLError as exc:
        msg = f"{path}: not valid YAML: {exc}"
        raise ConfigError(msg) from exc
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
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.extend(_render(type(value), indent + 1))
            continue
        for help_line in _wrap(f.metadata["help"], 96 - len(pad)):
            lines.append(f"{pad}# {help_line}")
        lines.append(f"{pad}{f.name}: {_yaml_value(value)}")
    return lines


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width) or [""]


def render_default_yaml() -> str:
    """The documented default config file, generated from the declarations above."""
    head = [
        "# callerid agent configuration (/etc/callerid/agent.yaml).",
        "# Every key is optional; the values shown are the defaults. Unknown keys are errors.",
        "# Generated from callerid.agent.config: `calleridctl config --default`.",
        "",
    ]
    return "\n".join(head + _render(Config, 0)) + "\n"
