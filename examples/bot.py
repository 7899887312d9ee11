"""A chatd bot on chatd.client: answers ``!time``, ``!echo <text>`` and ``!help``.

    make run                                   # the daemon, in another terminal
    python examples/bot.py                     # joins lobby at ws://127.0.0.1:9000/
    python examples/bot.py --url ws://127.0.0.1:9000/ --nick timebot --room tea --room lobby

With ``--auth token`` on the daemon, give it a token (``python -m chatd.token
--sub timebot --rooms '*=rw'`` makes one for development) with ``--token``
or in ``CHATD_TOKEN``. It needs ``websockets`` (``pip install chatd[client]``).

It reconnects by itself (the daemon restarted, the network dropped) and
answers each command once: chatd.client re-joins with ``since`` and filters
duplicates, and the bot skips the history a first join brings (old commands
were answered by whoever was there). Stop it with Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # chatd from this checkout

from chatd.client import Client, Event

HELP = "commands: !time (the server's UTC time), !echo <text>, !help"


def answer(text: str) -> str | None:
    """The bot's answer to a message's text, or None."""
    command, _, rest = text.strip().partition(" ")
    if command == "!time":
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if command == "!echo":
        return rest.strip() or "(nothing to echo)"
    if command == "!help":
        return HELP
    return None


async def run(args: argparse.Namespace) -> None:
    token = args.token or os.environ.get("CHATD_TOKEN") or None
    client = Client(args.url, nick=None if token else args.nick, token=token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def show_state(ev: Event) -> None:
        logging.info("state: %s", {k: v for k, v in ev.items() if k != "type"})

    client.on("state", show_state)
    events = client.events(["message"])
    await client.connect()
    for room in args.room:
        await client.join(room)
        logging.info("joined %s as %s", room, client.nick)
    if args.ready:
        print("ready", flush=True)  # for tests/test_client.py

    async def serve() -> None:
        async for m in events:
            if m.get("kind") or m.get("from") == client.nick:
                continue  # edits, reactions, and the bot's own lines
            reply = answer(m.get("text", ""))
            if reply is not None:
                try:
                    await client.send(m["room"], reply)
                except Exception as e:
                    logging.warning("could not answer in %s: %s", m["room"], e)

    server = asyncio.create_task(serve())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([server, stopping], return_when=asyncio.FIRST_COMPLETED)
    await client.close()
    server.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await server
    stopping.cancel()
    logging.info("closed: %s", client.close_reason)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="ws://127.0.0.1:9000/")
    p.add_argument("--nick", default="bot")
    p.add_argument("--token", help="a connection token (docs/AUTH.md); or CHATD_TOKEN")
    p.add_argument("--room", action="append", help="a room to join (repeat; default lobby)")
    p.add_argument("--ready", action="store_true", help="print 'ready' once joined")
    args = p.parse_args()
    args.room = args.room or ["lobby"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bot: %(message)s")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
