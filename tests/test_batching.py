"""The embedded model's batching engine (jarvis.backends.batching), driven directly with the bundled SmolLM2:
several answers in one batch a step, each as it would be alone; Stop of one within a step; prompts read in
chunks; a conversation's next turn reads only what is new."""

import json
import statistics
import threading
import time

import pytest

from jarvis.backends.batching import PREFILL_STEP_SECONDS, Answer, Engine, Sampling, common_prefix
from jarvis.settings import resolve_local_model

pytestmark = pytest.mark.model

PROMPTS = ["Count from 1 to 20.", "What is the capital of France?", "Write a haiku about rain.",
           "Name three colors."]


class Run:
    """One answer submitted to the engine, with what came out of it and when."""

    def __init__(self, engine: Engine, messages, max_tokens=40, **sampling):
        self.text, self.arrivals, self.errors, self.finish = [], [], [], None
        self.ended, self.reason = threading.Event(), None
        self.steps_at_cancel = None
        self.engine = engine
        self.answer = Answer(messages=messages, max_tokens=max_tokens, sink=self._sink, model="test",
                             sampling=Sampling(**sampling))

    @classmethod
    def ask(cls, engine, prompt, **options) -> "Run":
        run = cls(engine, [{"role": "user", "content": prompt}], **options)
        engine.submit(run.answer)
        return run

    def _sink(self, kind, value):
        if kind == "chunk":
            choice = json.loads(value)["choices"][0]
            if choice["delta"].get("content"):
                self.text.append(choice["delta"]["content"])
                self.arrivals.append(time.perf_counter())
            self.finish = choice["finish_reason"] or self.finish
        elif kind == "error":
            self.errors.append(value)
        else:
            self.reason = value
            self.ended.set()

    def wait(self, timeout=120) -> "Run":
        assert self.ended.wait(timeout), "the answer never ended"
        return self

    @property
    def content(self) -> str:
        return "".join(self.text)


@pytest.fixture(scope="module")
def engine():
    engine = Engine(resolve_local_model(None), 4, 4096, 1)
    engine.steps = 0

    def counted(tokens):
        engine.steps += 1

    engine.on_step = counted
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    yield engine
    engine.close()
    thread.join(10)


def solo(engine, prompt, **options) -> Run:
    return Run.ask(engine, prompt, **options).wait()


def test_four_answers_at_once_equal_each_answered_alone_token_for_token(engine):
    # 24 tokens each: enough to cross the prompts' ends and the batch's steps (the model's work is this
    # module's cost: every token is real CPU).
    alone = [solo(engine, prompt, temperature=0, max_tokens=24) for prompt in PROMPTS]
    together = [Run.ask(engine, prompt, temperature=0, max_tokens=24) for prompt in PROMPTS]
    for run in together:
        run.wait()
    assert sorted(run.answer.slot for run in together) == [0, 1, 2, 3]  # all four in the batch at once
    for one, batched in zip(alone, together, strict=True):
        assert batched.answer.generated == one.answer.generated, (one.content, batched.content)
        assert batched.content == one.content and batched.finish == one.finish and batched.reason == "complete"
    assert any(run.finish == "length" for run in together) and all(run.content for run in together)


def test_sampled_answers_are_reproducible_per_seed_in_any_company(engine):
    first = [Run.ask(engine, PROMPTS[1], temperature=1, seed=seed, max_tokens=16) for seed in (1, 2, 3, 4)]
    for run in first:
        run.wait()
    again = [Run.ask(engine, PROMPTS[1], temperature=1, seed=seed, max_tokens=16)  # other slots, other order
             for seed in (4, 3, 2, 1)]
    for run in again:
        run.wait()
    by_seed = {run.answer.sampling.seed: run.answer.generated for run in first}
    for run in again:
        assert run.answer.generated == by_seed[run.answer.sampling.seed]
    assert len({tuple(tokens) for tokens in by_seed.values()}) > 1  # the seeds do choose differently


def test_stop_one_of_four_mid_answer_ends_it_within_a_step_and_the_others_are_unchanged(engine):
    alone = [solo(engine, prompt, temperature=0, max_tokens=30) for prompt in PROMPTS[1:]]
    runs = [Run.ask(engine, PROMPTS[0], temperature=0, max_tokens=400)]
    runs += [Run.ask(engine, prompt, temperature=0, max_tokens=30) for prompt in PROMPTS[1:]]
    stopped = runs[0]
    deadline = time.monotonic() + 60
    while len(stopped.text) < 5:
        assert time.monotonic() < deadline and not stopped.ended.is_set()
        time.sleep(0.005)
    steps, tokens = engine.steps, len(stopped.answer.generated)
    engine.cancel(stopped.answer)
    stopped.wait()
    assert stopped.reason == "cancelled" and stopped.finish is None
    assert engine.steps - steps <= 1 and len(stopped.answer.generated) - tokens <= 1  # within one step
    for one, run in zip(alone, runs[1:], strict=True):
        assert run.wait().reason == "complete" and run.answer.generated == one.answer.generated


def test_the_next_turn_of_a_conversation_reads_only_what_is_new(engine):
    # ~190 tokens, past anything a next turn could read anew (< 30): reading a prompt costs CPU per token
    # (one thread), so no longer than that.
    history = [{"role": "user", "content": " ".join(f"Fact {n}: the sky is blue." for n in range(18))}]
    first = Run(engine, history, max_tokens=30, temperature=0)
    engine.submit(first.answer)
    first.wait()
    assert first.answer.prompt_evaluated > 150  # (the system prompt's tokens may come from an earlier answer)
    # Another conversation in between takes another slot; the first's cache stays where it was.
    solo(engine, "Say hi.", temperature=0, max_tokens=5)
    turn = [*history, {"role": "assistant", "content": first.content}, {"role": "user", "content": "And grass?"}]
    second = Run(engine, turn, max_tokens=5, temperature=0)
    engine.submit(second.answer)
    second.wait()
    prompt, _, add_bos = engine.format(turn)
    tokens = engine._tokenize(prompt, add_bos)
    cached = engine._tokenize(*engine.format(history)[::2]) + first.answer.generated[:-1]
    assert second.answer.slot == first.answer.slot
    assert second.answer.prompt_tokens == len(tokens)
    assert second.answer.prompt_evaluated == len(tokens) - common_prefix(cached, tokens)
    assert second.answer.prompt_evaluated < 30 < 150 < second.answer.prompt_tokens


def test_a_cancel_stops_the_decode_under_way_at_once_not_at_its_end(engine):
    """A prompt read alone goes in decodes of about PREFILL_STEP_SECONDS each; a cancel during one aborts it
    (llama.cpp's abort callback) instead of waiting for it to end. Each cancel comes just as a decode of
    the prompt has begun, so without the abort the answer would end a whole decode later (~200 ms on any
    machine: the decodes are sized by time); with it, within a graph node (measured: 1-3 ms)."""
    waits = []
    for attempt in range(3):
        run = Run.ask(engine, " ".join(f"Row {attempt}.{n} holds nothing new." for n in range(300)), max_tokens=1)
        deadline = time.monotonic() + 30
        # Past the first decode (sized before the engine has measured a prompt token, if it has not), then
        # the next one begun:
        while not (run.answer._n_past > 0 and run.answer in engine.in_flight):
            assert time.monotonic() < deadline and not run.ended.is_set(), "the prompt was never read in parts"
            time.sleep(0.0005)
        started = time.perf_counter()
        engine.cancel(run.answer)
        run.wait()
        waits.append(time.perf_counter() - started)
        assert run.reason == "cancelled" and not run.text
    # The fastest of the three: on a machine held to half its speed, one wait in three took 50 ms (the
    # test's thread woken late) beside 13 and 17. Without the abort each would be most of a decode (the
    # cancel comes as one begins): 150-200 ms, the fastest too.
    assert min(waits) < PREFILL_STEP_SECONDS / 4, waits


def test_a_prompt_that_does_not_fit_is_refused_and_the_engine_goes_on(engine):
    run = Run.ask(engine, "word " * 5000, max_tokens=5).wait()
    assert run.reason == "error" and run.errors[0].code == "context_length_exceeded"
    assert solo(engine, "Say hi.", max_tokens=3).content


def test_stop_strings_end_the_answer_before_them(engine):
    whole = solo(engine, PROMPTS[0], temperature=0, max_tokens=40).content
    assert "5" in whole
    run = Run(engine, [{"role": "user", "content": PROMPTS[0]}], max_tokens=40, temperature=0)
    run.answer.stop = ["5"]
    engine.submit(run.answer)
    run.wait()
    assert run.finish == "stop" and run.content == whole[:whole.index("5")]


@pytest.mark.serial
def test_a_long_prompt_arriving_never_holds_back_three_streaming_answers(engine):
    """A 3,000-token prompt is read in chunks between the others' tokens: their gaps while it is read stay
    under 3x their gaps before it came (each a median of this run, on this machine)."""
    streaming = [Run.ask(engine, prompt, temperature=0, max_tokens=2000) for prompt in PROMPTS[:3]]
    deadline = time.monotonic() + 60
    while min(len(run.arrivals) for run in streaming) < 30:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    arrived = time.perf_counter()
    long = Run.ask(engine, " ".join(f"Line {n} of the report says nothing new." for n in range(330)), max_tokens=1)
    while long.answer.prompt_tokens == 0 or long.answer.prompt_tokens - len(long.answer._pending) < 80:
        assert time.monotonic() < deadline + 120
        time.sleep(0.01)
    reading_until = time.perf_counter()
    for run in [*streaming, long]:
        engine.cancel(run.answer)
    for run in [*streaming, long]:
        run.wait()
    assert long.answer.prompt_tokens >= 3000
    before, during = [], []
    for run in streaming:
        gaps = list(zip(run.arrivals, run.arrivals[1:], strict=False))
        before += [later - earlier for earlier, later in gaps if later < arrived]
        during += [later - earlier for earlier, later in gaps if earlier > arrived and later < reading_until]
    usual = statistics.median(before)
    assert len(during) > 30
    # Measured here: usual 36 ms, while reading median 69 ms, worst 83 ms; without chunks, 3.56 s. The 95th
    # percentile is held to 3x, the worst to 6x: one pause of the machine must not decide it.
    ranked = sorted(during)
    assert ranked[int(len(ranked) * 0.95)] < 3 * usual and ranked[-1] < 6 * usual, (usual, ranked[-5:])
