"""The thinking splitter: every shape of streamed reasoning becomes (reasoning, content), split anywhere."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jarvis.reasoning import ThinkingSplitter


def replay(deltas: list[dict]) -> tuple[str, str, int]:
    """What a reader of the splits ends up showing: (reasoning, content, how often content moved)."""
    splitter = ThinkingSplitter()
    reasoning, content, moves = "", "", 0
    for split in [*map(splitter.split, deltas), splitter.finish()]:
        if split.content_was_reasoning:
            reasoning, content, moves = reasoning + content, "", moves + 1
        reasoning += split.reasoning
        content += split.content
    return reasoning, content, moves


def content_deltas(*pieces: str) -> list[dict]:
    return [{"content": piece} for piece in pieces]


def every_two_way_split(text: str):
    for offset in range(len(text) + 1):
        yield text[:offset], text[offset:]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_fields_are_reasoning(field):
    deltas = [{"role": "assistant", "content": ""}, {field: "Let me "}, {field: "see."},
              {"content": "Four."}]
    assert replay(deltas) == ("Let me see.", "Four.", 0)


def test_deepseek_null_content_beside_reasoning():
    deltas = [{"role": "assistant", "content": None, "reasoning_content": ""},
              {"content": None, "reasoning_content": "Hmm"}, {"content": "Yes", "reasoning_content": None}]
    assert replay(deltas) == ("Hmm", "Yes", 0)


def test_think_tags_split_at_every_offset():
    text = "<think>\nLet me think.\n</think>\n\nThe answer."
    for first, second in every_two_way_split(text):
        assert replay(content_deltas(first, second)) == ("Let me think.\n", "The answer.", 0), (first, second)


def test_think_tags_one_character_at_a_time():
    text = "  <think>a < b? </thin is not it</think> yes"
    assert replay(content_deltas(*text)) == ("a < b? </thin is not it", "yes", 0)


def test_only_the_closing_tag_arrives_at_every_offset():
    """The template opened <think> in the prompt: what came before </think> was reasoning."""
    text = "I should add them.</think>\n\nIt is 4."
    for first, second in every_two_way_split(text):
        assert replay(content_deltas(first, second)) == ("I should add them.", "It is 4.", 1), (first, second)


def test_a_thought_that_never_closes_stays_reasoning():
    assert replay(content_deltas("<think>still", " going</th")) == ("still going</th", "", 0)


def test_plain_answers_pass_unchanged_at_every_offset():
    text = "Use a <think> tag, or a < b, or end with </thi"
    for first, second in every_two_way_split(text):
        assert replay(content_deltas(first, second)) == ("", text, 0), (first, second)


def test_leading_whitespace_of_a_plain_answer_is_kept():
    assert replay(content_deltas("\n", " Hello", " world")) == ("", "\n Hello world", 0)


def test_tags_are_ignored_once_the_upstream_uses_reasoning_fields():
    deltas = [{"reasoning": "thinking"}, {"content": "The tag </think> ends a thought; <think> opens one."}]
    assert replay(deltas) == ("thinking", "The tag </think> ends a thought; <think> opens one.", 0)


def test_a_partial_tag_held_when_a_reasoning_field_arrives_is_not_lost():
    assert replay([{"content": "<thi"}, {"reasoning_content": "x"}]) == ("x", "<thi", 0)
    assert replay([{"content": "<think>abc</th"}, {"reasoning": "d"}]) == ("abc</thd", "", 0)


def test_endless_leading_whitespace_is_not_held_forever():
    splitter = ThinkingSplitter()
    shown = "".join(splitter.split({"content": " " * 100}).content for _ in range(5))
    assert len(shown) >= 256  # released once it cannot be waiting for <think> any more


@pytest.mark.parametrize("delta", [{}, {"content": None}, {"content": 5}, {"reasoning": ["x"]},
                                   {"reasoning_content": {"a": 1}}, {"content": ""}])
def test_odd_deltas_add_nothing(delta):
    assert replay([delta]) == ("", "", 0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="<>/thinkabc \n", max_size=12), max_size=12))
def test_any_chunking_of_tag_soup_loses_nothing_but_one_pair_of_tags(pieces):
    reasoning, content, _ = replay(content_deltas(*pieces))
    visible = len("".join((reasoning + content).split()))
    sent = len("".join("".join(pieces).split()))
    assert sent - visible in (0, len("<think>"), len("</think>"), len("<think></think>"))
