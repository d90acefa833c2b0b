"""Builds the backends a configuration asks for, and the default model among them."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from tokenwire_server.backends.base import Backend
from tokenwire_server.backends.openai_compat import OpenAICompatibleBackend
from tokenwire_server.backends.simulator import SIM_MODEL, SimulatorBackend
from tokenwire_server.config import Config, UpstreamConfig, all_upstreams


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
    backends.extend(build_upstreams(all_upstreams(config), env))
    return backends, default_model


def build_upstreams(
    routes: Sequence[UpstreamConfig], env: Mapping[str, str] | None = None
) -> list[Backend]:
    """One backend per upstream route, each knowing its fallbacks."""
    env = os.environ if env is None else env
    built = {u.name: OpenAICompatibleBackend(u, env) for u in routes}
    for route in built.values():
        route.fallbacks = [built[name] for name in route.config.fallback]
    return list(built.values())


def is_upstream(backend: Backend) -> bool:
    """Whether `backend` came from a route of the config file (reloadable)."""
    return isinstance(backend, OpenAICompatibleBackend)
