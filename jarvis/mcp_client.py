"""MCP tool servers as this worker reaches them: the official `mcp` SDK on one native thread with its own
asyncio loop, handed work from the gevent hub and waited for without ever blocking it.

The SDK is asyncio; the worker is gevent, monkey-patched. Measured: the SDK's own `stdio_client` fails
on a native thread of a patched process (`TypeError: child watchers are only available on the default
loop`: asyncio's subprocess goes through gevent's patched spawn, which registers a libev child watcher
from that thread). So the stdio transport here is Jarvis's own, about forty lines: the server is
spawned with the original `os.posix_spawnp`, its pipes are read and written by asyncio on a
`SelectorEventLoop` over the original epoll selector, each line parsed as the SDK's does, the child
reaped with the original `waitpid`; the SDK's `ClientSession` runs on top. Against mcp-server-time,
with both cores loaded: 13.2 ms a call, and a greenlet ticking every 5 ms on the hub never waited over
16.3 ms. A server started here gets EOF on its stdin when the worker dies, even by `kill -9`.

The hub hands a coroutine to the loop (`asyncio.run_coroutine_threadsafe`) and waits on a gevent Event
that a libev async watcher sets when the future is done, as the embedded model hands back its tokens.
A greenlet killed while it waits (a Stop) cancels the call: the SDK then sends the server
`notifications/cancelled`, and a server that does not answer a ping within CANCEL_GRACE_SECONDS after
it (stuck in the tool it was asked to drop) is stopped and started afresh at the next call. Progress
notifications come back to the hub through the same async watcher.

Servers are started lazily, at the first request that needs their tools, and again after they died.
Streamable HTTP servers are reached with the SDK's own transport (httpx on this loop, through the
patched process's sockets in non-blocking mode, which asyncio drives itself), their configured headers
on every request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
from contextlib import asynccontextmanager

import anyio
import gevent
import gevent.event
from flask import Blueprint, jsonify
from gevent import monkey
from gevent.threadpool import ThreadPool

from jarvis import state
from jarvis.errors import ToolError
from jarvis.tools_config import ToolServer

log = logging.getLogger(__name__)

_START_SECONDS = 30.0  # a server that has not listed its tools by then is unavailable
_LINE_BYTES = 16 * 1024 * 1024  # one JSON-RPC message from a server, at most
CANCEL_GRACE_SECONDS = 5.0


class ToolServers:
    """The configured servers, reached from this worker."""

    def __init__(self, servers: tuple[ToolServer, ...]):
        self.servers = {server.name: _Server(server) for server in servers}
        if servers:
            # Imported here, on the hub, when the app is built: imported on the loop's thread at the first
            # start, the SDK's modules (pydantic models) paused the hub for 59 ms; imported first, the
            # longest pause while a server started and was called was 11 ms (a 5 ms ticker's view).
            import mcp.client.session  # noqa: F401
            import mcp.client.stdio  # noqa: F401
            import mcp.shared.message  # noqa: F401
            import mcp.types  # noqa: F401
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool: ThreadPool | None = None

    def _start_loop(self) -> asyncio.AbstractEventLoop:
        if self.loop is None:
            epoll_selector, = monkey.get_original("selectors", ["EpollSelector"])
            self.loop = _Loop(epoll_selector())
            self.pool = ThreadPool(1)
            self.pool.spawn(self.loop.run_forever)
        return self.loop

    def run(self, coroutine, timeout: float, on_wake=None):
        """Run `coroutine` on the loop's thread; its result here, the hub serving meanwhile. TimeoutError
        after `timeout` seconds; the coroutine is cancelled when that happens or when this greenlet is killed.
        `coroutine` may be a function of `wake` (thread-safe: the hub then calls `on_wake`), which it uses to
        hand on news before its end (a tool's progress)."""
        done = gevent.event.Event()
        watcher = gevent.get_hub().loop.async_()

        def woken():
            if on_wake is not None:
                on_wake()
            if future.done():
                done.set()

        watcher.start(woken)
        try:
            if callable(coroutine):
                coroutine = coroutine(watcher.send)
            future = asyncio.run_coroutine_threadsafe(coroutine, self._start_loop())
            future.add_done_callback(lambda _: watcher.send())
            if not done.wait(timeout):
                raise TimeoutError
            return future.result()
        except BaseException:
            if "future" in locals():
                future.cancel()
            raise
        finally:
            watcher.stop()
            watcher.close()

    def status(self, names: list[str] | None = None, timeout: float = _START_SECONDS) -> list[dict]:
        """Each server (or those `names`d), started if it is not (all at once): {name, transport, enabled,
        available, error, tools: [{name, description, parameters}]}."""
        servers = [server for name, server in self.servers.items() if names is None or name in names]

        async def ready_all():
            await asyncio.gather(*(server.ready() for server in servers))

        if servers:
            try:
                self.run(ready_all(), timeout + 1)
            except TimeoutError:
                pass
        return [server.describe() for server in servers]

    def call(self, server_name: str, tool: str, arguments: dict, timeout: float | None = None,
             on_progress=None) -> dict:
        """Call a tool: {"text": its content as text, "is_error": bool}. ToolError when it cannot be called.
        `on_progress(progress, total, message)` is called here (on the hub) for each progress notification."""
        server = self.servers.get(server_name)
        if server is None:
            raise ToolError(f"No tool server named {server_name!r}")
        limit = server.config.timeout_seconds if timeout is None else timeout
        news: collections.deque = collections.deque(maxlen=100)  # appended on the loop's thread

        def handed_on():
            while news:
                on_progress(*news.popleft())

        def calling(wake):
            async def progress(value, total, message):
                news.append((value, total, message))
                wake()
            return server.call(tool, arguments, progress if on_progress is not None else None)

        try:
            return self.run(calling, limit, handed_on if on_progress is not None else None)
        except TimeoutError:
            raise ToolError(f"The tool {tool!r} did not answer within {limit:g} s") from None

    def close(self) -> None:
        """Stop every server and the loop's thread (an app thrown away, as in tests)."""
        if self.loop is None:
            return
        try:
            self.run(_stop_all(list(self.servers.values())), 10)
        except Exception:
            log.warning("stopping the tool servers failed", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.pool.join()
        self.pool.kill()
        self.loop.close()
        self.loop = None


class _Loop(asyncio.SelectorEventLoop):
    """The loop of the tool servers' thread. asyncio resolves names in its default executor, whose threads are
    gevent's greenlets in a patched worker and never run on this thread (measured: a Streamable HTTP server
    named `localhost` timed out connecting, `127.0.0.1` worked); here the original resolver answers on this
    thread (a slow DNS delays the tool servers' traffic, never the hub)."""

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):  # noqa: A002 (asyncio's names)
        return _RESOLVE(host, port, family, type, proto, flags)


_RESOLVE, = monkey.get_original("socket", ["getaddrinfo"])


async def _stop_all(servers: list[_Server]) -> None:
    await asyncio.gather(*(server.stop() for server in servers), return_exceptions=True)


class _Server:
    """One server, on the loop's thread: its session while it runs, what it lists, why it is unavailable."""

    def __init__(self, config: ToolServer):
        self.config = config
        self.session = None
        self.tools: list = []
        self.error: str | None = None
        self.task: asyncio.Task | None = None
        self.stopping: asyncio.Event | None = None
        self.connected: asyncio.Event | None = None

    def describe(self) -> dict:
        return {"name": self.config.name, "transport": self.config.transport, "enabled": self.config.enabled,
                "available": self.session is not None, "error": None if self.session is not None else self.error,
                "tools": [{"name": tool.name, "description": tool.description or "",
                           "parameters": tool.input_schema} for tool in self.tools] if self.session else []}

    async def ready(self) -> None:
        """Started and listing its tools, or unavailable with a reason."""
        if self.task is not None and not self.task.done() and self.stopping.is_set():
            await asyncio.wait([self.task], timeout=10)  # it is going away (it died, or ignored a cancel)
        if self.task is None or self.task.done():
            self.connected, self.stopping = asyncio.Event(), asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._run())
        try:
            await asyncio.wait_for(self.connected.wait(), _START_SECONDS)
        except TimeoutError:
            self.error = f"did not list its tools within {_START_SECONDS:g} s"

    async def _run(self) -> None:
        from mcp import ClientSession

        try:
            transport = _stdio(self.config, self.stopping.set) if self.config.transport == "stdio" else \
                _http(self.config)
            async with transport as (read, write), ClientSession(read, write, message_handler=self._heard) as session:
                await session.initialize()
                await self._list(session)
                self.session, self.error = session, None
                log.info("tool server %s: %d tools", self.config.name, len(self.tools))
                self.connected.set()
                await self.stopping.wait()
        except Exception as error:  # a server that cannot start, or that died: unavailable, saying why
            self.error = _reason(error)
            log.warning("tool server %s is unavailable: %s", self.config.name, self.error)
        finally:
            self.session = None
            self.connected.set()

    async def _list(self, session) -> None:
        listed = (await session.list_tools()).tools
        allowed = self.config.tools
        self.tools = [tool for tool in listed if allowed is None or tool.name in allowed]

    async def _heard(self, message) -> None:
        """A server's notification: its tool list changed (read it again, for the next answers' offers)."""
        if getattr(message, "method", None) == "notifications/tools/list_changed" and self.session is not None:
            session = self.session

            async def relist():
                try:
                    await self._list(session)
                    log.info("tool server %s: its tools changed, now %d", self.config.name, len(self.tools))
                except Exception as error:
                    log.warning("tool server %s: reading its changed tools failed (%s)", self.config.name,
                                _reason(error))

            asyncio.get_running_loop().create_task(relist())

    async def call(self, tool: str, arguments: dict, progress=None) -> dict:
        await self.ready()
        session = self.session
        if session is None:
            raise ToolError(f"The tool server {self.config.name!r} is unavailable: {self.error}")
        if not any(known.name == tool for known in self.tools):
            raise ToolError(f"The tool server {self.config.name!r} has no tool {tool!r}")
        try:
            result = await session.call_tool(tool, arguments, progress_callback=progress)
        except asyncio.CancelledError:  # a Stop: the SDK has sent notifications/cancelled
            asyncio.get_running_loop().create_task(self._check_after_cancel(session))
            raise
        except Exception as error:
            if self.stopping is not None:
                self.stopping.set()  # (a server whose connection failed is started again next time)
            raise ToolError(f"The tool {tool!r} failed: {_reason(error)}") from None
        text = "\n".join(block.text if getattr(block, "type", None) == "text" else f"[{block.type} content]"
                         for block in result.content)
        return {"text": text, "is_error": bool(result.is_error)}

    async def _check_after_cancel(self, session) -> None:
        """A server that does not answer a ping within CANCEL_GRACE_SECONDS of a cancelled call (one that ignores
        the cancellation and is stuck in the tool) is stopped, and started afresh at the next call."""
        try:
            await asyncio.wait_for(session.send_ping(), CANCEL_GRACE_SECONDS)
        except Exception as error:
            if self.session is session and self.stopping is not None:
                log.warning("tool server %s did not answer within %g s of a cancelled call (%s): restarting it",
                            self.config.name, CANCEL_GRACE_SECONDS, _reason(error))
                self.stopping.set()

    async def stop(self) -> None:
        if self.stopping is not None:
            self.stopping.set()
        if self.task is not None:
            await asyncio.wait([self.task], timeout=5)


def _reason(error: BaseException) -> str:
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"[:300]


@asynccontextmanager
async def _stdio(config: ToolServer, ended):
    """The SDK's stdio transport, without gevent's patched spawn: (read stream, write stream) of the
    server's JSON-RPC messages, one per line. `ended()` is called when the server closes its output (it
    exited, or crashed): the session ends then, not at the next call."""
    from mcp import types
    from mcp.client.stdio import get_default_environment
    from mcp.shared.message import SessionMessage

    spawn, = monkey.get_original("os", ["posix_spawnp"])
    waitpid, = monkey.get_original("os", ["waitpid"])
    argv = list(config.command)
    if config.cwd:
        argv = ["env", "-C", os.path.expanduser(config.cwd), "--", *argv]
    child_in, to_child = os.pipe()
    from_child, child_out = os.pipe()
    try:
        pid = spawn(argv[0], argv, {**get_default_environment(), **config.env}, file_actions=[
            (os.POSIX_SPAWN_DUP2, child_in, 0), (os.POSIX_SPAWN_DUP2, child_out, 1)])
    except OSError:
        for fd in (child_in, to_child, from_child, child_out):
            os.close(fd)
        raise
    os.close(child_in)
    os.close(child_out)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_LINE_BYTES)
    read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                     os.fdopen(from_child, "rb", 0))
    write_transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(to_child, "wb", 0))
    incoming_writer, incoming = anyio.create_memory_object_stream(0)
    outgoing, outgoing_reader = anyio.create_memory_object_stream(0)

    async def read() -> None:
        async with incoming_writer:
            while line := await reader.readline():
                try:
                    message = SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
                except ValueError as error:
                    await incoming_writer.send(error)
                    continue
                await incoming_writer.send(message)
        ended()

    async def write() -> None:
        async with outgoing_reader:
            async for message in outgoing_reader:
                write_transport.write(message.message.model_dump_json(by_alias=True, exclude_unset=True).encode()
                                      + b"\n")

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(read)
            tasks.start_soon(write)
            try:
                yield incoming, outgoing
            finally:
                tasks.cancel_scope.cancel()
    finally:
        write_transport.close()  # the server reads EOF and exits
        read_transport.close()
        await _reap(pid, waitpid)


@asynccontextmanager
async def _http(config: ToolServer):
    """The SDK's Streamable HTTP transport, with the server's headers (its secrets) on every request."""
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async with create_mcp_http_client(headers=config.headers) as client, \
            streamable_http_client(config.url, http_client=client) as streams:
        yield streams


async def _reap(pid: int, waitpid) -> None:
    """Wait up to 5 s for the server to exit after its stdin closed, then kill it; reap it. (Polled on the
    loop: an executor's threads are gevent's greenlets in a patched worker, and would never run here.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while loop.time() < deadline:
        try:
            done, _ = waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # reaped elsewhere (libev's SIGCHLD handler reaps any child once it watches one)
        if done:
            return
        await asyncio.sleep(0.05)
    log.warning("a tool server (pid %d) did not exit within 5 s of its stdin closing: killed", pid)
    try:
        os.kill(pid, signal.SIGKILL)
        waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


# -- GET /api/tools: the servers and their tools, as the page's settings will list them --------------------

bp = Blueprint("tools", __name__, url_prefix="/api/tools")


@bp.get("")
def list_tools():
    """Every configured tool server (started now if it is not), whether it is available, and its tools."""
    return jsonify(data=state.tool_servers().status())
