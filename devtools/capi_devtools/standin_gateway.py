#!/usr/bin/env python
"""Forward TCP connections from the compose network to the stand-in bound on loopback.

``liveramp_standin.py`` binds to loopback only, on purpose. In ``docker compose --profile
standin`` the workers run in other containers, so the stand-in's container runs this forwarder
beside it: ``--listen 0.0.0.0:8080 --target 127.0.0.1:8099``. No host port is published: only
containers of the compose project reach it. Only stdlib.
"""

from __future__ import annotations

import argparse
import asyncio


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def _serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))

    server = await asyncio.start_server(handle, *listen)
    print(f"standin-gateway forwarding {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}", flush=True)
    async with server:
        await server.serve_forever()


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, default=("0.0.0.0", 8080))  # noqa: S104 - the point of it
    parser.add_argument("--target", type=_address, default=("127.0.0.1", 8099))
    args = parser.parse_args()
    asyncio.run(_serve(args.listen, args.target))


if __name__ == "__main__":
    main()
