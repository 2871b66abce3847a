"""jarvis.cooperative: JSON parsed in slices says what json.loads says, and lets the hub run meanwhile."""

from __future__ import annotations

import json
import time

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jarvis import cooperative

VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                      lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
                      max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(VALUES, st.sampled_from([None, 1, 2]))
def test_any_json_value_parses_as_json_loads_parses_it(value, indent):
    text = json.dumps(value, indent=indent)
    assert cooperative.loads(text) == json.loads(text)
    assert cooperative.loads(text.encode()) == json.loads(text.encode())


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='[]{}:," 0123abtrunelfs\\\n', max_size=30))
def test_any_text_is_refused_exactly_when_json_loads_refuses_it(text):
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            cooperative.loads(text)
    else:
        assert cooperative.loads(text) == expected


def test_a_large_document_lets_the_hub_run_while_it_is_parsed():
    document = json.dumps({"conversations": [{"title": "t", "messages": [{"content": "x"}]}
                                             for _ in range(200_000)]}).encode()
    gaps, last = [], [time.perf_counter()]

    def tick():  # the probe: how long the hub goes between turns (its timer, not a wait for an event)
        while True:
            gevent.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last[0])
            last[0] = now

    ticker = gevent.spawn(tick)
    started = time.perf_counter()
    parsed = cooperative.loads(document)
    whole = time.perf_counter() - started
    ticker.kill()
    assert len(parsed["conversations"]) == 200_000
    print(f"\nparsed {len(document) / 1e6:.1f} MB in {whole:.2f} s; the hub's longest wait {max(gaps) * 1000:.0f} ms "
          f"over {len(gaps)} turns")
    assert len(gaps) > 10  # the hub ran during the parse, many times: json.loads would give it none
    assert max(gaps) < whole / 5  # and no single slice held it for a large part of the parse
