"""`LoopSocket`: the sends of one loop turn share one ZMQ_EVENTS check, and no reply is missed.

Real zmq sockets (a DEALER and a ROUTER over inproc), on a real asyncio loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import zmq

from callerid.bus._sockets import LoopSocket


class CountingSocket(LoopSocket):
    """A LoopSocket that counts its ZMQ_EVENTS checks."""

    checks = 0

    def _events(self) -> int:
        self.checks += 1
        return super()._events()


async def _echo_burst(n: int) -> tuple[int, list[bytes]]:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    router.bind("inproc://loop-socket-test")
    dealer.connect("inproc://loop-socket-test")
    got: list[bytes] = []
    done = asyncio.get_running_loop().create_future()

    def on_reply(frames: list[Any]) -> None:
        got.append(frames[-1])
        if len(got) == n and not done.done():
            done.set_result(None)

    def on_query(frames: list[Any]) -> None:
        server.send([frames[0], b"re:" + frames[-1]])  # answered at once, from the reader

    client = CountingSocket(dealer, on_reply, copy=True)
    server = LoopSocket(router, on_query, copy=True)
    try:
        for i in range(n):  # n sends in one loop turn, as a storm's logins send their queries
            client.send([str(i).encode()])
        await asyncio.wait_for(done, 5.0)
        return client.checks, got
    finally:
        client.close()
        server.close()
        ctx.term()


def test_sends_of_one_turn_share_one_events_check_and_every_reply_arrives() -> None:
    checks, got = asyncio.run(_echo_burst(50))
    assert sorted(got) == sorted(b"re:%d" % i for i in range(50))
    # one check after the burst of sends (and one per later write wake-up, if any): not 50
    assert 1 <= checks < 5, checks
