"""An ended response as one bytes object: what the in-memory store keeps of it.

A store keeps every ended response for `retention` seconds (resume and
idempotent retries), thousands at once. Kept as objects, each is a few hundred
small Python objects (~14 KB for a 256-token answer even with the compact
chunk log), and the cyclic garbage collector walks every one of them on each
full collection, which a first chunk then waits behind. Packed, an ended
response is one bytes object the collector does not track, whose size the
store counts exactly (`store_max_bytes` bounds real memory). The state is
pickled: this process made it and is the only one to read it, and pickle's
C encoder packs a 256-chunk answer in ~30 us, after its last reader left.
Not compressed: zlib's set-up alone costs ~25 us a call, and once the chunk
log is compact (delivery/chunks.py) and `Completed` no longer repeats the
final text, what is left is mostly the text itself. A resumed or retried call
unpacks it again (`LiveResponse.unpacked`).
"""

from __future__ import annotations

import pickle
from typing import cast


def pack(state: dict[str, object]) -> bytes:
    return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(packed: bytes) -> dict[str, object]:
    return cast(dict[str, object], pickle.loads(packed))
