"""Builds the backends a configuration asks for, and the default model among them."""

from __future__ import annotations

import os
from collections.abc import Mapping

from tokenwire_server.backends.base import Backend
from tokenwire_server.backends.openai_compat import OpenAICompatibleBackend
from tokenwire_server.backends.simulator import SIM_MODEL, SimulatorBackend
from tokenwire_server.config import Config, all_upstreams


def build_backends(
    config: Config, env: Mapping[str, str] | None = None
) -> tuple[list[Backend], str]:
    """The simulator always; llama when chosen; one backend per upstream route.

    With `--backend llama` the llama model is the default unless
    `--default-model` names another.
    """
    env = os.environ if env is None else env
    backends: list[Backend] = [SimulatorBackend(config.simulator)]
    default_model = config.models.default_model
    if config.backends.backend == "llama":
        from tokenwire_server.backends.llama import LlamaBackend

        llama = LlamaBackend(config.backends.llama_model_path or None)
        backends.append(llama)
        if default_model == SIM_MODEL:
            default_model = llama.model_name
    routes = {u.name: OpenAICompatibleBackend(u, env) for u in all_upstreams(config)}
    for route in routes.values():
        route.fallbacks = [routes[name] for name in route.config.fallback]
    backends.extend(routes.values())
    return backends, default_model
