"""The tool loop in a page's answer (jarvis.tool_loop), in-process: the model (the scripted fake backend) asks
for tools, real MCP servers answer (mcp-server-time from PyPI, and tests/mcp_test_server.py, built on the
official SDK), and the run goes on, saves every step and re-sends them as history."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from jarvis.tools_config import ToolServer
from tests.clients import data_of, sse
from tests.fake_backend import STALL, Pause, upstream_like_chunks
from tests.live import wait_until
from tests.net import free_port
from tests.npm_servers import everything_command
from tests.test_conversations import settle

TIME_SERVER = (sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC")


def test_server(notes) -> tuple[str, ...]:
    return (sys.executable, "-m", "tests.mcp_test_server", str(notes))


test_server.__test__ = False  # (a helper, not a test)


def calls(*pairs) -> list:
    """A model's step that asks for these tools ((name, arguments), ...), in OpenAI's streamed shape."""
    return upstream_like_chunks("openai", tokens=2, tool_calls=[
        {"name": name, "arguments": json.dumps(arguments)} for name, arguments in pairs])


@pytest.fixture(scope="module")
def shared_servers(tmp_path_factory):
    """mcp-server-time as "time" and the SDK-built test server as "test", running for the module's tests (each
    start of a Python MCP server costs about a second of CPU); a test reads only the notes it caused."""
    from jarvis.mcp_client import ToolServers

    notes = tmp_path_factory.mktemp("tools") / "notes"
    notes.touch()
    servers = ToolServers((ToolServer("time", command=TIME_SERVER),
                           ToolServer("test", command=test_server(notes), timeout_seconds=30)))
    servers.notes = notes
    yield servers
    servers.close()


@pytest.fixture
def tools_client(make_app, shared_servers):
    """An app with tool servers: the module's two (no arguments), or its own (closed after the test)."""
    own = []

    def make(*servers: ToolServer, **overrides):
        from jarvis.mcp_client import ToolServers

        tools = shared_servers
        if servers:
            tools = ToolServers(servers)
            own.append(tools)
        client = make_app(tool_servers=tools, **overrides).test_client()
        client.notes = shared_servers.notes
        client.notes_at = len(shared_servers.notes.read_text())
        return client

    yield make
    for tools in own:
        tools.close()


def new_notes(client) -> str:
    """What the test server noted since this client was made."""
    return client.notes.read_text()[client.notes_at:]


def send(client, conversation_id=None, content="What time is it?", **settings):
    if conversation_id is None:
        conversation_id = client.post("/api/conversations", json={"settings": settings} if settings else {}).json["id"]
    response = client.post(f"/api/conversations/{conversation_id}/messages", json={"content": content})
    assert response.status_code == 200, response.get_data()
    return conversation_id, response


def read_until(response, marker: bytes):
    """The response's body, read up to the chunk that holds `marker`; the rest, still to read."""
    body = iter(response.response)
    for chunk in body:
        if marker in chunk:
            return body
    raise AssertionError(f"{marker!r} never came")


def stop_and_finish(client, conversation_id, rest) -> bytes:
    """Stop the conversation's answer; what its stream said after that."""
    assert client.post(f"/api/conversations/{conversation_id}/stop").status_code == 202
    return b"".join(rest)


def page_events(response) -> list[dict]:
    return data_of(sse(response.get_data()))


def saved(client, conversation_id) -> dict:
    conversation = settle(lambda: (got := client.get(f"/api/conversations/{conversation_id}").json)
                          and not got["running"] and got, 10)
    return conversation["messages"][-1]


def test_a_tool_call_runs_on_the_real_server_and_the_model_gets_its_result_then_answers(tools_client, backend):
    client = tools_client()
    backend.enqueue(calls(("get_current_time", {"timezone": "UTC"})), ["It is ", "noon."])
    conversation_id, response = send(client)
    events = page_events(response)

    offered = {tool["function"]["name"]: tool for tool in backend.requests[0].body["tools"]}
    assert {"get_current_time", "convert_time", "wait", "crash", "big", "stuck"} <= set(offered)
    assert offered["get_current_time"]["function"]["parameters"]["properties"]["timezone"]
    # The page saw the model write its call (OpenAI's delta.tool_calls), the step, the result, the answer.
    streamed = "".join(piece["function"].get("arguments", "") for event in events for choice in event["choices"]
                       for piece in choice["delta"].get("tool_calls", ()))
    assert json.loads(streamed) == {"timezone": "UTC"}
    [step] = [event["tool_step"] for event in events if "tool_step" in event]
    [result] = [event["tool_result"] for event in events if "tool_result" in event]
    assert step["calls"][0]["name"] == "get_current_time" and step["calls"][0]["server"] == "time"
    assert step["at"] == len("w0 w1 ")  # the text before the call
    assert result["id"] == "call_fake_0001" and not result["is_error"] and '"timezone": "UTC"' in result["content"]
    assert events[-1]["status"] == "complete"
    # The second request: the assistant's call, then the tool's real output under the call's id.
    assistant, tool = backend.requests[1].body["messages"][-2:]
    assert assistant == {"role": "assistant", "content": "w0 w1 ", "tool_calls": [
        {"id": "call_fake_0001", "type": "function",
         "function": {"name": "get_current_time", "arguments": '{"timezone": "UTC"}'}}]}
    assert tool == {"role": "tool", "tool_call_id": "call_fake_0001", "content": result["content"]}
    # All of it saved, and re-sent as history on the next turn.
    message = saved(client, conversation_id)
    assert message["content"] == "w0 w1 It is noon." and message["status"] == "complete"
    [saved_step] = message["tools"]
    assert saved_step["at"] == 6 and saved_step["calls"][0]["result"] == result["content"]
    backend.enqueue(["Later."])
    send(client, conversation_id, "And now?")[1].get_data()
    history = backend.requests[-1].body["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant", "user"]
    assert history[1:4] == [assistant, tool, {"role": "assistant", "content": "It is noon."}]
    assert "tools" in backend.requests[-1].body  # still offered


def test_two_calls_in_one_step_run_at_once(tools_client, backend):
    client = tools_client()
    backend.enqueue(calls(("wait", {"seconds": 1.0}), ("wait", {"seconds": 1.0})), ["Done."])
    started = time.monotonic()
    _, response = send(client)
    arrivals = {}
    for event in response.response:
        for payload in data_of(sse(event)):
            if "tool_step" in payload:
                step_at = time.monotonic()
            if "tool_result" in payload:
                arrivals[payload["tool_result"]["id"]] = (time.monotonic(), payload["tool_result"]["duration_ms"])
    assert len(arrivals) == 2 and time.monotonic() - started < 60
    wall = max(at for at, _ in arrivals.values()) - step_at
    each = sum(duration for _, duration in arrivals.values()) / 1000
    # One after the other, the wall time would be the sum of the two calls (each >= 1 s); at once, the longer.
    assert wall < 0.75 * each, (wall, each)


def test_stop_while_a_tool_runs_cancels_it_on_the_server_and_the_next_message_works(tools_client, backend):
    client = tools_client()
    backend.enqueue(calls(("wait", {"seconds": 30})))
    conversation_id, response = send(client)
    body = read_until(response, b"tool_step")
    wait_until(lambda: "started wait" in new_notes(client), 30, "the tool never started")
    stopped_at = time.monotonic()
    rest = stop_and_finish(client, conversation_id, body)
    took = time.monotonic() - stopped_at
    assert b'"status": "stopped"' in rest and rest.endswith(b"data: [DONE]\n\n")
    wait_until(lambda: "cancelled wait" in new_notes(client), 10, "the server never heard of the Stop")
    assert "finished wait" not in new_notes(client)
    message = saved(client, conversation_id)
    assert message["status"] == "stopped" and message["tools"][0]["calls"][0]["result"] is None
    # A Stop takes ~10 ms here; 5 s is far from it, and far below the 30 s the tool would have run.
    assert took < 5, took
    # The next message works, on the same server, and its history gives the cancelled call a result.
    backend.enqueue(calls(("wait", {"seconds": 0.1})), ["Now done."])
    _, response = send(client, conversation_id, "Try again")
    events = page_events(response)
    assert events[-1]["status"] == "complete"
    assert [e["tool_result"]["content"] for e in events if "tool_result" in e][0].startswith("waited")
    history = backend.requests[1].body["messages"]
    assert history[2]["role"] == "tool" and "cancelled" in history[2]["content"]


def test_a_server_that_crashes_mid_call_is_an_error_the_model_sees_and_the_run_goes_on(tools_client, backend):
    client = tools_client()
    backend.enqueue(calls(("crash", {})), ["Sorry, it broke."],
                    calls(("big", {"size": 3})), ["Fine."])
    conversation_id, response = send(client)
    events = page_events(response)
    [result] = [event["tool_result"] for event in events if "tool_result" in event]
    assert result["is_error"] and "crash" in result["content"]
    assert backend.requests[1].body["messages"][-1]["content"] == result["content"]
    assert events[-1]["status"] == "complete" and saved(client, conversation_id)["content"].endswith("it broke.")
    events = page_events(send(client, conversation_id, "Again")[1])  # the server is started afresh
    assert [e["tool_result"] for e in events if "tool_result" in e][0]["content"] == "xxx"


def test_a_model_that_calls_tools_forever_is_stopped_after_jarvis_max_tool_steps(tools_client, backend):
    client = tools_client(max_tool_steps=2)
    step = calls(("big", {"size": 1}))
    backend.enqueue(step, step, step, step)
    conversation_id, response = send(client)
    events = sse(response.get_data())
    assert events[-1] == ("done", None) and events[-2][1]["error"]["code"] == "too_many_tool_steps"
    assert len(backend.requests) == 3  # two rounds of tools, then the third ask ended it
    message = saved(client, conversation_id)
    assert message["status"] == "error" and "JARVIS_MAX_TOOL_STEPS" in message["error"]
    assert len(message["tools"]) == 2 and message["content"] == "w0 w1 " * 3


def test_a_huge_result_is_cut_with_a_note_and_bad_calls_are_errors_the_model_sees(tools_client, backend):
    client = tools_client(tool_result_max_bytes=1024)
    backend.enqueue(calls(("big", {"size": 300_000}), ("no_such_tool", {}), ("big", "not an object")), ["ok"])
    _, response = send(client)
    results = [event["tool_result"] for event in page_events(response) if "tool_result" in event]
    by_id = {result["id"]: result for result in results}
    big, unknown, bad = (by_id[f"call_fake_000{n}"] for n in (1, 2, 3))
    assert big["content"].startswith("x" * 1024) and "JARVIS_TOOL_RESULT_MAX_BYTES" in big["content"]
    assert len(big["content"]) < 1200 and not big["is_error"]
    assert unknown["is_error"] and "no tool named 'no_such_tool'" in unknown["content"]
    assert bad["is_error"] and "JSON object" in bad["content"]
    sent = [m["content"] for m in backend.requests[1].body["messages"] if m["role"] == "tool"]
    assert sent == [big["content"], unknown["content"], bad["content"]]


def test_a_conversations_switches_choose_its_tools_over_the_servers_defaults(tools_client, backend):
    client = tools_client(ToolServer("time", command=TIME_SERVER),
                          ToolServer("off", command=TIME_SERVER, enabled=False))
    backend.enqueue(["a"], ["b"], ["c"])
    send(client)[1].get_data()
    assert {tool["function"]["name"] for tool in backend.requests[-1].body["tools"]} == \
        {"get_current_time", "convert_time"}  # the disabled server's tools are not offered (nor started)
    send(client, tools={"time/convert_time": False, "off/get_current_time": True})[1].get_data()
    assert {tool["function"]["name"] for tool in backend.requests[-1].body["tools"]} == \
        {"time__get_current_time", "off__get_current_time"}  # two servers share a name: prefixed
    send(client, tools={"time/get_current_time": False, "time/convert_time": False})[1].get_data()
    assert "tools" not in backend.requests[-1].body  # nothing on: a plain request
    refused = client.post("/api/conversations", json={"settings": {"tools": {"time/x": "yes"}}})
    assert refused.status_code == 400 and refused.json["error"]["param"] == "tools"


def test_answers_with_tool_steps_export_import_and_are_not_continued(tools_client, backend):
    client = tools_client()
    backend.enqueue(calls(("big", {"size": 2})), ["Two x."])
    conversation_id, response = send(client)
    response.get_data()
    exported = client.get(f"/api/conversations/{conversation_id}/export").json
    [answer] = [m for m in exported["conversations"][0]["messages"] if m["role"] == "assistant"]
    assert answer["tools"][0]["calls"][0]["result"] == "xx"
    imported = client.post("/api/conversations/import", json=exported).json["data"][0]
    assert saved(client, imported)["tools"] == saved(client, conversation_id)["tools"]
    markdown = client.get(f"/api/conversations/{conversation_id}/export?format=markdown").get_data(as_text=True)
    assert "**Tool `big`**" in markdown and "```text\nxx\n```" in markdown
    exported["conversations"][0]["messages"][1]["tools"][0]["calls"][0]["is_error"] = "no"
    refused = client.post("/api/conversations/import", json=exported)
    assert refused.status_code == 400 and "is_error" in refused.json["error"]["message"]
    # An answer that called tools is answered again, not continued.
    client.put(f"/api/conversations/{conversation_id}", json={})
    message_id = saved(client, conversation_id)["id"]
    refused = client.post(f"/api/conversations/{conversation_id}/messages", json={"continue": message_id})
    assert refused.status_code == 400


def test_progress_notifications_reach_the_page_while_the_tool_runs(tools_client, backend):
    client = tools_client()
    backend.enqueue(calls(("wait", {"seconds": 0.5})), [Pause(0), "ok"])
    _, response = send(client)
    events = page_events(response)
    progress = [event["tool_progress"] for event in events if "tool_progress" in event]
    assert progress and progress[-1]["total"] == 5 and progress[-1]["message"] == "waited 5 of 5"
    assert all(p["id"] == "call_fake_0001" for p in progress)


def test_stop_while_the_model_writes_after_a_tool_keeps_the_step_and_the_text(tools_client, backend):
    client = tools_client()
    backend.enqueue(calls(("big", {"size": 2})), ["After the tool ", STALL])
    conversation_id, response = send(client)
    body = read_until(response, b"After the tool")
    assert b'"status": "stopped"' in stop_and_finish(client, conversation_id, body)
    assert backend.generations[1].aborted.is_set()  # the second step's stream was cancelled at its source
    message = saved(client, conversation_id)
    assert message["status"] == "stopped" and message["content"] == "w0 w1 After the tool "
    assert message["tools"][0]["calls"][0]["result"] == "xx"


def test_a_streamable_http_server_serves_the_loop_as_a_stdio_one_does(tools_client, backend, tmp_path):
    port = free_port()
    server = subprocess.Popen([*test_server(tmp_path / "http-notes"), str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port), 30, lambda: "the HTTP tool server never listened")
        client = tools_client(ToolServer("remote", url=f"http://localhost:{port}/mcp",
                                         headers={"Authorization": "Bearer not-logged"}))
        backend.enqueue(calls(("wait", {"seconds": 0.3})), ["ok"])
        _, response = send(client)
        events = page_events(response)
        [result] = [event["tool_result"] for event in events if "tool_result" in event]
        assert not result["is_error"] and result["content"].startswith("waited 0.3")
        progress = [event["tool_progress"] for event in events if "tool_progress" in event]
        assert progress and progress[-1]["progress"] == progress[-1]["total"]
        listed = client.get("/api/tools").json["data"]
        assert listed[0]["transport"] == "http" and listed[0]["available"]
    finally:
        server.kill()
        server.wait()


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.long(20)  # (its first run installs the server from npm: about 12 s)
def test_the_reference_server_from_npm_answers_in_the_loop_with_progress_and_stops(tools_client, backend):
    client = tools_client(ToolServer("everything", command=everything_command()))
    backend.enqueue(calls(("get-sum", {"a": 2, "b": 3}), ("trigger-long-running-operation", {"duration": 1,
                                                                                           "steps": 4})),
                    ["ok"])
    conversation_id, response = send(client)
    events = page_events(response)
    results = {event["tool_result"]["id"]: event["tool_result"] for event in events if "tool_result" in event}
    assert "5" in results["call_fake_0001"]["content"] and not results["call_fake_0001"]["is_error"]
    assert "completed" in results["call_fake_0002"]["content"].lower()
    progress = [event["tool_progress"] for event in events if "tool_progress" in event]
    assert [p["progress"] for p in progress] == [1, 2, 3, 4] and progress[-1]["total"] == 4
    # Stop in a long operation: the run ends stopped, and the server still answers the next call.
    backend.enqueue(calls(("trigger-long-running-operation", {"duration": 60, "steps": 60})))
    _, response = send(client, conversation_id, "Again, longer")
    body = read_until(response, b"tool_progress")
    assert b'"status": "stopped"' in stop_and_finish(client, conversation_id, body)
    backend.enqueue(calls(("echo", {"message": "still here"})), ["ok"])
    events = page_events(send(client, conversation_id, "Echo")[1])
    assert "still here" in [event["tool_result"] for event in events if "tool_result" in event][0]["content"]


def test_a_servers_changed_tool_list_is_read_again_and_offered_in_the_next_answer(tools_client, backend):
    client = tools_client()
    backend.enqueue(calls(("learn", {"name": "fresh_tool"})), ["learned"], ["next"])
    conversation_id, response = send(client)
    assert "learned fresh_tool" in [e["tool_result"] for e in page_events(response) if "tool_result" in e][0]["content"]
    assert "fresh_tool" not in {tool["function"]["name"] for tool in backend.requests[0].body["tools"]}

    def listed():
        test = next(server for server in client.get("/api/tools").json["data"] if server["name"] == "test")
        return "fresh_tool" in {tool["name"] for tool in test["tools"]}

    settle(listed, 10, lambda: "the changed tool list was never read")  # (on notifications/tools/list_changed)
    send(client, conversation_id, "Again")[1].get_data()
    assert "fresh_tool" in {tool["function"]["name"] for tool in backend.requests[-1].body["tools"]}


def test_nobody_watching_a_loop_for_detached_seconds_stops_it_inside_a_tool(tools_client, backend):
    client = tools_client(detached_seconds=0.3)
    backend.enqueue(calls(("wait", {"seconds": 30})))
    conversation_id, response = send(client)
    read_until(response, b"tool_step")
    response.close()  # the page leaves while the tool runs
    message = settle(lambda: (m := saved(client, conversation_id))["status"] == "stopped" and m, 10)
    assert "JARVIS_DETACHED_SECONDS" in message["error"] and message["tools"][0]["calls"][0]["result"] is None
    wait_until(lambda: "cancelled wait" in new_notes(client), 10, "the tool was not cancelled")


@pytest.mark.long(10)  # (mostly waiting: the stuck server is reaped after 5 s)
def test_a_server_stuck_in_a_tool_it_cannot_drop_is_restarted_after_a_stop(tools_client, backend, jarvis_log,
                                                                          monkeypatch):
    from jarvis import mcp_client

    monkeypatch.setattr(mcp_client, "CANCEL_GRACE_SECONDS", 0.5)  # (5 s in a worker)
    client = tools_client()
    backend.enqueue(calls(("stuck", {"seconds": 90})))
    conversation_id, response = send(client)
    body = read_until(response, b"tool_step")
    wait_until(lambda: "started stuck" in new_notes(client), 30, "the tool never started")
    assert b'"status": "stopped"' in stop_and_finish(client, conversation_id, body)
    wait_until(lambda: any("restarting it" in line for line in jarvis_log.messages()), 10,
               lambda: "the stuck server was never given up")
    # The next call is answered by a server started afresh, long before the stuck one would have woken (90 s
    # after it started): 1-2 s here, 17.5 s in a half-speed parallel phase (a Python MCP server's start is
    # 1.3 CPU-s of importing the SDK, with a quarter of a core), so the limit is 3x that; a client that waits
    # for the stuck server gets the tool's 30 s timeout instead. (Stuck 20 s, limit 15: half speed failed it.)
    backend.enqueue(calls(("big", {"size": 2})), ["ok"])
    started = time.monotonic()
    events = page_events(send(client, conversation_id, "Again")[1])
    assert [e["tool_result"]["content"] for e in events if "tool_result" in e] == ["xx"]
    assert time.monotonic() - started < 55, "the next call waited for the stuck server"
    assert "finished stuck" not in new_notes(client)
