"""The official openai SDK works against Jarvis: the current release, and 1.x in its own environment."""

import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

pytestmark = [pytest.mark.live, pytest.mark.shared_servers]

OPENAI_1X = "openai>=1.109,<2"


@pytest.fixture
def client(jarvis):
    with openai.OpenAI(base_url=jarvis.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_sdk_streams_text_and_usage(client, upstream):
    stream = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"x_fault": {"tokens": 4}})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "w0 w1 w2 w3 "
    assert chunks[-1].usage.completion_tokens == 4
    assert upstream.chats[0].body["stream_options"] == {"include_usage": True}


def test_sdk_accumulates_a_streamed_tool_call(client):
    call = {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}
    with client.chat.completions.create(model="gpt-4.1-mini", messages=[{"role": "user", "content": "weather?"}],
                                        stream=True, tools=[{"type": "function", "function": {"name": "get_weather"}}],
                                        extra_body={"x_fault": {"shape": "openai", "tokens": 0,
                                                                "tool_call": call}}) as stream:
        chunks = list(stream)
    pieces = [tool for chunk in chunks if chunk.choices for tool in chunk.choices[0].delta.tool_calls or []]
    assert (pieces[0].id, pieces[0].type, pieces[0].function.name) == ("call_fake_0001", "function", "get_weather")
    assert "".join(piece.function.arguments or "" for piece in pieces) == call["arguments"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(chunk.usage is None for chunk in chunks)  # not asked for, not sent


@pytest.mark.parametrize("shape, field", [("llamacpp", "reasoning_content"), ("deepseek", "reasoning_content"),
                                          ("vllm", "reasoning"), ("ollama", "reasoning")])
def test_sdk_sees_reasoning_fields_as_the_upstream_sent_them(client, shape, field):
    with client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                        extra_body={"x_fault": {"shape": shape, "reasoning_tokens": 3,
                                                                "tokens": 2}}) as stream:
        deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    assert "".join(getattr(delta, field, None) or "" for delta in deltas) == "r0 r1 r2 "
    assert "".join(delta.content or "" for delta in deltas) == "w0 w1 "


def test_sdk_raises_api_error_on_a_mid_stream_error(client):
    stream = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, extra_body={"x_fault": {"tokens": 5,
                                                                                 "error_event_after": 2}})
    with pytest.raises(openai.APIError, match="the model crashed"):
        list(stream)


def test_sdk_raises_api_error_when_the_upstream_stalls(start_jarvis):
    jarvis = start_jarvis({"JARVIS_STREAM_INACTIVITY_SECONDS": "1", "JARVIS_HEARTBEAT_SECONDS": "0.3"})
    with openai.OpenAI(base_url=jarvis.url + "/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                stream=True, extra_body={"x_fault": {"stall_after": 1}})
        with pytest.raises(openai.APIError, match="JARVIS_STREAM_INACTIVITY_SECONDS"):
            list(stream)


def test_sdk_raises_bad_request_on_an_upstream_400(client):
    body = {"error": {"message": "bad model", "type": "invalid_request_error", "param": "model", "code": None}}
    with pytest.raises(openai.BadRequestError, match="bad model"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], stream=True,
                                       extra_body={"x_fault": {"status": 400, "error_body": body}})


def test_sdk_non_streaming(client):
    completion = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                                extra_body={"x_fault": {"tokens": 2}})
    assert completion.choices[0].message.content == "w0 w1 "


def openai_1x_path() -> Path:
    """openai 1.x installed into its own folder (cached), so it can run beside the current release."""
    target = Path(os.environ.get("JARVIS_TEST_CACHE", Path.home() / ".cache" / "jarvis-tests")) / "openai-1x"
    if not (target / "openai").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--target", str(target), OPENAI_1X], check=True, timeout=300)
    return target


SCRIPT_1X = """
import sys, openai
assert openai.__version__.startswith("1."), openai.__version__
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                        extra_body={"x_fault": {"tokens": 3}})
print("text=" + "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
try:
    list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                        extra_body={"x_fault": {"tokens": 3, "error_event_after": 1}}))
except openai.APIError as error:
    print("api_error=" + error.message)
print("version=" + openai.__version__)
"""


@pytest.mark.timeout(400)
def test_openai_sdk_1x_streams_and_raises(jarvis):
    target = openai_1x_path()
    result = subprocess.run([sys.executable, "-c", SCRIPT_1X, jarvis.url + "/v1"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr
    assert "text=w0 w1 w2 " in result.stdout
    assert "api_error=the model crashed" in result.stdout
    assert "version=1." in result.stdout
