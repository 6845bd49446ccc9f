"""A login kept on the event loop with a blocking backend that offers `LoopAdoption`.

The slurm backend's calls may wait on a slurmstepd, so `login.LoginFlow` runs them in a worker
thread; a hop there and back costs ~0.2 ms after the agent has been idle, as much as the rest
of a single-job decision. When the backend can say at once what it knows (every extern step's
owner remembered) and drive the stepd exchange from the loop, nothing needs the thread:
`adopt_on_loop` pins the process, has the loop drive the adoption, and checks the pin after, as
`LoginFlow._adopt` does in a thread.
"""

from __future__ import annotations

from callerid.agent._loginports import Processes
from callerid.agent.backends.base import BackendError, Job, LoopAdoption

__all__ = ["adopt_on_loop"]


async def adopt_on_loop(
    backend: LoopAdoption, procs: Processes, pid: int, start: float | None, job: Job
) -> None:
    """Adopt the process ``pid`` started at ``start`` into ``job``, and only that process:
    NetinfoError if it is gone, BackendError if it exits meanwhile (see `netinfo.Pin`)."""
    held = procs.pin(pid, start)
    try:
        await backend.adopt_async(pid, job)
        if held.exited():
            msg = f"process {pid} exited while it was being adopted"
            raise BackendError(msg)
    finally:
        held.close()
