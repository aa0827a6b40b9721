"""A streamed response's chunks written on the event loop as each engine step's outputs arrive, without waking the
response's handler.

Per streamed chunk the usual way costs the HTTP thread a task wake-up, three async generators, the response's loop
and four middleware `send` wrappers before uvicorn writes the bytes: about 15 us of Python with the GIL held, on top
of the ~10 us socket write, and on a small CPU the engine waits for all of it (docs/benchmarks.md). While a handler
is idle, waiting for its request's next output, everything it has sent is already on the connection, so that output
can be rendered by the handler's own (synchronous) renderer and framed straight onto uvicorn's transport from the
callback that delivers the step: one callback per step for every stream. The handler still sends, through ASGI,
the response's start, what it has before its first wait (chat's role chunk), any output that arrives while it is
busy, the final output, usage and the end; a stream whose connection is paused (a slow reader), closed or not served
by uvicorn's httptools protocol takes the usual way, output by output (and so does every stream under
--no-direct-writes).

The ordering rule lives here, in `DirectWriter`: the engine offers it every unfinished output (AsyncEngine.generate's
`on_output`), and it writes one only while the handler is parked and nothing has been handed to the handler since.

The writer reads and writes uvicorn's private `RequestResponseCycle` state, so pyproject.toml caps uvicorn below the
next minor version after the ones it is tested on (`uvicorn>=0.29,<0.56`: tests/server/test_direct.py passes on
0.29.0 and 0.55.0). Raise the cap only after tests/server/test_direct.py passes on the new version. The check in `ChunkWriter.of` stays: a uvicorn whose protocol no
longer keeps that state gets every chunk the ASGI way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dsserve.engine.engine import RequestOutput

try:  # uvicorn's HTTP/1.1 protocol on httptools (the one `dsserve serve` runs when httptools is installed)
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle as _Cycle
except ImportError:  # pragma: no cover - httptools is a dependency; other servers take the ASGI way
    _Cycle = None

SEND_KEY = "dsserve.send"  # the server's own ASGI `send`, put in the scope by `expose_send`
# What the writer reads of uvicorn's RequestResponseCycle (the same since well before uvicorn 0.29; tested on 0.55;
# checked per request, so that a uvicorn that changes them falls back to the ASGI way rather than failing streams)
_STATE = ("response_started", "chunked_encoding", "response_complete", "disconnected", "flow", "transport")


def expose_send(app):
    """Wrap the ASGI app so that a handler can find the server's own `send` (middleware hands it wrapped ones)."""
    async def app_with_send(scope, receive, send) -> None:
        scope[SEND_KEY] = send
        await app(scope, receive, send)

    return app_with_send


class ChunkWriter:
    """Writes body chunks of one started, chunked HTTP/1.1 response to uvicorn's transport, framed as uvicorn frames
    them; `write` refuses (False) whenever uvicorn's own `send` would not write at once."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: Any):
        self._cycle = cycle

    @classmethod
    def of(cls, scope: dict) -> ChunkWriter | None:
        """The writer for this request's connection, or None when it is not served by uvicorn's httptools protocol
        (or by a uvicorn whose protocol no longer keeps the state this writer reads: then every chunk takes the ASGI
        way, as under any other server)."""
        cycle = getattr(scope.get(SEND_KEY), "__self__", None)
        if _Cycle is None or not isinstance(cycle, _Cycle):
            return None
        if not all(hasattr(cycle, name) for name in _STATE) or not hasattr(cycle.flow, "write_paused"):
            return None
        return cls(cycle)

    def ready(self) -> bool:
        c = self._cycle
        return (c.response_started and c.chunked_encoding and not c.response_complete and not c.disconnected
                and not c.flow.write_paused)

    def write(self, data: bytes) -> None:
        self._cycle.transport.write(b"%x\r\n%b\r\n" % (len(data), data))


class DirectWriter:
    """One streamed response's direct writes: `take` is its `on_output` (AsyncEngine.generate), which renders an
    output with the handler's renderer and writes it to the connection, or returns False to hand it to the handler.

    It writes only while `is_parked`: the handler waits for its next output (common.results sets the flag around that
    wait), so everything it sent is on the wire, and no output has been handed to it since it parked. Once one is
    (the connection could not take it), every later output goes the same way until the handler has taken it and
    parked again: a direct write must never overtake a chunk the handler has still to send."""

    __slots__ = ("_writer", "_render", "is_parked")

    def __init__(self, writer: ChunkWriter, render: Callable[[RequestOutput], bytes]):
        self._writer = writer
        self._render = render
        self.is_parked = False

    @classmethod
    def of(cls, scope: dict, render: Callable[[RequestOutput], bytes]) -> DirectWriter | None:
        """None when the response is not served by uvicorn's httptools protocol (tests' ASGI clients, other servers)."""
        writer = ChunkWriter.of(scope)
        return None if writer is None else cls(writer, render)

    def take(self, output: RequestOutput) -> bool:
        """The `on_output`: True when the output was written, False to hand it to the handler."""
        if not self.is_parked:
            return False
        if not self._writer.ready():
            self.is_parked = False  # the handler gets this one: nothing may be written before it sends it
            return False
        data = self._render(output)
        if data:
            self._writer.write(data)
        return True
