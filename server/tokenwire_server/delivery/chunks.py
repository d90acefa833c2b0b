"""Chunks as cut, and the compact log an ended response keeps of them.

A running response keeps one `ChunkRecord` per chunk: a tuple, a string and
up to three boxed integers each, about 220 bytes for a one-token chunk. An
ended response is kept for `retention` seconds so it can be resumed or
retried into, and thousands are kept at once; per chunk, all a replay needs
is its text, offset, token count, emission time and actions. Here the texts
are one string and the numbers sit in typed arrays (about 6 bytes a chunk),
and a `ChunkRecord` is rebuilt, identical, when a reader asks for one.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterator, Sequence
from itertools import accumulate
from typing import NamedTuple, Protocol, overload

from tokenwire_server.domain import Action


class ToolDelta(NamedTuple):
    """What makes a chunk a tool-call fragment: which call, and where in its
    arguments the fragment starts (`id` and `name` on the call's first one)."""

    position: int
    id: str
    name: str
    arguments_offset: int


class ChunkRecord(NamedTuple):
    """One chunk of the log, as cut. A named tuple, not a frozen dataclass: one is
    built per chunk on the hot path, and a frozen dataclass's `__init__` costs
    three times as much (it sets every field through `object.__setattr__`).

    A tool-call fragment is a chunk too (one sequence runs over both): `text`
    holds the arguments fragment, `tool` says which call, and `text_offset`
    stays where the text is (it counts text bytes only)."""

    sequence: int
    text: str
    text_offset: int
    token_count: int
    actions: tuple[Action, ...]
    #: Wall-clock time, in whole microseconds (`emitted_at_ns()`), so the compact
    #: log keeps it exactly in four bytes.
    emitted_at_ns: int
    tool: ToolDelta | None = None


def emitted_at_ns() -> int:
    """Now, as a chunk's emission time: nanoseconds since the epoch, whole microseconds."""
    return time.time_ns() // 1000 * 1000


class ChunkSequence(Protocol):
    """A chunk log: a list while the response runs, `CompactChunks` once ended."""

    def __len__(self) -> int: ...

    @overload
    def __getitem__(self, index: int) -> ChunkRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[ChunkRecord]: ...

    def __iter__(self) -> Iterator[ChunkRecord]: ...

    def append(self, record: ChunkRecord, /) -> None: ...


class CompactChunks(Sequence[ChunkRecord]):
    """A read-only chunk log; sequences are 1..n, as `LiveResponse` cuts them."""

    __slots__ = (
        "_actions",
        "_emitted",
        "_ends",
        "_first_emitted_ns",
        "_offsets",
        "_text",
        "_tokens",
        "_tools",
    )

    def __init__(self, records: Sequence[ChunkRecord]) -> None:
        self._text = "".join(r.text for r in records)
        lengths = list(accumulate(len(r.text) for r in records))
        # Two bytes a chunk end while the text is under 64 Ki characters.
        self._ends = array("H" if not lengths or lengths[-1] < 1 << 16 else "I", lengths)
        self._tools: dict[int, ToolDelta] = {
            index: r.tool for index, r in enumerate(records) if r.tool is not None
        }
        # ASCII text without tool-call fragments (the common case): a chunk's
        # byte offset is where the previous chunk's text ended, so no array is needed.
        self._offsets = (
            None
            if self._text.isascii() and not self._tools
            else array("Q", (r.text_offset for r in records))
        )
        tokens = array("I", (r.token_count for r in records))
        #: One token a chunk (the common case) needs no array either.
        self._tokens = None if tokens.count(1) == len(tokens) else tokens
        # Emission times are whole microseconds (ChunkRecord), kept as microseconds
        # since the first chunk: four bytes a chunk for answers up to 71 minutes long.
        first = records[0].emitted_at_ns if records else 0
        since = [(r.emitted_at_ns - first) // 1000 for r in records]
        self._first_emitted_ns = first
        self._emitted = array("I" if not since or since[-1] < 1 << 32 else "Q", since)
        self._actions: dict[int, tuple[Action, ...]] = {
            index: r.actions for index, r in enumerate(records) if r.actions
        }

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> ChunkRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[ChunkRecord]: ...

    def __getitem__(self, index: int | slice) -> ChunkRecord | list[ChunkRecord]:
        if isinstance(index, slice):
            return [self._record(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("chunk index out of range")
        return self._record(index)

    def __iter__(self) -> Iterator[ChunkRecord]:
        return (self._record(i) for i in range(len(self)))

    def append(self, record: ChunkRecord, /) -> None:
        raise RuntimeError("an ended response's chunk log takes no more chunks")

    def _record(self, index: int) -> ChunkRecord:
        start = self._ends[index - 1] if index else 0
        return ChunkRecord(
            index + 1,
            self._text[start : self._ends[index]],
            start if self._offsets is None else self._offsets[index],
            1 if self._tokens is None else self._tokens[index],
            self._actions.get(index, ()),
            self._first_emitted_ns + self._emitted[index] * 1000,
            self._tools.get(index) if self._tools else None,
        )

    @property
    def text(self) -> str:
        """All chunks' text, in order (tool-call fragments included, when any)."""
        return self._text
