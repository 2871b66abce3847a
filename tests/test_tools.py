"""Tools over MCP: JARVIS_TOOLS_FILE (jarvis.tools_config) and the client that starts and calls the servers
(jarvis.mcp_client), against a real MCP server from PyPI (mcp-server-time, stdio). The tool loop in a page's
answer: tests/test_tool_loop.py."""

from __future__ import annotations

import sys
import time

import psutil
import pytest
import requests

from jarvis.mcp_client import ToolError, ToolServers
from jarvis.settings import Settings, SettingsError
from jarvis.tools_config import ToolsError, ToolServer, load
from tests.hub import hub_gaps
from tests.live import blocked_hub_reports, wait_until

TIME_SERVER = (sys.executable, "-m", "mcp_server_time")


def write(tmp_path, text: str) -> str:
    path = tmp_path / "tools.toml"
    path.write_text(text)
    return str(path)


def test_a_tools_file_declares_stdio_and_http_servers_with_secrets_from_the_environment_or_a_file(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("Bearer from-a-file\n")
    path = write(tmp_path, f'''
[[mcp]]
name = "time"
command = ["uvx", "mcp-server-time"]
env = {{ TZ = "UTC" }}
tools = ["get_current_time"]
timeout_seconds = 5

[[mcp]]
name = "search"
url = "https://tools.example.org/mcp"
enabled = false
headers_env = {{ Authorization = "SEARCH_AUTH" }}
headers_file = {{ X-Other = "{secret}" }}
''')
    time_server, search = load(path, {"SEARCH_AUTH": "Bearer from-the-env"})
    assert (time_server.transport, time_server.command, time_server.env, time_server.tools,
            time_server.timeout_seconds, time_server.enabled) == \
        ("stdio", ("uvx", "mcp-server-time"), {"TZ": "UTC"}, ("get_current_time",), 5.0, True)
    assert (search.transport, search.enabled, search.headers) == \
        ("http", False, {"Authorization": "Bearer from-the-env", "X-Other": "Bearer from-a-file"})
    assert "from-the-env" not in repr(search)  # secrets stay out of reprs (and so out of logs)
    assert load(write(tmp_path, ""), {}) == ()


@pytest.mark.parametrize(("text", "named"), [
    ('[[mcp]]\nname = "a"\n', "set 'command'"),
    ('[[mcp]]\nname = "a"\ncommand = ["x"]\nurl = "http://h/mcp"\n', "set 'command'"),
    ('[[mcp]]\nname = "a b"\ncommand = ["x"]\n', "'name'"),
    ('[[mcp]]\nname = "a"\ncommand = "x --y"\n', "'command' must be a list"),
    ('[[mcp]]\nname = "a"\ncommand = ["x"]\nheaders = { A = "b" }\n', "'headers' is for a server reached by 'url'"),
    ('[[mcp]]\nname = "a"\nurl = "ftp://h/mcp"\n', "'url' must be an http"),
    ('[[mcp]]\nname = "a"\nurl = "http://h/mcp"\nheaders_env = { A = "UNSET_VARIABLE" }\n', "'UNSET_VARIABLE'"),
    ('[[mcp]]\nname = "a"\ncommand = ["x"]\ntimeout_seconds = 0\n', "'timeout_seconds'"),
    ('[[mcp]]\nname = "a"\ncommand = ["x"]\nenabeld = true\n', "unknown key 'enabeld'"),
    ('[[mcp]]\nname = "a"\ncommand = ["x"]\n[[mcp]]\nname = "a"\ncommand = ["y"]\n', "used twice"),
    ('[[tool]]\nname = "a"\n', "unknown top-level key 'tool'"),
    ('[[mcp]\n', "not valid TOML"),
])
def test_a_bad_tools_file_stops_start_up_naming_the_file_the_table_and_the_key(tmp_path, text, named):
    path = write(tmp_path, text)
    with pytest.raises(ToolsError, match="tools.toml") as refused:
        load(path, {})
    assert named in str(refused.value)
    with pytest.raises(SettingsError, match=named):  # and through the settings
        Settings.from_env({"JARVIS_TOOLS_FILE": path, "JARVIS_DATA_DIR": str(tmp_path / "data")})


@pytest.fixture
def servers():
    made = []

    def make(*configs: ToolServer) -> ToolServers:
        made.append(ToolServers(configs))
        return made[-1]

    yield make
    for tool_servers in made:
        tool_servers.close()


def test_a_real_stdio_server_lists_and_answers_its_tools_and_the_hub_keeps_running(servers):
    tools = servers(ToolServer("time", command=TIME_SERVER), ToolServer("clock", command=TIME_SERVER,
                                                                         tools=("convert_time",)))
    started = time.monotonic()
    with hub_gaps() as gaps:  # what the hub does meanwhile: a 5 ms repeating timer, noting how far apart it ticks
        listed = {server["name"]: server for server in tools.status()}
        answer = tools.call("time", "get_current_time", {"timezone": "UTC"})
        bad = tools.call("time", "get_current_time", {"timezone": "Nowhere/At_All"})
    took = time.monotonic() - started
    assert listed["time"]["available"] and listed["time"]["transport"] == "stdio"
    assert {tool["name"] for tool in listed["time"]["tools"]} == {"get_current_time", "convert_time"}
    assert "timezone" in listed["time"]["tools"][0]["parameters"]["properties"]
    assert [tool["name"] for tool in listed["clock"]["tools"]] == ["convert_time"]  # its allow-list
    assert answer["is_error"] is False and '"timezone": "UTC"' in answer["text"]
    assert bad["is_error"] is True and "Nowhere/At_All" in bad["text"]  # the tool's own error, for the model
    with pytest.raises(ToolError, match="no tool 'get_current_time'"):
        tools.call("clock", "get_current_time", {"timezone": "UTC"})  # not on its allow-list
    # A hub blocked by the client would stop the ticker for the whole start of the two Python servers,
    # most of `took` (1-3 s here); the longest gap measured on a busy 2-core machine was 11 ms. Judged
    # against the same run's time, so that a machine slow enough to delay a ticking process passes too.
    assert len(gaps) > 10 and max(gaps) < took / 3, (max(gaps), took)


def test_a_server_that_cannot_start_is_unavailable_saying_why_and_the_others_work(servers):
    tools = servers(ToolServer("broken", command=("/nonexistent/mcp-server",)),
                    ToolServer("remote", url="http://127.0.0.1:9/mcp"), ToolServer("time", command=TIME_SERVER))
    listed = {server["name"]: server for server in tools.status()}
    assert not listed["broken"]["available"] and "No such file" in listed["broken"]["error"]
    assert not listed["remote"]["available"] and "ConnectError" in listed["remote"]["error"], listed["remote"]
    assert listed["time"]["available"]
    with pytest.raises(ToolError, match="'broken' is unavailable"):
        tools.call("broken", "anything", {})
    assert not tools.call("time", "get_current_time", {"timezone": "UTC"})["is_error"]


@pytest.mark.live
@pytest.mark.long(7)
def test_the_worker_starts_its_tool_servers_lazily_lists_them_and_a_kill_9_leaves_no_orphan(tmp_path, start_jarvis):
    path = write(tmp_path, f'''
[[mcp]]
name = "time"
command = {list(TIME_SERVER)!r}

[[mcp]]
name = "broken"
command = ["/nonexistent/mcp-server"]
'''.replace("'", '"'))
    # A start that blocks the hub holds it for the whole start (about 1 s; broken on purpose by waiting
    # for the asyncio future with the unpatched time.sleep instead of the gevent event: reported, fails).
    # 0.5 s, not 50 ms: at half speed in the parallel phase a starved worker was once reported "blocked"
    # for 50 ms inside a socket send of microseconds.
    jarvis = start_jarvis({"JARVIS_TOOLS_FILE": path, "GEVENT_MAX_BLOCKING_TIME": "0.5"})
    worker = jarvis.worker()
    assert [child.name() for child in worker.children()] == []  # nothing started before it is needed
    listed = {server["name"]: server for server in requests.get(jarvis.url + "/api/tools", timeout=60).json()["data"]}
    assert listed["time"]["available"] and {tool["name"] for tool in listed["time"]["tools"]} == \
        {"get_current_time", "convert_time"}
    assert not listed["broken"]["available"] and "No such file" in listed["broken"]["error"]
    assert requests.get(jarvis.url + "/healthz", timeout=5).ok
    [child] = worker.children()  # the time server, a child of the worker (a gevent-patched process)
    reports = blocked_hub_reports(jarvis.log())
    assert reports == [], reports[0][:3000]
    jarvis.stop()  # SIGKILL to the worker: the server reads EOF on its stdin and exits
    wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10,
               lambda: "the tool server outlived its worker")
