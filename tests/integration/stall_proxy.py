"""A TCP proxy in front of a real service that can hold back the service's replies while the
connections stay open: what a client sees when a response is lost or a node stalls without
closing anything (no reset, no refused connection, nothing for the client's error paths)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from types import TracebackType


class StallProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; ``stall()`` holds every reply from the
    service until ``release()`` sends what was held, in order, on each connection."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._stalled = False
        self._held: dict[socket.socket, list[bytes]] = {}
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="stall-proxy", daemon=True).start()

    def stall(self) -> None:
        with self._lock:
            self._stalled = True

    def release(self) -> None:
        with self._lock:
            self._stalled = False
            for client, held in self._held.items():
                with contextlib.suppress(OSError):  # a client that has gone meanwhile
                    for data in held:
                        client.sendall(data)
                held.clear()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets = [self._listener, *self._sockets]
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.upstream)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
                self._held[client] = []
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._replies, args=(server, client), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        self._pump(client, lambda data: server.sendall(data))

    def _replies(self, server: socket.socket, client: socket.socket) -> None:
        def forward(data: bytes) -> None:
            with self._lock:
                if self._stalled:
                    self._held[client].append(data)
                else:
                    client.sendall(data)

        self._pump(server, forward)

    @staticmethod
    def _pump(source: socket.socket, forward: Callable[[bytes], None]) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                forward(data)
            except OSError:
                return

    def __enter__(self) -> StallProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
