"""Maps a request's model name to the backend that serves it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tokenwire_server.backends.base import Backend
from tokenwire_server.domain import ModelInfo
from tokenwire_server.errors import NotFound


class BackendRegistry:
    """Model routing table built once at start-up; lookups are one dict access."""

    def __init__(self, backends: Iterable[Backend], default_model: str) -> None:
        self._routes: dict[str, tuple[Backend, ModelInfo]] = {}
        self._backends = list(backends)
        for backend in self._backends:
            for model, version in backend.models().items():
                if model in self._routes:
                    raise ValueError(f"model {model!r} is served by two backends")
                self._routes[model] = (backend, ModelInfo(model, version, backend.name))
        if default_model not in self._routes:
            raise ValueError(
                f"default model {default_model!r} is not served; known: {sorted(self._routes)}"
            )
        self.default_model = default_model

    def resolve(self, model: str) -> tuple[Backend, ModelInfo]:
        """The backend and model info for `model` ('' means the default model)."""
        route = self._routes.get(model or self.default_model)
        if route is None:
            raise NotFound(
                f"model {model!r} is not served here",
                reason="MODEL_NOT_FOUND",
                metadata={"model": model, "knownModels": ",".join(sorted(self._routes))},
            )
        return route

    def models(self) -> Mapping[str, ModelInfo]:
        return {name: info for name, (_, info) in self._routes.items()}

    async def aclose(self) -> None:
        for backend in self._backends:
            await backend.aclose()
