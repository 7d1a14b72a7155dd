"""The control API's wire format: length-prefixed msgpack frames. The codec is pure.

A frame is a 4-byte big-endian length, then that many bytes of msgpack (a map). Frames
larger than ``MAX_FRAME`` are refused before any byte of them is buffered.

A call is one connection: the client sends ``{"method": str, "params": map}``; the agent
answers with zero or more ``{"event": map}`` frames (progress of a pull) and then one
``{"result": ...}`` or ``{"error": {"title", "message", "exit_code"}}`` frame.
"""

from __future__ import annotations

import re
import socket
import struct

import msgpack

from agent.errors import ProtocolError, RemoteError, ShoalError, error_class

MAX_FRAME = 1024 * 1024
_METHOD = re.compile(r"[a-z_]{1,64}")
_HEADER = struct.Struct(">I")


def encode_frame(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Feed bytes, get whole messages. Bounded: never holds more than one frame."""

    def __init__(self, max_frame: int = MAX_FRAME):
        self._buffer = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[dict]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self._max:
                raise ProtocolError(f"frame of {length} bytes exceeds the {self._max}-byte limit")
            if len(self._buffer) < _HEADER.size + length:
                break
            body = bytes(self._buffer[_HEADER.size:_HEADER.size + length])
            del self._buffer[:_HEADER.size + length]
            try:
                message = msgpack.unpackb(body, raw=False, strict_map_key=True)
            except Exception as e:  # msgpack raises several unrelated types on bad input
                raise ProtocolError(f"frame is not valid msgpack ({type(e).__name__})") from e
            if not isinstance(message, dict):
                raise ProtocolError("a frame must hold a map")
            messages.append(message)
        return messages

    @property
    def pending(self) -> int:
        return len(self._buffer)


def check_call(message: dict) -> tuple[str, dict]:
    """Validate a call frame; return (method, params)."""
    method, params = message.get("method"), message.get("params", {})
    if not isinstance(method, str) or not _METHOD.fullmatch(method):
        raise ProtocolError("a call needs a 'method': a name of lowercase letters and '_' (at most 64)")
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise ProtocolError("'params' must be a map with string keys")
    return method, params


def error_frame(error: BaseException) -> dict:
    if isinstance(error, ShoalError):
        return {"error": {"title": error.title, "message": str(error), "exit_code": error.exit_code,
                          "type": type(error).__name__, "transient": bool(getattr(error, "transient", False))}}
    return {"error": {"title": "Agent error", "message": f"{type(error).__name__}: {error}",
                      "exit_code": 1, "type": type(error).__name__}}


# ------------------------------------------------------------------ blocking client side

class ControlClient:
    """A blocking client for one call (the CLI's side). ``timeout`` bounds every read."""

    def __init__(self, path: str, *, timeout: float = 30.0):
        self.path, self.timeout = path, timeout

    def call(self, method: str, params: dict | None = None, *, on_event=None, timeout: float | None = None):
        """Send one call; feed each event to ``on_event``; return the result or raise."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            sock.connect(self.path)
            sock.sendall(encode_frame({"method": method, "params": params or {}}))
            decoder = FrameDecoder()
            while True:
                data = sock.recv(256 * 1024)
                if not data:
                    raise ProtocolError("the agent closed the connection without an answer; "
                                        "see its log (journalctl -u shoal-agent)")
                for message in decoder.feed(data):
                    if "event" in message:
                        if on_event is not None:
                            on_event(message["event"])
                    elif "error" in message:
                        raise remote_error(message["error"])
                    elif "result" in message:
                        return message["result"]
        finally:
            sock.close()


def remote_error(error: dict) -> ShoalError:
    """The agent's error as its own class (``NotFound``, ``DiskFull``, ...) when this client
    knows it, else a ``RemoteError``; title and exit code as the agent gave them."""
    title, message = str(error.get("title", "Agent error")), str(error.get("message", ""))
    try:
        exit_code = int(error.get("exit_code", 1))
    except (TypeError, ValueError):
        exit_code = 1
    cls = error_class(str(error.get("type", "")))
    if cls is None:
        return RemoteError(title, message, exit_code)
    remote = cls.__new__(cls)
    Exception.__init__(remote, message)  # past the subclass's own signature
    remote.title, remote.exit_code = title, exit_code
    remote.transient = bool(error.get("transient", False))
    return remote
