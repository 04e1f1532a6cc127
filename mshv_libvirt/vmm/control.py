"""The control socket: JSON lines over a UNIX stream socket (protocol in docs/DESIGN.md).

Request  ``{"id": 1, "cmd": "status"}``
Reply    ``{"id": 1, "ok": true, "result": {...}}`` or ``{"id": 1, "ok": false, "error": "..."}``
Event    ``{"event": "paused", ...}`` pushed to every connected client.

The server is driven by the VMM's selector loop and never blocks: each client has an input and an
output buffer. Clients come and go freely (the daemon may be killed and reconnect); a client that
stops reading is dropped once it has a megabyte of unread output rather than stalling the VMM.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
from collections.abc import Callable
from typing import Any

MAX_LINE = 64 * 1024
MAX_PENDING_OUTPUT = 1 << 20

JsonObject = dict[str, Any]


class CommandError(Exception):
    """A request failed; the message is sent back as the reply's "error"."""


Handler = Callable[[str, JsonObject], JsonObject]


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""


class ControlServer:
    def __init__(
        self, path: str, handler: Handler, selector: selectors.BaseSelector, *, listen_fd: int | None = None
    ) -> None:
        """Listen on ``path``, or on ``listen_fd``: a socket the daemon bound there (it owns the path then)."""
        self.path = path
        self._handler = handler
        self._selector = selector
        self._clients: dict[int, _Client] = {}
        self._owns_path = listen_fd is None
        if listen_fd is not None:
            self._sock = socket.socket(fileno=listen_fd)
            self._sock.setblocking(False)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale socket from a previous VMM of this domain
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._sock.bind(path)
                os.chmod(path, 0o600)
                self._sock.listen(8)
                self._sock.setblocking(False)
            except BaseException:
                self._sock.close()
                raise
        selector.register(self._sock, selectors.EVENT_READ, self._accept)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def _accept(self, _mask: int) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        client = _Client(conn)
        self._clients[conn.fileno()] = client
        self._selector.register(conn, selectors.EVENT_READ, lambda mask: self._service(client, mask))

    def _service(self, client: _Client, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = client.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._drop(client)
                return
            if data:
                client.inbuf += data
                self._process_lines(client)
        if mask & selectors.EVENT_WRITE:
            self._flush(client)

    def _process_lines(self, client: _Client) -> None:
        while b"\n" in client.inbuf:
            line, client.inbuf = client.inbuf.split(b"\n", 1)
            if line.strip():
                self._send(client, self.dispatch_line(line))
        if len(client.inbuf) > MAX_LINE:
            self._send(client, {"id": None, "ok": False, "error": "request line too long"})
            self._drop(client)

    def dispatch_line(self, line: bytes) -> JsonObject:
        """Parse one request line and run it through the handler (pure apart from the handler)."""
        try:
            request = json.loads(line)
        except ValueError as err:
            return {"id": None, "ok": False, "error": f"invalid request: {err}"}
        if not isinstance(request, dict):
            return {"id": None, "ok": False, "error": "invalid request: not a JSON object"}
        req_id = request.get("id")
        cmd = request.get("cmd")
        if not isinstance(cmd, str):
            return {"id": req_id, "ok": False, "error": "invalid request: 'cmd' must be a string"}
        try:
            result = self._handler(cmd, request)
        except CommandError as err:
            return {"id": req_id, "ok": False, "error": str(err)}
        return {"id": req_id, "ok": True, "result": result}

    def broadcast(self, event: JsonObject) -> None:
        for client in list(self._clients.values()):
            self._send(client, event)

    def _send(self, client: _Client, message: JsonObject) -> None:
        if client.sock.fileno() not in self._clients:
            return
        client.outbuf += json.dumps(message, separators=(",", ":")).encode() + b"\n"
        if len(client.outbuf) > MAX_PENDING_OUTPUT:
            self._drop(client)
            return
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.outbuf)
            client.outbuf = client.outbuf[sent:]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(client)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outbuf else 0)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(client.sock, events, lambda mask: self._service(client, mask))

    def flush_all(self, timeout: float = 1.0) -> None:
        """Best effort: push pending replies/events out before the process exits."""
        for client in list(self._clients.values()):
            if client.outbuf:
                try:
                    client.sock.settimeout(timeout)
                    client.sock.sendall(client.outbuf)
                    client.outbuf = b""
                except OSError:
                    pass

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd in self._clients:
            del self._clients[fd]
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(client.sock)
        client.sock.close()

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._sock)
        self._sock.close()
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
