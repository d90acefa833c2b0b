"""Maps a request's model name to the backend that serves it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from tokenwire_server.backends.base import Backend
from tokenwire_server.domain import ModelInfo
from tokenwire_server.errors import NotFound


def _routes(
    backends: Sequence[Backend], default_model: str
) -> dict[str, tuple[Backend, ModelInfo]]:
    routes: dict[str, tuple[Backend, ModelInfo]] = {}
    for backend in backends:
        for model, version in backend.models().items():
            if model in routes:
                raise ValueError(f"model {model!r} is served by two backends")
            routes[model] = (backend, ModelInfo(model, version, backend.name))
    if default_model not in routes:
        raise ValueError(f"default model {default_model!r} is not served; known: {sorted(routes)}")
    return routes


class BackendRegistry:
    """Model routing table; lookups are one dict access.

    A routing reload builds the whole new table first and swaps it in one
    assignment, so a request sees the old table or the new one, never half."""

    def __init__(self, backends: Iterable[Backend], default_model: str) -> None:
        self._backends = list(backends)
        self._routes = _routes(self._backends, default_model)
        self.default_model = default_model

    @property
    def backends(self) -> Sequence[Backend]:
        return tuple(self._backends)

    def swap(self, backends: Sequence[Backend]) -> list[Backend]:
        """Routes to `backends` from now on; returns the backends no longer routed
        to (the caller closes them once calls already using them are over).
        Raises ValueError, leaving the table as it was, when they do not fit."""
        routes = _routes(backends, self.default_model)
        retired = [b for b in self._backends if all(b is not n for n in backends)]
        self._routes, self._backends = routes, list(backends)
        return retired

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
