"""A loopback TCP proxy that a test can cut (a database outage), black-hole (a database that stops
answering without closing anything) and restore on the same port."""

from __future__ import annotations

import socket
import threading

from tests.server import free_port


class CuttableProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        self.host, self.target_port = host, target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._blackholed = threading.Event()

    def __enter__(self) -> "CuttableProxy":
        return self.restore()

    def __exit__(self, *_) -> None:
        self.cut()

    def restore(self) -> "CuttableProxy":
        """Forward again: after a cut, listen again; after a black hole, pass bytes on again (the
        connections that sat through it stay open)."""
        self._blackholed.clear()
        if self._listener is not None:
            return self
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        """Refuse new connections and drop every open one, as a database host that goes away."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, set()
        for sock in [listener, *connections]:
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def blackhole(self) -> None:
        """Keep accepting connections and keep every open one open, but forward nothing in either
        direction (bytes are read and dropped, as packets lost on the way): no answer, no error,
        no close, as a database host that vanished from the network."""
        self._blackholed.set()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                upstream = socket.create_connection((self.host, self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._connections.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self._blackholed.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._connections.discard(source)
            self._connections.discard(sink)
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
