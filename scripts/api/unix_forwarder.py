#!/usr/bin/env python3
"""Carries TCP connections on 127.0.0.1:PORT to a Unix socket, byte for byte, so tools that
only speak TCP (schemathesis's CLI, wrk) reach Hostvisor's API socket. Usage: PORT SOCKET"""
import asyncio
import sys


async def pump(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def handle(client_reader, client_writer, path):
    try:
        server_reader, server_writer = await asyncio.open_unix_connection(path)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pump(client_reader, server_writer), pump(server_reader, client_writer))


async def main(port, path):
    server = await asyncio.start_server(lambda r, w: handle(r, w, path), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
