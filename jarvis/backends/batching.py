"""Continuous batching for the embedded model: several answers decoded together, one llama.cpp batch a step.

On a CPU, decoding one token is bound by reading the weights, not by arithmetic, so a batch that carries
one token for each of four answers costs little more than one (see bench/local_model.py). llama-cpp-python's
high-level API decodes one sequence (its own server serialises requests for that reason); this engine
uses its low-level bindings the way llama.cpp's server does:

- one llama.cpp context with `slots` sequences (`n_seq_max`) over one KV cache of `JARVIS_LOCAL_CONTEXT`
  tokens per slot (`kv_unified`: a prefix two slots share, such as the system prompt, is held once);
- every step, one `llama_decode` of a batch holding the next token of every answer being generated and a
  chunk of every prompt being read, each token tagged with its sequence; then each answer's own sampler
  chain (temperature, top_k, top_p, min_p, seed, penalties, as llama-cpp-python builds it) picks from
  its own row of logits;
- a request joins at the next step and a finished or cancelled one leaves at once (continuous batching);
- prompts are read in chunks sized so that a step costs about two plain decode steps while others are
  generating (measured as it runs), so a long prompt never holds other answers' tokens back for long;
  alone, a prompt is read in chunks of `batch` tokens;
- a slot keeps its KV cache after an answer; a new request takes a free slot whose cache its prompt mostly
  continues (a conversation's next turn: it reads its new message, not its history), else the least
  recently used free slot, into which a prefix another slot holds (the system prompt) is copied; only the
  rest is read;
- the abort callback (`PromptAbort`) stops a decode only when every answer in that batch is cancelled;
  a cancelled answer in a mixed batch leaves before the next one. An aborted decode is rolled back (its
  sequences' cache cut to where the step began) and its live answers go on.

The engine runs in one native thread and knows nothing of gevent: answers leave through their `sink`
(jarvis.backends.local hands them to the hub), so it is tested without a server.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from gevent import monkey

log = logging.getLogger(__name__)

_allocate_lock = monkey.get_original("_thread", "allocate_lock")  # native: the engine is a native thread

MIN_PREFILL_CHUNK = 2  # tokens of a prompt per step while others generate, at the least
PREFILL_STEP_SECONDS = 0.2  # a prompt read alone: chunks of about this long (a newcomer waits one at most)
SHARE_AT_LEAST = 16  # prompt tokens another slot must save before its cache is copied (a copy costs ~3 reads)
PENALTY_LAST_N = 64  # as llama-cpp-python's last_n_tokens_size


class EngineError(Exception):
    """An answer could not be run; `code` and `kind` are OpenAI's error code and type."""

    def __init__(self, code: str, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.kind = code, kind


@dataclass
class Sampling:
    """One answer's sampling parameters; the defaults are llama-cpp-python's create_chat_completion's."""

    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None


@dataclass(eq=False)
class Answer:
    """One request in the engine. `sink(kind, value)` receives ("chunk", bytes) for each chat.completion.chunk,
    then ("end", reason) with reason complete | cancelled | error, after ("error", EngineError) on an error.
    It is called from the engine's thread."""

    messages: list[dict]
    max_tokens: int
    sink: Callable[[str, object], None]
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    model: str = "model"
    cancelled: bool = False  # set from any thread (Engine.cancel)
    # What the engine reports (read after the end):
    prompt_tokens: int = 0
    prompt_evaluated: int = 0  # prompt tokens read by the model (the rest came from the slot's cache)
    completion_tokens: int = 0
    generated: list[int] = field(default_factory=list)  # the tokens sampled, in order (an end token too)
    slot: int | None = None
    # The engine's own state:
    _id: str = ""
    _created: int = 0
    _pending: list[int] = field(default_factory=list)  # prompt tokens still to read
    _n_past: int = 0
    _last: int | None = None  # the sampled token still to decode
    _sampler: object = None
    _decoder: object = None
    _held: str = ""  # text held back: it may be the start of a stop string
    _started: bool = False  # the role chunk went out
    _stop_after: int = 0  # completion_tokens at which it stops ("length")


class _Signal:
    """Set from any thread, waited for by the engine's thread (a native lock as a binary semaphore)."""

    def __init__(self):
        self._lock = _allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # already set
            pass

    def wait(self, timeout: float) -> None:
        self._lock.acquire(timeout=timeout)


class _Slot:
    def __init__(self, seq_id: int):
        self.seq_id = seq_id
        self.tokens: list[int] = []  # what this sequence's KV cache holds, position by position
        self.answer: Answer | None = None
        self.used = 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """The batching loop over one model and context. `submit` and `cancel` from any thread; `run` in one
    native thread, forever (`close` ends it)."""

    def __init__(self, model_path: str, slots: int | None, context: int, threads: int, batch: int = 512,
                 on_step: Callable[[int], None] | None = None):
        import llama_cpp

        self.bindings = llama_cpp
        self.model = load_model(model_path)
        self.vocab = self.model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        slots = slots or default_slots(context, kv_bytes_per_token(llama_cpp, self.model.model))
        self.slots_n, self.context = slots, context
        self.batch_size = max(batch, slots)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context * slots
        params.n_batch = params.n_ubatch = self.batch_size  # one ubatch a decode: an abort leaves none behind
        params.n_seq_max = slots
        params.n_threads = params.n_threads_batch = threads
        # One cache for every slot: a prompt's prefix another slot holds (the system prompt, a conversation
        # continued in another slot) is shared by reference (llama_memory_seq_cp), not read again. Measured
        # with the split cache (kv_unified off): two answers at once read their whole prompts, and their
        # aggregate tokens/s fell to 0.54x one slot's, which reused the shared prefix.
        params.kv_unified = False
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {context} x {slots} tokens")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.batch_size, 0, 1)
        self.abort_flag = PromptAbort(self.ctx)
        self.format = chat_formatter(self.model)
        self.slots = [_Slot(i) for i in range(slots)]
        self.incoming: list[Answer] = []
        self.incoming_lock = _allocate_lock()
        self.wake = _Signal()
        self.in_flight: tuple[Answer, ...] = ()
        self.closed = False
        self.on_step = on_step  # (called with the batch's token count after each decode: the tests' probe)
        self.decode_seconds: float | None = None  # a step of generation alone (moving average)
        self.prompt_token_seconds: float | None = None  # the cost of one more prompt token in a step
        self.piece = ctypes.create_string_buffer(256)

    # -- from any thread ------------------------------------------------------------------------------

    def submit(self, answer: Answer) -> None:
        """Queue an answer; the caller guarantees a free slot (jarvis.backends.local's semaphore)."""
        with self.incoming_lock:
            self.incoming.append(answer)
        self.wake.set()

    def cancel(self, answer: Answer) -> None:
        """Stop an answer: it leaves before the next step; a decode under way stops at once when every answer
        in it is cancelled (a prompt being read is one long decode)."""
        answer.cancelled = True
        flying = self.in_flight
        if flying and all(other.cancelled for other in flying):
            self.abort_flag.trigger()
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()

    # -- the engine's thread ----------------------------------------------------------------------------

    def run(self) -> None:
        while not self.closed:
            with self.incoming_lock:
                arrived, self.incoming = self.incoming, []
            for answer in arrived:
                self._admit(answer)
            for slot in self.slots:
                if slot.answer is not None and slot.answer.cancelled:
                    self._finish(slot, "cancelled")
            if not any(slot.answer is not None for slot in self.slots):
                self.wake.wait(1.0)
                continue
            self._step()

    def _admit(self, answer: Answer) -> None:
        try:
            prompt, stop, add_bos = self.format(answer.messages)
            tokens = self._tokenize(prompt, add_bos)
        except Exception as error:  # a template that fails on these messages
            self._refuse(answer, EngineError("invalid_messages", f"The model's chat template failed: {error}"))
            return
        if len(tokens) >= self.context:
            self._refuse(answer, EngineError("context_length_exceeded", f"Requested tokens ({len(tokens)}) exceed "
                                             f"context window of {self.context}"))
            return
        free = [slot for slot in self.slots if slot.answer is None]
        if not free:  # (the semaphore in front makes this impossible)
            self._refuse(answer, EngineError("model_busy", "Every slot of the embedded model is busy", "server_error"))
            return
        # A free slot whose cache this prompt mostly continues (it keeps at least half of what the slot
        # holds: a conversation's next turn), the longest such; else the least recently used free slot, so a
        # new conversation does not evict a cached one for the sake of a shared system prompt (llama.cpp's
        # server chooses by the same kind of similarity). A longer prefix held by any slot is copied in.
        similar = [slot for slot in free if (shared := common_prefix(slot.tokens, tokens)) and
                   shared * 2 >= len(slot.tokens)]
        slot = (max(similar, key=lambda slot: common_prefix(slot.tokens, tokens)) if similar
                else min(free, key=lambda slot: slot.used))
        source = max(self.slots, key=lambda other: common_prefix(other.tokens, tokens))
        keep = min(common_prefix(slot.tokens, tokens), len(tokens) - 1)  # the last token is read for its logits
        shared = min(common_prefix(source.tokens, tokens), len(tokens) - 1)
        if source is not slot and shared > keep + SHARE_AT_LEAST:
            # Each slot has its own cache stream: llama.cpp copies a whole stream to another (at its next
            # decode), then the copy's tail past the shared prefix is dropped.
            self.bindings.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            self.bindings.llama_memory_seq_cp(self.memory, source.seq_id, slot.seq_id, -1, -1)
            slot.tokens[:] = source.tokens[:shared]
            keep = shared
        self.bindings.llama_memory_seq_rm(self.memory, slot.seq_id, keep, -1)
        del slot.tokens[keep:]
        slot.answer, slot.used = answer, time.monotonic()
        answer.slot = slot.seq_id
        answer.stop = [text for text in [*stop, *answer.stop] if text]
        answer.prompt_tokens, answer.prompt_evaluated = len(tokens), len(tokens) - keep
        answer._pending, answer._n_past = tokens[keep:], keep
        answer._stop_after = answer.max_tokens
        answer._id, answer._created = f"chatcmpl-{uuid.uuid4()}", int(time.time())
        answer._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        answer._sampler = self._sampler(answer.sampling, tokens)

    def _refuse(self, answer: Answer, error: EngineError) -> None:
        answer.sink("error", error)
        answer.sink("end", "error")

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        data = text.encode()
        size = len(data) + 16
        buffer = (self.bindings.llama_token * size)()
        count = self.bindings.llama_tokenize(self.vocab, data, len(data), buffer, size, add_bos, True)
        if count < 0:
            raise ValueError(f"the prompt did not tokenize ({count})")
        return list(buffer[:count])

    def _sampler(self, sampling: Sampling, prompt: list[int]):
        """The chain llama-cpp-python builds (Llama._init_sampler), for this answer alone."""
        b = self.bindings
        chain = b.llama_sampler_chain_init(b.llama_sampler_chain_default_params())
        penalties = (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty) != (1.0, 0, 0)
        # (llama-cpp-python's binding takes n_vocab first, as Llama._init_sampler passes it.)
        b.llama_sampler_chain_add(chain, b.llama_sampler_init_penalties(
            self.n_vocab, PENALTY_LAST_N, sampling.repeat_penalty, sampling.frequency_penalty,
            sampling.presence_penalty))
        if sampling.temperature == 0:
            b.llama_sampler_chain_add(chain, b.llama_sampler_init_greedy())
        else:
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
            b.llama_sampler_chain_add(chain, b.llama_sampler_init_top_k(sampling.top_k))
            b.llama_sampler_chain_add(chain, b.llama_sampler_init_typical(1.0, 1))
            b.llama_sampler_chain_add(chain, b.llama_sampler_init_top_p(sampling.top_p, 1))
            b.llama_sampler_chain_add(chain, b.llama_sampler_init_min_p(sampling.min_p, 1))
            b.llama_sampler_chain_add(chain, b.llama_sampler_init_temp(sampling.temperature))
            b.llama_sampler_chain_add(chain, b.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        if penalties:  # the prompt counts towards repetition, as in llama.cpp's server
            for token in prompt[-PENALTY_LAST_N:]:
                b.llama_sampler_accept(chain, token)
        return chain

    def _step(self) -> None:
        b, batch = self.bindings, self.batch
        generating = [slot for slot in self.slots if slot.answer is not None and slot.answer._last is not None]
        reading = sorted((slot for slot in self.slots if slot.answer is not None and slot.answer._pending),
                         key=lambda slot: slot.used)
        budget = min(self.batch_size - len(generating), self._prefill_chunk(bool(generating)))
        count, logits_at, taken = 0, {}, {}
        for slot in generating:
            self._put(count, slot.answer._last, slot.answer._n_past, slot.seq_id, True)
            logits_at[slot.seq_id] = count
            count += 1
        for slot in reading:
            if budget <= 0:
                break
            answer = slot.answer
            take = min(len(answer._pending), budget)
            for i in range(take):
                last = i == take - 1 and take == len(answer._pending)
                self._put(count, answer._pending[i], answer._n_past + i, slot.seq_id, last)
                if last:
                    logits_at[slot.seq_id] = count
                count += 1
            taken[slot.seq_id] = take
            budget -= take
        batch.n_tokens = count
        flying = [slot for slot in self.slots if slot.seq_id in logits_at or slot.seq_id in taken]
        self.abort_flag.clear()
        self.in_flight = tuple(slot.answer for slot in flying)
        if all(answer.cancelled for answer in self.in_flight):
            self.in_flight = ()
            return  # cancelled between the check and now: they leave at the next turn
        started = time.perf_counter()
        result = b.llama_decode(self.ctx, batch)
        elapsed = time.perf_counter() - started
        self.in_flight = ()
        if result != 0:
            for slot in flying:  # back to where the step began: an aborted decode may have written some
                b.llama_memory_seq_rm(self.memory, slot.seq_id, slot.answer._n_past, -1)
            if result == 2:
                return  # aborted: the cancelled answers leave at the next turn, the others go on
            for slot in flying:
                slot.answer.sink("error", EngineError("model_error", f"llama_decode returned {result}", "server_error"))
                self._finish(slot, "error")
            return
        self._learn(elapsed, len(generating), sum(taken.values()))
        if self.on_step is not None:
            self.on_step(count)
        for slot in generating:
            answer = slot.answer
            slot.tokens.append(answer._last)
            answer._n_past += 1
        for seq_id, take in taken.items():
            answer = self.slots[seq_id].answer
            slot = self.slots[seq_id]
            slot.tokens.extend(answer._pending[:take])
            answer._n_past += take
            del answer._pending[:take]
        for seq_id, index in logits_at.items():
            slot = self.slots[seq_id]
            if slot.answer is not None:
                self._sample(slot, index)

    def _put(self, i: int, token: int, position: int, seq_id: int, logits: bool) -> None:
        batch = self.batch
        batch.token[i] = token
        batch.pos[i] = position
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _prefill_chunk(self, others_generating: bool) -> int:
        """Prompt tokens for the next step. While others generate, about one plain step's worth of work, so
        their tokens come at most about twice as far apart; alone, about PREFILL_STEP_SECONDS of work (the
        cost of a prompt token hardly falls past 16 in a batch: 6.6 ms at 16, 6.5 at 128, on one thread)."""
        if self.prompt_token_seconds is None:
            return 16
        if not others_generating:
            return max(16, min(self.batch_size, int(PREFILL_STEP_SECONDS / self.prompt_token_seconds)))
        if self.decode_seconds is None:
            return MIN_PREFILL_CHUNK
        return max(MIN_PREFILL_CHUNK, min(self.batch_size, int(self.decode_seconds / self.prompt_token_seconds)))

    def _learn(self, elapsed: float, generating: int, prompt: int) -> None:
        def average(old, new):
            return new if old is None else old * 0.8 + new * 0.2

        if prompt == 0:
            self.decode_seconds = average(self.decode_seconds, elapsed)
        else:
            plain = self.decode_seconds if (generating and self.decode_seconds is not None) else 0.0
            self.prompt_token_seconds = average(self.prompt_token_seconds, max(elapsed - plain, 1e-6) / prompt)

    def _sample(self, slot: _Slot, index: int) -> None:
        b, answer = self.bindings, slot.answer
        if answer.cancelled:
            return
        token = b.llama_sampler_sample(answer._sampler, self.ctx, index)  # (accepts the token too)
        answer.generated.append(token)
        if b.llama_vocab_is_eog(self.vocab, token):
            self._emit_text(answer, answer._decoder.decode(b"", final=True) , final=True)
            self._finish(slot, "complete", "stop")
            return
        answer.completion_tokens += 1
        answer._last = token
        size = b.llama_token_to_piece(self.vocab, token, self.piece, len(self.piece), 0, False)
        text = answer._decoder.decode(self.piece.raw[:max(size, 0)])
        if self._emit_text(answer, text):
            self._finish(slot, "complete", "stop")
        elif answer.completion_tokens >= answer._stop_after or answer._n_past + 1 >= self.context:
            self._emit_text(answer, answer._decoder.decode(b"", final=True), final=True)
            self._finish(slot, "complete", "length")

    def _emit_text(self, answer: Answer, text: str, final: bool = False) -> bool:
        """Send what is certain not to start a stop string; True when a stop string was met."""
        held = answer._held + text
        for stop in answer.stop:
            at = held.find(stop)
            if at != -1:
                self._send(answer, held[:at])
                answer._held = ""
                return True
        keep = 0 if final else max((_overlap(held, stop) for stop in answer.stop), default=0)
        self._send(answer, held[:len(held) - keep])
        answer._held = held[len(held) - keep:]
        return False

    def _send(self, answer: Answer, text: str) -> None:
        if text:
            self._chunk(answer, {"content": text})

    def _chunk(self, answer: Answer, delta: dict, finish: str | None = None) -> None:
        if not answer._started:
            answer._started = True
            self._chunk(answer, {"role": "assistant"})
        answer.sink("chunk", json.dumps({
            "id": answer._id, "model": answer.model, "created": answer._created, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode())

    def _finish(self, slot: _Slot, reason: str, finish_reason: str | None = None) -> None:
        answer = slot.answer
        slot.answer, slot.used = None, time.monotonic()
        if answer._sampler is not None:
            self.bindings.llama_sampler_free(answer._sampler)
            answer._sampler = None
        if finish_reason is not None:
            self._chunk(answer, {}, finish_reason)
        answer.sink("end", reason)


def _overlap(text: str, stop: str) -> int:
    """The longest end of `text` that is a beginning of `stop` (it might become the stop string)."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


def load_model(path: str):
    """The model alone (its weights and vocabulary), extra buffer types off (see above); jarvis.backends.batching
    makes the context."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp
    from llama_cpp import _internals

    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = False
    model = _internals.LlamaModel(path_model=path, params=params, verbose=False)
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)
    return model


def chat_formatter(model):
    """messages -> (prompt text, stop strings, add BOS): the model's own chat template from its GGUF, as
    llama-cpp-python applies it (ChatML when the file has none). A final assistant message is continued:
    the template over the messages before it, with the generation prompt, then that text as it is (a
    "prefill"), so the model goes on with the text instead of answering afresh."""
    from llama_cpp import llama_chat_format

    template = model.metadata().get("tokenizer.chat_template")
    if template:
        eos, bos = model.token_eos(), model.token_bos()
        formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "", stop_token_ids=[eos])
    else:
        formatter = llama_chat_format.format_chatml

    def format(messages: list[dict]) -> tuple[str, list[str], bool]:
        continuing = messages and messages[-1]["role"] == "assistant"
        result = formatter(messages=messages[:-1] if continuing else messages)
        prompt = result.prompt + (messages[-1]["content"] if continuing else "")
        stop = [result.stop] if isinstance(result.stop, str) else list(result.stop or [])
        return prompt, stop, not result.added_special and model.add_bos_token()

    return format


class PromptAbort:
    """Stops llama.cpp within one compute-graph node, from any thread, without the GIL.

    llama.cpp calls the abort callback after every node (about 600 per decode for SmolLM2-135M).
    A Python callback would take the GIL each time: measured, that made a 961-token prompt take
    14.3 s instead of 7.5 s while another Python thread was busy, as the hub is under load. So the
    callback is C: libc's `strlen`, over a two-byte flag. It returns 0 (go on) while the flag is
    empty and 1 (abort) once a byte is written — read back as the callback's bool, which is the
    low byte of the return register on the ABIs llama.cpp runs on (x86-64, AArch64). llama_decode
    then returns 2 and llama-cpp-python raises RuntimeError.
    """

    def __init__(self, context):
        """`context`: a llama_context pointer, or a high-level Llama (bench/prompt_abort.py)."""
        from llama_cpp import llama_cpp as bindings

        context = getattr(getattr(context, "_ctx", None), "ctx", context)
        self.flag = ctypes.create_string_buffer(2)
        # Kept on self: llama.cpp holds only raw pointers to both.
        self.callback = ctypes.cast(ctypes.CDLL(None).strlen, bindings.ggml_abort_callback)
        bindings.llama_set_abort_callback(context, self.callback, ctypes.cast(self.flag, ctypes.c_void_p))

    def clear(self) -> None:
        self.flag[0] = b"\0"

    def trigger(self) -> None:
        self.flag[0] = b"x"


def default_slots(context: int, per_token: int) -> int:
    """4, or fewer when their caches together would take more than a quarter of the machine's memory."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4
    return max(1, min(4, int(memory / 4 // (per_token * context))))


def kv_bytes_per_token(bindings, model) -> int:
    """The KV cache's bytes per token: f16 keys and values for every layer's key-value heads."""
    layers, heads, kv_heads = (bindings.llama_model_n_layer(model), bindings.llama_model_n_head(model),
                               bindings.llama_model_n_head_kv(model))
    head_size = bindings.llama_model_n_embd(model) // max(heads, 1)
    return 2 * 2 * layers * kv_heads * head_size
