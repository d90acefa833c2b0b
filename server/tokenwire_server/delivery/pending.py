"""Governed text that generation released and no reader has cut into a chunk yet.

This is where governance's output waits for the writer, and where
backpressure lives: past `max_chars` generation parks in `wait_for_space`
until a reader has taken half of it (hysteresis: a producer parked at the
budget resumes once per half-budget of text, not after every chunk).

Pieces are kept one per released token (so `max_tokens_per_chunk` can be
honoured) in deques: a fast model can run thousands of tokens ahead of a
slow reader, and cutting from the front of a list would cost O(pending) per
chunk.

Tool-call fragments wait in the same queue, so they keep their place among
the text: a chunk is text or fragments of one call, never both.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from tokenwire_server.domain import Action, utf8_length


class ToolPiece(NamedTuple):
    """A governed fragment of a tool call's arguments; `actions` are byte
    positions in that call's arguments."""

    position: int
    id: str
    name: str
    arguments: str
    actions: tuple[Action, ...]


#: What `take` returns: text (or arguments), tokens, actions, and the tool
#: piece the chunk continues (None for text).
Taken = tuple[str, int, tuple[Action, ...], ToolPiece | None]


class PendingText:
    def __init__(self, loop: asyncio.AbstractEventLoop, max_chars: int) -> None:
        self._loop = loop
        self._max_chars: float = max_chars
        self._pieces: deque[str | ToolPiece] = deque()
        #: Tool pieces among them: while there are none, cutting takes the text-only path.
        self._tools = 0
        self._counts: deque[int] = deque()
        #: Tokens and characters of the pieces waiting.
        self.tokens = 0
        self.chars = 0
        #: Actions on released text, by offset, not yet attached to a chunk.
        self._actions: list[Action] = []
        #: Tokens that produced no text yet; they ride on the next piece.
        self._carry = 0
        #: When the oldest waiting piece was released (loop time).
        self.since = 0.0
        self._space: asyncio.Future[None] | None = None

    def __bool__(self) -> bool:
        return bool(self._pieces)

    # ----- generation adds ---------------------------------------------------

    def add(self, text: str, actions: tuple[Action, ...], tokens: int) -> bool:
        """One release; False when it brought no text (its tokens carry over)."""
        if actions:
            self._actions.extend(actions)
        if not text:
            self._carry += tokens
            return False
        self._extend([text], [tokens + self._carry], len(text))
        return True

    def add_tokens(self, tokens: list[str]) -> None:
        """Tokens that passed governance untouched and all carry text, in one step."""
        counts = [1] * len(tokens)
        counts[0] += self._carry
        self._extend(tokens, counts, sum(map(len, tokens)))  # type: ignore[arg-type]

    def add_tool(self, piece: ToolPiece, tokens: int) -> None:
        """A tool-call fragment; like text, it waits for a reader in order."""
        self._tools += 1
        self._extend([piece], [tokens + self._carry], len(piece.arguments))

    def _extend(self, pieces: list[str | ToolPiece], counts: list[int], chars: int) -> None:
        if not self._pieces:
            self.since = self._loop.time()
        self._pieces.extend(pieces)
        self._counts.extend(counts)
        self.tokens += sum(counts)
        self._carry = 0
        self.chars += chars

    def settle(self) -> None:
        """At the end, tokens and actions that came with no text ride on an empty piece."""
        if self._carry or (self._actions and not self._pieces):
            if not self._pieces:
                self.since = self._loop.time()
            self._pieces.append("")
            self._counts.append(self._carry)
            self.tokens += self._carry
            self._carry = 0

    # ----- readers take --------------------------------------------------------

    def take(self, max_tokens: int, offset: int) -> Taken:
        """The next chunk's text, tokens and actions: up to `max_tokens` tokens
        (at least one piece), starting at byte `offset` of the stream."""
        if self._tools:
            return self._take_mixed(max_tokens, offset)
        pieces, counts = self._pieces, self._counts
        text, tokens = pieces.popleft(), counts.popleft()
        if pieces and tokens + counts[0] <= max_tokens:
            parts = [text]
            while pieces and tokens + counts[0] <= max_tokens:
                parts.append(pieces.popleft())
                tokens += counts.popleft()
            text = "".join(parts)  # type: ignore[arg-type]
        self.tokens -= tokens
        self.chars -= len(text)
        # `since` stays at the oldest piece's release: text left over from a
        # full chunk has waited that long already, and restarting its clock here
        # would let `max_delay` hold it longer than the caller allowed.
        actions = self._take_actions(offset + utf8_length(text)) if self._actions else ()  # type: ignore[arg-type]
        space = self._space
        if space is not None and self.chars <= self._max_chars / 2 and not space.done():
            space.set_result(None)
        return text, tokens, actions, None  # type: ignore[return-value]

    def _take_mixed(self, max_tokens: int, offset: int) -> Taken:
        """`take` when tool pieces wait: a chunk never mixes text and a call,
        and coalesces only fragments of the same call."""
        pieces, counts = self._pieces, self._counts
        first, tokens = pieces.popleft(), counts.popleft()
        if isinstance(first, str):
            parts = [first]
            while pieces and isinstance(pieces[0], str) and tokens + counts[0] <= max_tokens:
                parts.append(pieces.popleft())  # type: ignore[arg-type]
                tokens += counts.popleft()
            text = "".join(parts)
            self.tokens -= tokens
            self.chars -= len(text)
            text_actions = self._take_actions(offset + utf8_length(text)) if self._actions else ()
            self._wake_producer()
            return text, tokens, text_actions, None
        self._tools -= 1
        arguments, actions = [first.arguments], list(first.actions)
        while pieces and tokens + counts[0] <= max_tokens:
            after = pieces[0]
            if isinstance(after, str) or after.position != first.position:
                break
            pieces.popleft()
            self._tools -= 1
            tokens += counts.popleft()
            arguments.append(after.arguments)
            actions.extend(after.actions)
        text = "".join(arguments)
        self.tokens -= tokens
        self.chars -= len(text)
        self._wake_producer()
        return text, tokens, tuple(actions), first

    def _wake_producer(self) -> None:
        space = self._space
        if space is not None and self.chars <= self._max_chars / 2 and not space.done():
            space.set_result(None)

    def _take_actions(self, end: int) -> tuple[Action, ...]:
        taken = tuple(a for a in self._actions if a.start < end)
        self._actions = [a for a in self._actions if a.start >= end]
        return taken

    def drop(self) -> None:
        """Forgets everything waiting (a buffered response sends its final payload instead)."""
        self._pieces.clear()
        self._counts.clear()
        self._tools = 0
        self.tokens = 0
        self.chars = 0
        self._actions = []

    # ----- backpressure --------------------------------------------------------

    @property
    def room(self) -> float:
        """Characters that may still be released before the budget is spent."""
        return self._max_chars - self.chars

    @property
    def over_budget(self) -> bool:
        return self.chars > self._max_chars

    def unbounded(self) -> None:
        """No streaming reader will take this text (unary, BUFFERED): never wait for one."""
        self._max_chars = math.inf
        self.free()

    def free(self) -> None:
        """Lets a parked producer go (the response ended, or the budget is gone)."""
        if self._space is not None and not self._space.done():
            self._space.set_result(None)

    async def wait_for_space(self, running: Callable[[], bool]) -> None:
        """Returns once a reader has taken enough, or the response stopped running."""
        while self.chars > self._max_chars and running():
            self._space = self._loop.create_future()
            await self._space
