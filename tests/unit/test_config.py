"""Config validation: defaults, unknown keys, bad values, the shipped documented file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from callerid.agent import config

TOP = Path(__file__).resolve().parents[2]


def test_defaults_match_design() -> None:
    cfg = config.parse(None)
    assert cfg.port == 6820
    assert cfg.listen == ["0.0.0.0", "::"]
    assert cfg.peer.timeout_ms == 500
    assert cfg.policy.no_jobs == "deny"
    assert cfg.policy.unknown == "newest"
    assert cfg.policy.adopt_failure == "deny"
    assert cfg.backend.type == "cgroup"
    assert cfg.pam_socket == Path("/run/callerid/agent.sock")


def test_shipped_file_is_the_generated_default() -> None:
    shipped = (TOP / "config" / "agent.yaml").read_text()
    assert shipped == config.render_default_yaml()
    assert config.load(TOP / "config" / "agent.yaml") == config.Config()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"bogus": 1}, "unknown key bogus"),
        ({"policy": {"unknwn": "deny"}}, "unknown key policy.unknwn"),
        ({"policy": {"unknown": "sometimes"}}, "policy.unknown: expected newest"),
        ({"port": 0}, "port: 0 is out of range"),
        ({"port": "6820"}, "port: expected int"),
        ({"port": True}, "port: expected int"),
        ({"listen": ["localhost"]}, "listen: 'localhost' is not an IP"),
        ({"listen": "::"}, "listen: expected list"),
        ({"peer": {"timeout_ms": 5000}}, "must be below pam_timeout_ms"),
        ({"policy": {"ignore_root": "yes"}}, "policy.ignore_root: expected bool"),
        ({"backend": {"cgroup": {"jobs": "slurm/uid_{uid}"}}}, "must contain {job}"),
        ({"keys": {"dir": ""}}, "keys.dir: expected Path"),
        ({"policy": {"exempt_users": ["ok", 3]}}, "policy.exempt_users[1]"),
        ([1, 2], "top level must be a mapping"),
    ],
)
def test_bad_values_name_the_key(data: object, needle: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.parse(data)  # type: ignore[arg-type]
    assert needle in str(exc.value)


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("policy:\n  no_jobs: maybe\n")
    with pytest.raises(config.ConfigError, match=rf"{path}: policy.no_jobs"):
        config.load(path)
    path.write_text("a: [\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(path)
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.yaml")


def test_values_are_converted() -> None:
    cfg = config.parse({"keys": {"dir": "/k"}, "peer": {"unreachable_ttl_s": 5}, "node_name": "n1"})
    assert cfg.keys.dir == Path("/k")
    assert cfg.peer.unreachable_ttl_s == 5.0
    assert isinstance(cfg.peer.unreachable_ttl_s, float)
    assert cfg.node_name == "n1"


# --------------------------------------------------------------------------- hardening (issue 12)

LATIN1 = b"policy:\n  deny_message: caf\xe9\n"
NON_STRING_KEY = b"{1: a, foo: b}\n"
DEEP = b"[" * 3000
BAD_NODE_NAME = b"node_name: a b\n"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (LATIN1, "not UTF-8"),
        (NON_STRING_KEY, "1: keys must be strings"),
        (DEEP, "nested too deeply"),
        (BAD_NODE_NAME, "node_name: invalid node name 'a b'"),
        (b"port: " + b"9" * 5000 + b"\n", "not valid YAML"),
        (b"? [a]\n: b\n", "unhashable key"),
        (b"a\x00b\n", "not valid YAML"),
        (b"policy: {deny_message: [\n", "not valid YAML"),
        (b"&a [*a]\n", "top level must be a mapping"),
    ],
)
def test_load_raises_only_config_error_on_one_line(
    tmp_path: Path, content: bytes, needle: str
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(content)
    with pytest.raises(config.ConfigError) as exc:
        config.load(path)
    assert str(exc.value).startswith(f"{path}: ")
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_load_refuses_a_huge_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(config.ConfigError, match="larger than"):
        config.load(path)


MS = 120_000  # config.MAX_TIMEOUT_MS: ms timeouts at most two minutes


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"peer": {"connect_timeout_ms": 99999999999}}, "peer.connect_timeout_ms: 99999999999"),
        ({"peer": {"connect_timeout_ms": MS + 1}}, "peer.connect_timeout_ms"),
        ({"peer": {"timeout_ms": 0}}, "peer.timeout_ms: 0 is out of range"),
        ({"pam_timeout_ms": MS + 1}, "pam_timeout_ms"),
        ({"backend": {"slurm": {"timeout_ms": 10**30}}}, "backend.slurm.timeout_ms"),
        ({"backend": {"slurm": {"protocol_version": 1 << 31}}}, "protocol_version"),
        ({"peer": {"unreachable_ttl_s": float("nan")}}, "unreachable_ttl_s: expected a finite"),
        ({"peer": {"unreachable_ttl_s": float("inf")}}, "unreachable_ttl_s: expected a finite"),
        ({"peer": {"unreachable_ttl_s": -1}}, "unreachable_ttl_s: -1 is out of range"),
        ({"peer": {"unreachable_ttl_s": 10**400}}, "unreachable_ttl_s: <an integer of 1329 bits>"),
        ({"peer": {"pool_size": 10**6}}, "peer.pool_size"),
        ({"port": 65536}, "port: 65536 is out of range"),
        ({"port": 10**5000}, "port: <an integer of"),
        ({"policy": {"deny_message": "a\x00b"}}, "policy.deny_message: "),
        ({"policy": {"deny_message": "a\x1b[31mb"}}, "policy.deny_message: "),
        ({"policy": {"deny_message": "two\nlines"}}, "policy.deny_message: "),
        ({"policy": {"deny_message": "\u0085"}}, "policy.deny_message: "),
        ({"policy": {"deny_message": "\ud800"}}, "policy.deny_message: "),
        ({"policy": {"deny_message": "x" * 257}}, "policy.deny_message: longer than 256"),
        ({"policy": {"exempt_users": ["ok", "bad user"]}}, "policy.exempt_users[1]: "),
        ({"policy": {"exempt_groups": ["tab\tgroup"]}}, "policy.exempt_groups[0]: "),
        ({"policy": {"exempt_groups": [""]}}, "policy.exempt_groups[0]: empty"),
        ({"policy": {"exempt_users": ["u"] * 1025}}, "policy.exempt_users: more than 1024"),
        ({"node_name": "a b"}, "node_name: invalid node name 'a b'"),
        ({"node_name": "x" * 65}, "node_name: invalid node name"),
        ({"backend": {"slurm": {"node_name": "n 1"}}}, "backend.slurm.node_name: "),
        ({"keys": {"dir": "relative/keys"}}, "keys.dir: must be an absolute path"),
        ({"keys": {"authorized": "/k\x00/a"}}, "keys.authorized: "),
        ({"pam_socket": "/run/" + "s" * 200}, "pam_socket: longer than 107 bytes"),
        ({"backend": {"cgroup": {"root": "/sys/fs/cgroup\n"}}}, "backend.cgroup.root: "),
        ({"backend": {"cgroup": {"extern": "a/b"}}}, "backend.cgroup.extern: "),
        ({"backend": {"cgroup": {"jobs": "job_{job}\x07"}}}, "backend.cgroup.jobs: "),
        ({"listen": ["::1%\x00"]}, "listen[0]: "),
        ({"listen": ["127.0.0.1"] * 65}, "listen: more than 64"),
        ({1: "a", "foo": "b"}, "1: keys must be strings"),
        ({"policy": {None: 1}}, "policy.None: keys must be strings"),
        ({"bad\nkey": 1}, "unknown key 'bad\\nkey'"),
    ],
)
def test_values_are_bounded(data: object, needle: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.parse(data)  # type: ignore[arg-type]
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bounds_accept_the_edges() -> None:
    cfg = config.parse(
        {
            "port": 65535,
            "pam_timeout_ms": MS,
            "peer": {"timeout_ms": MS - 1, "connect_timeout_ms": MS, "unreachable_ttl_s": 0},
            "policy": {
                "deny_message": "Zugang verweigert auf {node} \u2014 ok",
                "exempt_users": ["a.b-c_d@EXAMPLE"],
                "wait_for_job_ms": 0,
            },
            "pam_socket": "/run/" + "s" * 102,
        }
    )
    assert cfg.port == 65535 and cfg.peer.connect_timeout_ms == MS


def _leaves(cls: object, prefix: str = "") -> list[tuple[str, object, dataclasses.Field[object]]]:
    import typing

    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(_leaves(tp, f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, tp, f))
    return out


def test_every_value_is_bounded_in_its_declaration() -> None:
    """Every number has a min and a max; every text a character rule and a length."""
    import typing

    for key, tp, f in _leaves(config.Config):
        args = set(typing.get_args(tp)) - {type(None)} or {tp}
        inner = {typing.get_args(a)[0] if typing.get_origin(a) is list else a for a in args}
        if inner & {int, float}:
            assert "min" in f.metadata and "max" in f.metadata, key
        if inner & {str, Path}:
            assert "text" in f.metadata or "check" in f.metadata, key
            assert "max_len" in f.metadata or "check" in f.metadata, key
        if typing.get_origin(tp) is list:
            assert "max_items" in f.metadata, key


def test_rendered_file_documents_the_bounds() -> None:
    text = config.render_default_yaml()
    assert "# Range: 1 .. 65535." in text
    assert f"# Range: 1 .. {MS}." in text
    assert "at most 256 characters" in text


def test_the_peer_timeout_and_the_job_wait_fit_in_the_pam_timeout() -> None:
    cfg = config.parse({"pam_timeout_ms": 2000, "peer": {"timeout_ms": 500}})
    assert cfg.policy.wait_for_job_ms == 500 and cfg.mode == "enforce"
    # a wait longer than what is left of the PAM deadline is cut short by the flow, not refused
    assert config.parse({"peer": {"timeout_ms": 1500}}).policy.wait_for_job_ms == 500
    assert config.parse({"mode": "audit"}).mode == "audit"
    with pytest.raises(config.ConfigError, match="mode"):
        config.parse({"mode": "dry"})
