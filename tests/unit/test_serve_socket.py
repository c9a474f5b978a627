"""The listening socket `bitblend serve` binds: accepted connections must get TCP_NODELAY.

asyncio (and so uvicorn) sets TCP_NODELAY on an accepted connection only when the socket
says proto == IPPROTO_TCP; a socket made with the default proto 0 left Nagle on, and every
response on a keep-alive connection waited ~40 ms for the client's delayed ACK (batch-1
p50 60 ms through the server for a 13 ms forward, docs/serving.md).
"""

from __future__ import annotations

import asyncio
import socket

from bitblend.serve.server import bind


def _accepted_nodelay(sock: socket.socket) -> int:
    """TCP_NODELAY of the server side of one connection accepted by asyncio on `sock`."""

    async def main() -> int:
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            got.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(got, 10)
        writer.close()
        server.close()
        await server.wait_closed()
        return value

    return asyncio.run(main())


def test_connections_accepted_on_the_serve_socket_have_tcp_nodelay() -> None:
    sock = bind("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    assert _accepted_nodelay(sock) != 0


def test_a_proto_zero_socket_is_what_left_nagle_on() -> None:
    # The cause, kept visible: the same server on a socket made with the default proto.
    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    plain.bind(("127.0.0.1", 0))
    plain.listen(8)
    assert _accepted_nodelay(plain) == 0
