"""Fixtures for the end-to-end tests: a virtual cluster per module (tests/support/cluster.py).

A module that needs its own kind of cluster (callerid's PAM line, an agent) builds it in its
own module-scoped fixture, after `require_cluster()`:

    @pytest.fixture(scope="module")
    def cluster():
        require_cluster()
        with Cluster(3, pam_account_line=..., agent_cmd=..., agent_ready=...) as c:
            yield c
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.callerid_cluster import CalleridCluster
from tests.support.cluster import Cluster, ClusterUser, require_cluster


@pytest.fixture(scope="module")
def plain_cluster() -> Iterator[Cluster]:
    """Three nodes (IPv4 and IPv6) whose sshd has a plain pam_unix stack; no agent."""
    require_cluster()
    with Cluster(3) as cluster:
        yield cluster
    left = cluster.leftovers()
    assert not left, f"the cluster left things behind: {left}"


@pytest.fixture(scope="module")
def plain_user(plain_cluster: Cluster) -> ClusterUser:
    """A user of `plain_cluster` with an ssh key and the password in its `password`."""
    return plain_cluster.add_user(password="cid-" + "pw-" + "e2e")


@pytest.fixture(scope="module")
def cc() -> Iterator[CalleridCluster]:
    """Three nodes, each with sshd + pam_callerid.so and its callerid agent (peer timeout
    500 ms); a module that needs another set-up defines its own ``cc``."""
    require_cluster()
    with CalleridCluster(3, peer={"timeout_ms": 500}) as c:
        yield c
    left = c.cluster.leftovers()
    assert not left, f"the cluster left things behind: {left}"
