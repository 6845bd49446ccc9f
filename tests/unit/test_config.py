"""Config validation: defaults, unknown keys, bad values, the shipped documented file."""

from __future__ import annotations

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
