"""The SSE decoder: events survive any split of the byte stream and any line-end convention."""

import json

import pytest

from jarvis.sse import PING, SSEDecoder, data_event, error_event

STREAM = (b": comment\n\ndata: {\"a\": 1}\n\ndata: {\"b\": \"\xc3\xa9\xf0\x9f\x98\x80\"}\n\n"
          b"event: message\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n")
EXPECTED = [b'{"a": 1}', b'{"b": "\xc3\xa9\xf0\x9f\x98\x80"}', b"line1\nline2", b"[DONE]"]


def decode_all(chunks):
    decoder = SSEDecoder()
    payloads = []
    for chunk in chunks:
        payloads += decoder.feed(chunk)
    return payloads + decoder.finish()


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_split_at_every_offset_with_each_line_end(newline):
    stream = STREAM.replace(b"\n", newline)
    for offset in range(len(stream) + 1):
        assert decode_all([stream[:offset], stream[offset:]]) == EXPECTED, offset


def test_byte_at_a_time():
    assert decode_all([bytes([b]) for b in STREAM.replace(b"\n", b"\r\n")]) == EXPECTED


def test_comments_and_fields_without_data_are_dropped():
    assert decode_all([b": ping\n\nid: 7\nretry: 10\n\nevent: x\n\n"]) == []


def test_data_without_space_and_empty_data():
    assert decode_all([b"data:x\n\ndata\n\n"]) == [b"x", b""]


def test_last_event_without_blank_line_is_kept_at_end_of_input():
    assert decode_all([b"data: 1\n\ndata: [DONE]\n"]) == [b"1", b"[DONE]"]


def test_encoders_produce_only_data_lines_and_comments():
    assert data_event(b'{"x":1}') == b'data: {"x":1}\n\n'
    assert data_event(b"a\nb") == b"data: a\ndata: b\n\n"
    assert PING == b": ping\n\n"
    event = error_event({"message": "m", "type": "t", "param": None, "code": "c"})
    first, done, rest = event.split(b"\n\n")
    assert json.loads(first[6:]) == {"error": {"message": "m", "type": "t", "param": None, "code": "c"}}
    assert done == b"data: [DONE]" and rest == b""
