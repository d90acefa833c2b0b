"""A tokenizer-shaped count for backends and failures that report no usage."""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenwire_server.domain import Message

_TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
#: Chat templates add a few tokens of framing per message.
MESSAGE_OVERHEAD_TOKENS = 3


def count_tokens(text: str) -> int:
    """Words and punctuation marks: close to BPE counts for English prose."""
    return len(_TOKEN_PATTERN.findall(text))


def estimate_prompt_tokens(messages: Iterable[Message]) -> int:
    return sum(count_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS for m in messages)
