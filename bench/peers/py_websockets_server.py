"""Broadcast peer for bench/run.py on the `websockets` library (asyncio).

Every message goes to every client, sender included, with ``websockets.broadcast()``
(the library's documented fan-out: one frame encoding, no awaiting per client).
No compression, no pings, backlog 4096.

    python bench/peers/py_websockets_server.py [port]    (0 or none: any free port)
"""

from __future__ import annotations

import asyncio
import sys

import websockets
from websockets.asyncio.server import ServerConnection, serve

clients: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    clients.add(ws)
    try:
        async for message in ws:
            websockets.broadcast(clients, message)
    except websockets.ConnectionClosed:
        pass
    finally:
        clients.discard(ws)


async def main(port: int) -> None:
    async with serve(
        handler,
        "127.0.0.1",
        port,
        compression=None,
        ping_interval=None,
        backlog=4096,
    ) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"listening on {bound}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
