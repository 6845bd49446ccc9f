"""Any file and any YAML-shaped data either give a `Config` or raise `ConfigError`, nothing else.

The agent exits 78 (EX_CONFIG) on a `ConfigError` at start and keeps its running config on
one at SIGHUP; any other exception would end it (h11's fuzz invariant, for the config file).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from callerid.agent import config

SETTINGS = settings(max_examples=300, deadline=None)

# the four inputs of issue 12, and their neighbours
REPORTED: list[bytes] = [
    b"policy:\n  deny_message: caf\xe9\n",  # a Latin-1 byte
    b"{1: a, foo: b}\n",  # a non-string key
    b"[" * 3000,  # nesting deeper than the recursion limit
    b"node_name: a b\n",  # not a node name
]


def _field_names(cls: Any) -> set[str]:
    names = set()
    for f in dataclasses.fields(cls):
        names.add(f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            names |= _field_names(type(default))
    return names


KEYS = sorted(_field_names(config.Config))  # every key of every section

# Things YAML may put in a file, text near valid keys, and numbers near every edge.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0, 1, 65535, 65536, 2**31, 2**63]),
    st.text(),
    st.text(alphabet=st.characters(max_codepoint=0x20)),  # control characters
    st.sampled_from(
        ["deny", "newest", "cgroup", "slurm", "::", "127.0.0.1", "/abs", "rel", "{job}", "a b"]
    ),
    st.sampled_from(["\x00", "\ud800", "\x1b[31m", "a\nb", "\u0085", "\u202e"]),
    st.binary(max_size=8),
)
hashable = st.one_of(
    st.sampled_from(KEYS),
    st.text(max_size=8),
    st.integers(),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
)
data_trees = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(hashable, inner, max_size=5),
    ),
    max_leaves=40,
)
# mappings shaped like a config: valid section names, leaves of any kind
config_like = st.recursive(
    scalars,
    lambda inner: st.dictionaries(st.sampled_from(KEYS), inner, max_size=6),
    max_leaves=30,
)


def _is_config_or_config_error(fn: Any, arg: Any) -> None:
    try:
        result = fn(arg)
    except config.ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(result, config.Config)


@SETTINGS
@given(st.binary(max_size=2000))
@example(REPORTED[0])
@example(REPORTED[1])
@example(REPORTED[2])
@example(REPORTED[3])
@example(b"port: " + b"9" * 5000)
@example(b"peer: {connect_timeout_ms: 99999999999}")
@example(b"peer: {unreachable_ttl_s: .nan}")
@example(b'policy: {deny_message: "a\\0b"}')
@example(b"? [a]\n: b\n")
@example(b"a: !!binary aGk=\nb: 2001-12-14\n")
@example(b"{2001-12-14: a}")
@example(b"{.nan: a}")
@example(b"a: &a [*a]\n")
def test_load_any_bytes(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    path: Path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_bytes(content)
    _is_config_or_config_error(config.load, path)


@SETTINGS
@given(st.text(alphabet="{}[]:,-&*!? \n'\"#.|>0123456789abc\\", max_size=200))
def test_load_yaml_punctuation(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path: Path = tmp_path_factory.getbasetemp() / "fuzz-punct.yaml"
    path.write_text(text)
    _is_config_or_config_error(config.load, path)


@SETTINGS
@given(data_trees)
def test_parse_any_data(data: Any) -> None:
    _is_config_or_config_error(config.parse, data)


@SETTINGS
@given(config_like)
def test_parse_config_shaped_data(data: Any) -> None:
    _is_config_or_config_error(config.parse, data)


@pytest.mark.parametrize("content", REPORTED)
def test_reported_inputs_are_config_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(content)
    with pytest.raises(config.ConfigError, match=str(path)):
        config.load(path)
