"""The embedded simulator: the default backend, so tokenwire runs with no model server.

Two models:

* ``tokenwire-sim`` writes plausible English split into word-piece tokens the
  way BPE tokenizers split it (leading spaces, long words in pieces, some
  multi-byte UTF-8). The same seed, prompt and parameters always give the same
  answer; without a seed the prompt itself seeds the generator.
* ``echo`` streams the last user message back in tokens of a fixed number of
  characters, so tests and operators can put exact text through the pipeline.

Timing and faults are configurable per server and per request through labels
(``tokenwire.sim/<knob>``), so callers in any language can exercise slow
generations, stalls and failures without a test double.

Why one module: the two simulated models, their knobs and their faults are
one backend; the knobs table (KNOBS) is the single description both
validation and the docs read.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import random
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from tokenwire_server.backends.base import Backend
from tokenwire_server.config import SimulatorConfig
from tokenwire_server.domain import Finish, FinishReason, GenerationRequest, Role
from tokenwire_server.errors import BackendUnavailable, FieldViolation, InvalidRequest
from tokenwire_server.tokens import estimate_prompt_tokens

SIM_MODEL = "tokenwire-sim"
ECHO_MODEL = "echo"
MODEL_VERSION = "sim-2026.11"
KNOB_PREFIX = "tokenwire.sim/"

_WORDS = [
    "the",
    "stream",
    "of",
    "tokens",
    "arrives",
    "in",
    "order",
    "and",
    "every",
    "chunk",
    "carries",
    "its",
    "sequence",
    "number",
    "governance",
    "checks",
    "each",
    "window",
    "before",
    "release",
    "so",
    "nothing",
    "sensitive",
    "leaves",
    "the",
    "gateway",
    "a",
    "verification",
    "gate",
    "compares",
    "the",
    "digest",
    "of",
    "streamed",
    "text",
    "with",
    "the",
    "final",
    "payload",
    "latency",
    "matters",
    "because",
    "users",
    "watch",
    "partial",
    "answers",
    "appear",
    "while",
    "generation",
    "continues",
    "backpressure",
    "keeps",
    "memory",
    "bounded",
    "when",
    "a",
    "reader",
    "falls",
    "behind",
    "the",
    "model",
    "operators",
    "trace",
    "requests",
    "across",
    "services",
    "and",
    "correlate",
    "logs",
    "with",
    "metrics",
    "resumable",
    "responses",
    "survive",
    "dropped",
    "connections",
    "and",
    "replica",
    "restarts",
    "production",
    "teams",
    "prefer",
    "contracts",
    "that",
    "hold",
    "under",
    "faults",
    "and",
    "deadlines",
    "café",
    "naïve",
    "résumé",
    "façade",
    "über",
    "coöperate",
    "jalapeño",
    "smörgåsbord",
    "deterministic",
    "simulation",
    "makes",
    "integration",
    "tests",
    "reproducible",
    "and",
    "fast",
    "interoperability",
    "across",
    "languages",
    "depends",
    "on",
    "stable",
    "field",
    "names",
    "and",
    "semantics",
]
_PUNCTUATION = (".", ".", ".", ",", ",", ";", ":", "!", "?", " —")


@dataclass(frozen=True, slots=True)
class _Knobs:
    answer_tokens: int
    time_to_first_token: float
    inter_token_delay: float
    echo_token_chars: int
    fail_after: int | None
    stall_after: int | None
    raise_after: int | None


#: Every knob a request can set, as (integer?, lowest, highest): values are
#: finite and inside these bounds, anything else is INVALID_ARGUMENT naming the
#: label (docs/request-bounds.md lists them).
KNOBS: dict[str, tuple[bool, float, float]] = {
    "answer-tokens": (True, 0, 1_000_000),
    "ttft-ms": (False, 0, 600_000),
    "inter-token-ms": (False, 0, 60_000),
    "echo-token-chars": (True, 1, 4096),
    "fail-after": (True, 0, 1_000_000),
    "stall-after": (True, 0, 1_000_000),
    "raise-after": (True, 0, 1_000_000),
}

#: The spellings every caller's language writes and reads alike. Python's own
#: int() and float() also accept "1_000", " 5 ", Unicode digits ("٣") and
#: "infinity"; a label a Go or TypeScript test sets must mean the same here,
#: so only plain ASCII decimal notation is a number.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _present(labels: Mapping[str, str]) -> list[str]:
    return [k[len(KNOB_PREFIX) :] for k in labels if k.startswith(KNOB_PREFIX)]


def _parse_knob(knob: str, raw: str) -> float | FieldViolation:
    field = f"labels[{KNOB_PREFIX}{knob}]"
    spec = KNOBS.get(knob)
    if spec is None:
        return FieldViolation(field, f"unknown simulator knob; known: {', '.join(sorted(KNOBS))}")
    integer, low, high = spec
    refusal = FieldViolation(
        field, f"must be {'an integer' if integer else 'a number'} from {low:g} to {high:g}"
    )
    # No value in range needs more characters; int() need not read a 1,000-digit one.
    if len(raw) > 32 or not (_INTEGER if integer else _NUMBER).fullmatch(raw):
        return refusal
    value: float = int(raw) if integer else float(raw)  # float("1e400") is inf
    if not (math.isfinite(value) and low <= value <= high):
        return refusal
    return value


def knob_violations(labels: Mapping[str, str]) -> list[FieldViolation]:
    """What is wrong with the simulator knobs among `labels`, before generation."""
    found = [_parse_knob(knob, labels[KNOB_PREFIX + knob]) for knob in _present(labels)]
    return [f for f in found if isinstance(f, FieldViolation)]


def _knob_error(problems: list[FieldViolation]) -> InvalidRequest:
    return InvalidRequest(
        f"invalid simulator knob: {problems[0].field}: {problems[0].description}",
        reason="INVALID_SIMULATOR_KNOB",
        violations=problems,
    )


@dataclass(slots=True)
class SimulatorStats:
    """Counters tests read to prove what happened inside the backend."""

    started: int = 0
    finished: int = 0
    cancelled: int = 0
    tokens_emitted: int = 0


def _word_pieces(word: str) -> list[str]:
    if len(word) <= 6:
        return [word]
    cut = 4 if len(word) < 10 else 5
    return [word[:cut], *_word_pieces(word[cut:])]


#: Answers up to this many tokens are cached (8 of them: a few MiB at most).
_CACHED_ANSWER_TOKENS = 100_000


@functools.lru_cache(maxsize=8)
def _composed(seed: int | str, n_tokens: int) -> tuple[str, ...]:
    """The answer for a seed, composed once: callers that repeat a prompt (load
    tests, retries) get it without paying ~2 µs per token for the composing."""
    return tuple(_compose(random.Random(seed), n_tokens))


def _compose(rng: random.Random, n_tokens: int) -> list[str]:
    tokens: list[str] = []
    sentence_start = True
    words_in_sentence = 0
    target = rng.randint(6, 16)
    while len(tokens) < n_tokens:
        word = rng.choice(_WORDS)
        if sentence_start:
            word = word[0].upper() + word[1:]
        pieces = _word_pieces(word)
        tokens.append(("" if not tokens else " ") + pieces[0])
        tokens.extend(pieces[1:])
        sentence_start = False
        words_in_sentence += 1
        if words_in_sentence >= target:
            tokens.append(rng.choice(_PUNCTUATION))
            terminal = tokens[-1] in (".", "!", "?")
            sentence_start = terminal
            words_in_sentence = 0
            target = rng.randint(6, 16)
            if terminal and rng.random() < 0.15:
                tokens.append("\n\n")
    return tokens[:n_tokens]


def _split_fixed(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _apply_stop(tokens: list[str], stop: tuple[str, ...]) -> list[str] | None:
    """Cuts the tokens before the earliest stop string; None when none occurs."""
    text = "".join(tokens)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not hits:
        return None
    cut = min(hits)
    kept: list[str] = []
    length = 0
    for token in tokens:
        if length + len(token) <= cut:
            kept.append(token)
            length += len(token)
            continue
        if cut > length:
            kept.append(token[: cut - length])
        break
    return kept


#: Most tokens handed on at once when several are already due.
_BURST = 64


class SimulatorBackend(Backend):
    """Deterministic token source with timing and fault knobs."""

    name = "simulator"
    provider = "tokenwire.simulator"
    deterministic = True

    def __init__(self, config: SimulatorConfig) -> None:
        self._config = config
        self.stats = SimulatorStats()
        #: Set whenever a generation is cancelled; tests await it instead of sleeping.
        self.cancelled = asyncio.Event()
        self._ticker: _Ticker | None = None

    def models(self) -> Mapping[str, str]:
        return {SIM_MODEL: MODEL_VERSION, ECHO_MODEL: MODEL_VERSION}

    def check_labels(self, labels: Mapping[str, str]) -> list[FieldViolation]:
        return knob_violations(labels)

    def _knobs(self, labels: Mapping[str, str]) -> _Knobs:
        c = self._config
        values = {knob: _parse_knob(knob, labels[KNOB_PREFIX + knob]) for knob in _present(labels)}
        problems = [v for v in values.values() if isinstance(v, FieldViolation)]
        if problems:
            raise _knob_error(problems)

        def number(knob: str) -> float | None:
            value = values.get(knob)
            return value if isinstance(value, (int, float)) else None

        def ms(knob: str, default: float) -> float:
            value = number(knob)
            return default if value is None else value / 1000.0

        def count(knob: str, default: int | None) -> int | None:
            value = number(knob)
            return default if value is None else int(value)

        return _Knobs(
            answer_tokens=count("answer-tokens", c.sim_answer_tokens) or 0,
            time_to_first_token=ms("ttft-ms", c.sim_time_to_first_token),
            inter_token_delay=ms("inter-token-ms", c.sim_inter_token_delay),
            echo_token_chars=count("echo-token-chars", c.sim_echo_token_chars) or 1,
            fail_after=count("fail-after", None),
            stall_after=count("stall-after", None),
            raise_after=count("raise-after", None),
        )

    def _plan(self, request: GenerationRequest, knobs: _Knobs) -> list[str]:
        if request.model == ECHO_MODEL:
            last_user = next(
                (m.content for m in reversed(request.messages) if m.role == Role.USER), ""
            )
            return _split_fixed(last_user, knobs.echo_token_chars)
        if request.seed is not None:
            seed: int | str = request.seed
        else:
            prompt = "\x1e".join(f"{m.role}:{m.content}" for m in request.messages)
            seed = hashlib.sha256(prompt.encode()).hexdigest()
        # Tokens past max_tokens are never sent: composing them would let a label
        # (answer-tokens=10**9) cost unbounded time and memory.
        count = min(knobs.answer_tokens, request.max_tokens + 1)
        if count > _CACHED_ANSWER_TOKENS:
            return _compose(random.Random(seed), count)
        return list(_composed(seed, count))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str | list[str] | Finish]:
        knobs = self._knobs(request.labels)
        tokens = self._plan(request, knobs)
        reason = FinishReason.STOP
        if len(tokens) > request.max_tokens:
            tokens = tokens[: request.max_tokens]
            reason = FinishReason.LENGTH
        if request.stop:
            cut = _apply_stop(tokens, request.stop)
            if cut is not None:
                tokens, reason = cut, FinishReason.STOP_SEQUENCE
        prompt_tokens = estimate_prompt_tokens(request.messages)
        stats = self.stats
        stats.started += 1
        ticker = self._ticker_for_loop()
        loop = ticker.loop
        # Token i is due at start + ttft + i * delay, however late the loop ran the
        # previous one: sleeping `delay` after each token instead would add every
        # wake-up's lateness to all later tokens (about 1 ms per token on an idle
        # loop, seconds over a long answer on a busy one). A token already due goes
        # out at once, so a stream that fell behind catches up in one burst.
        first_due = loop.time() + knobs.time_to_first_token
        delay = knobs.inter_token_delay
        faults = {knobs.fail_after, knobs.raise_after, knobs.stall_after}
        # Tokens already due go out together, as an upstream's network read
        # would bring them: one hand-off per burst instead of one per token.
        burst: list[str] = []
        now = loop.time()
        try:
            for index, token in enumerate(tokens):
                due = first_due + index * delay
                if due > now:  # only then can the clock matter: time never runs back
                    now = loop.time()
                if burst and (len(burst) >= _BURST or index in faults or due > now):
                    stats.tokens_emitted += len(burst)
                    yield burst[0] if len(burst) == 1 else burst
                    burst = []
                if index == knobs.fail_after:
                    raise BackendUnavailable(
                        f"simulated backend failure after {index} tokens",
                        reason="BACKEND_FAILED",
                    )
                if index == knobs.raise_after:
                    raise RuntimeError(f"simulated crash after {index} tokens")
                if index == knobs.stall_after:
                    await loop.create_future()
                if due > now:
                    await ticker.wait_until(due)
                    now = loop.time()
                burst.append(token)
            if burst:
                stats.tokens_emitted += len(burst)
                yield burst[0] if len(burst) == 1 else burst
        except asyncio.CancelledError:
            stats.cancelled += 1
            self.cancelled.set()
            raise
        stats.finished += 1
        yield Finish(reason=reason, prompt_tokens=prompt_tokens, completion_tokens=len(tokens))

    def _ticker_for_loop(self) -> _Ticker:
        loop = asyncio.get_running_loop()
        ticker = self._ticker
        if ticker is None or ticker.loop is not loop:
            ticker = self._ticker = _Ticker(loop)
        return ticker


class _Ticker:
    """One timer per millisecond slot, shared by every generation on the loop.

    A paced generation waits once per token; with one `asyncio.sleep` each,
    2,000 streams at 20 tokens/s are 40,000 timer handles a second pushed on
    and popped off the loop's heap. Waits that fall due in the same slot share
    one timer instead; a wait ends at the end of its slot (never early, at most
    `resolution` late, about what epoll's millisecond timeout costs anyway).
    """

    __slots__ = ("_resolution", "_slots", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = 0.001) -> None:
        self.loop = loop
        self._resolution = resolution
        self._slots: dict[int, list[asyncio.Future[None]]] = {}

    def wait_until(self, when: float) -> asyncio.Future[None]:
        """A future resolved once loop time `when` has passed."""
        slot = math.ceil(when / self._resolution)
        waiter: asyncio.Future[None] = self.loop.create_future()
        waiters = self._slots.get(slot)
        if waiters is None:
            waiters = self._slots[slot] = []
            self.loop.call_at(slot * self._resolution, self._fire, slot)
        waiters.append(waiter)
        return waiter

    def _fire(self, slot: int) -> None:
        for waiter in self._slots.pop(slot):
            if not waiter.done():  # a cancelled generation leaves its waiter cancelled
                waiter.set_result(None)
