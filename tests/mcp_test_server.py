"""A real MCP server (the official SDK's MCPServer, stdio) with the tools the tool-loop tests need that
mcp-server-time lacks: a slow tool that reports progress and notes its own cancellation, one that ignores
cancellation, one that kills its server mid-call, and a big result.

    python -m tests.mcp_test_server NOTES_FILE            (stdio)
    python -m tests.mcp_test_server NOTES_FILE PORT       (Streamable HTTP on 127.0.0.1:PORT/mcp)

Each line of NOTES_FILE is something the server saw: "started <tool> <seconds>", "cancelled <tool>",
"finished <tool>" — how a test learns that a cancellation reached the server.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("jarvis-test")
NOTES = sys.argv[1] if len(sys.argv) > 1 else os.devnull


def note(line: str) -> None:
    with open(NOTES, "a") as file:
        file.write(line + "\n")


@server.tool()
async def wait(seconds: float, ctx: Context) -> str:
    """Wait this many seconds, reporting progress every 0.1 s; then say how long it waited."""
    note(f"started wait {seconds}")
    started = time.monotonic()
    try:
        steps = max(1, int(seconds / 0.1))
        for step in range(steps):
            await asyncio.sleep(seconds / steps)
            await ctx.report_progress(step + 1, steps, f"waited {step + 1} of {steps}")
    except asyncio.CancelledError:
        note("cancelled wait")
        raise
    note("finished wait")
    return f"waited {time.monotonic() - started:.2f} s"


@server.tool()
async def stuck(seconds: float) -> str:
    """Block the whole server for this many seconds (a tool that cannot be cancelled: it holds the server's event
    loop, so nothing else is answered meanwhile — not a cancellation, not a ping)."""
    note(f"started stuck {seconds}")
    time.sleep(seconds)  # (on purpose: the blocking this tool is for)
    note("finished stuck")
    return "unstuck"


@server.tool()
def crash() -> str:
    """Kill this server in the middle of the call."""
    note("started crash")
    os._exit(3)


@server.tool()
async def learn(name: str, ctx: Context) -> str:
    """Add a tool called `name` (it answers "I am <name>") and tell the client its tool list changed."""
    def learned() -> str:
        return f"I am {name}"

    server.add_tool(learned, name=name, description=f"Says it is {name}")
    await ctx.request_context.session.send_tool_list_changed()
    return f"learned {name}"


@server.tool()
def big(size: int) -> str:
    """A result of `size` characters."""
    return "x" * size


if __name__ == "__main__":
    if len(sys.argv) > 2:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
