"""An ended response's compact chunk log gives back exactly the chunks it was
made from, and a response replayed from it is the response that was sent."""

from __future__ import annotations

import pickle

import pytest

from tests.conftest import StartServer, chunks_of, collect, completed_of, stream_request
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.delivery.chunks import ChunkRecord, CompactChunks
from tokenwire_server.domain import Action, Operator, utf8_length


def records(texts: list[str], step_ns: int = 1000) -> list[ChunkRecord]:
    """Emission times are whole microseconds, as `emitted_at_ns()` makes them."""
    out, offset = [], 0
    for index, text in enumerate(texts):
        actions = (
            (Action("r", "EMAIL", Operator.REPLACE, offset, offset + 3),) if index == 1 else ()
        )
        out.append(
            ChunkRecord(index + 1, text, offset, index % 3 + 1, actions, 10**18 + index * step_ns)
        )
        offset += utf8_length(text)
    return out


@pytest.mark.parametrize(
    "texts",
    [
        ["Hello", " world", ", again", "."],
        ["naïve ", "東京", "🔑 key", "", "end"],  # byte offsets differ from characters
        ["x" * 5000],
        [],
    ],
)
def test_compact_chunks_give_back_the_same_records(texts: list[str]) -> None:
    original = records(texts)
    compact = CompactChunks(original)
    assert len(compact) == len(original)
    assert list(compact) == original
    assert compact[:] == original and compact[1:3] == original[1:3]
    for index in range(-len(original), len(original)):
        assert compact[index] == original[index]
    with pytest.raises(IndexError):
        compact[len(original)]
    with pytest.raises(RuntimeError):
        compact.append(original[0] if original else records(["a"])[0])
    assert compact.text == "".join(texts)


def test_wide_values_keep_their_exact_values() -> None:
    """Text past 64 Ki characters and chunks hours apart leave the narrow arrays."""
    texts = ["a" * 70_000, "b", "c"]
    original = records(texts, step_ns=3 * 3600 * 10**9)  # 3 hours between chunks
    assert list(CompactChunks(original)) == original


def test_the_compact_log_survives_packing() -> None:
    original = records(["naïve ", "東京", "🔑 key", "", "end"])
    packed = pickle.loads(pickle.dumps(CompactChunks(original)))
    assert list(packed) == original


async def test_a_compacted_response_replays_chunk_for_chunk(start_server: StartServer) -> None:
    server = await start_server()
    request = stream_request(
        resumable=True,
        chunking=pb.Chunking(max_tokens_per_chunk=1),
        labels={"tokenwire.sim/answer-tokens": "64"},
    )
    first = await collect(server.stub.StreamRespond(request))
    response_id = completed_of(first).response_id
    kept = await server.server.store.get(response_id)
    assert kept is not None and isinstance(kept.chunks, CompactChunks)
    replay = await collect(
        server.stub.StreamRespond(
            pb.StreamRespondRequest(resume=pb.ResumeFrom(response_id=response_id))
        )
    )
    assert chunks_of(replay) == chunks_of(first)
    assert completed_of(replay) == completed_of(first)
