"""An answer on its way to the page: every real upstream's shape becomes the same page chunks and stats."""

import json

import pytest

from jarvis.answer import Answer
from tests.clients import page_text
from tests.upstream_shapes import answer_chunks

SHAPES = ["plain", "llamacpp", "vllm", "ollama", "deepseek", "openai", "think", "think_close"]
PAGE_DELTA_FIELDS = {"role", "content", "reasoning_content", "content_was_reasoning"}


def feed(shape: str, reasoning_tokens=3, tokens=2, asked_usage=False, step=0.05):
    """Run a shape's whole stream through an Answer, one chunk per `step` seconds of a fake clock."""
    answer = Answer(started=100.0)
    clock = 100.0
    page = []
    for _, chunk in answer_chunks(shape, reasoning_tokens=reasoning_tokens, tokens=tokens, asked_usage=asked_usage):
        clock += step
        page.append(answer.add(json.loads(json.dumps(chunk)), now=clock))
    page.extend(answer.finish(now=clock))
    return answer, page


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_reaches_the_page_as_reasoning_then_content(shape):
    answer, page = feed(shape)
    assert (answer.reasoning, answer.content) == ("r0 r1 r2 ", "w0 w1 ")
    assert page_text(page) == ("r0 r1 r2 ", "w0 w1 ")
    assert not any("<think>" in json.dumps(chunk) or "</think>" in json.dumps(chunk) for chunk in page)


@pytest.mark.parametrize("shape", SHAPES)
def test_page_chunks_carry_only_known_fields(shape):
    _, page = feed(shape, asked_usage=True)
    for chunk in page:
        assert set(chunk) <= {"object", "id", "created", "model", "choices", "stats"}, chunk
        for choice in chunk["choices"]:
            assert set(choice) == {"index", "delta", "finish_reason"}
            assert set(choice["delta"]) <= PAGE_DELTA_FIELDS, choice
    assert not any("usage" in chunk for chunk in page)


def test_a_lone_closing_tag_moves_the_content_to_reasoning_once():
    _, page = feed("think_close")
    moves = [choice for chunk in page for choice in chunk["choices"] if choice["delta"].get("content_was_reasoning")]
    assert len(moves) == 1


@pytest.mark.parametrize("shape,asked_usage,source", [
    ("openai", True, "usage"), ("vllm", True, "usage"), ("deepseek", True, "usage"), ("ollama", True, "usage"),
    ("llamacpp", False, "timings"), ("plain", False, "stream"), ("think", False, "stream")])
def test_token_counts_come_from_the_upstream_when_it_sends_them(shape, asked_usage, source):
    answer, page = feed(shape, reasoning_tokens=4, tokens=6, asked_usage=asked_usage)
    stats = page[-1]["stats"]
    assert (stats["completion_tokens"], stats["tokens_source"]) == (10, source)
    assert answer.stats(now=200.0)["completion_tokens"] == 10


def test_stats_timings_from_the_request_start():
    answer = Answer(started=10.0)
    answer.add({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, now=10.1)
    answer.add({"choices": [{"delta": {"reasoning_content": "hm"}}]}, now=10.5)  # first token
    answer.add({"choices": [{"delta": {"reasoning_content": "m"}}]}, now=11.0)
    answer.add({"choices": [{"delta": {"content": "Yes"}}]}, now=12.5)  # the answer starts
    answer.add({"choices": [{"delta": {"content": "."}, "finish_reason": "stop"}]}, now=13.0)
    stats = answer.stats(now=13.2)
    assert stats == {"ttft_ms": 500.0, "thinking_ms": 2000.0, "duration_ms": 3200.0, "completion_tokens": 4,
                     "tokens_source": "stream", "prompt_tokens": None, "tokens_per_second": 1.2,
                     "finish_reason": "stop"}


def test_llamacpp_timings_give_the_servers_own_speed():
    _, page = feed("llamacpp")
    assert page[-1]["stats"]["tokens_per_second"] == 25.0 and page[-1]["stats"]["prompt_tokens"] == 3


def test_a_burst_has_no_speed_and_an_answer_without_thinking_has_no_thinking_time():
    answer, page = feed("plain", reasoning_tokens=0, tokens=5, step=0.0)
    assert page[-1]["stats"]["tokens_per_second"] is None and page[-1]["stats"]["thinking_ms"] is None


def test_a_thought_that_never_ends_counts_thinking_until_the_last_token():
    answer = Answer(started=0.0)
    answer.add({"choices": [{"delta": {"content": "<think>a"}}]}, now=1.0)
    answer.add({"choices": [{"delta": {"content": "b</thi"}}]}, now=3.0)
    assert answer.finish(now=4.0)[0]["choices"][0]["delta"] == {"reasoning_content": "</thi"}
    assert answer.reasoning == "ab</thi" and answer.stats(now=4.0)["thinking_ms"] == 2000.0


@pytest.mark.parametrize("chunk", [None, [], "x", {"choices": "no"}, {"choices": [None, 5]},
                                   {"choices": [{"delta": "x"}]}, {"usage": {"completion_tokens": True}},
                                   {"timings": {"predicted_per_second": "fast"}}])
def test_hostile_chunks_never_raise(chunk):
    answer = Answer(started=0.0)
    answer.add(chunk, now=1.0)
    assert answer.finish(now=2.0)[-1]["stats"]["completion_tokens"] is None
