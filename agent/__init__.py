"""callerid.agent: the node agent (daemon, CLI, policy, backends)."""

__version__ = "0.1.0"
