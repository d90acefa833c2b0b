"""Reloading the config file's routes (and validators) on SIGHUP.

The `[[upstreams]]` routes are the part of the config file that changes while
a service runs (a new model, an upstream moved, a fallback added), so they
reload: the new routes are checked whole, their backends built, and the
routing table swapped in one assignment; `[[validators]]` reload the same
way (new responses use the new list, running ones keep theirs). Calls already running keep the
backend they started on; a retired backend is closed once the longest
deadline has passed, so no running call loses its connection. Every other
setting is read at start only: a change to one is logged as needing a
restart rather than half-applied.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

from tokenwire_server.backends.base import Backend
from tokenwire_server.backends.factory import build_upstreams, is_upstream
from tokenwire_server.backends.registry import BackendRegistry
from tokenwire_server.config import (
    Config,
    FileSettings,
    all_upstreams,
    check_routes,
    read_file_settings,
)
from tokenwire_server.reload import FileLoader, Outcome
from tokenwire_server.validators.runner import Validators

log = logging.getLogger("tokenwire_server.reload")


class RoutingReloader:
    """The config file's routes in force, and their reload."""

    def __init__(
        self,
        config: Config,
        file: Path,
        registry: BackendRegistry,
        validators: Validators | None = None,
    ) -> None:
        self._config = config
        self._validators = validators
        self._validators_in_force = config.validators
        self._file = file
        self._registry = registry
        self._loader = FileLoader("routing", f"config file {file}", (str(file),), self._read)
        #: What the file set when the server started: the settings in force.
        self._at_start = self._loader.first()
        self._routes = config.upstreams
        #: Closing tasks of retired backends, with the backends each will close.
        self._retiring: dict[asyncio.Task[None], list[Backend]] = {}

    def _read(self) -> FileSettings:
        settings = read_file_settings(self._file)
        check_routes(self._config, settings.upstreams, self._file)
        return settings

    def reload(self) -> Outcome:
        settings = self._loader.next(f"the {len(self._routes)} upstream routes in force")
        if settings is None:
            return self._loader.outcome
        outcome = Outcome.UNCHANGED
        if settings.upstreams != self._routes:
            if not self._swap(settings):
                return Outcome.FAILED
            outcome = Outcome.OK
        if self._validators is not None and settings.validators != self._validators_in_force:
            # New responses use the new validators; running ones keep theirs.
            self._validators.configure(settings.validators)
            self._validators_in_force = settings.validators
            log.info(
                "validators reloaded: %s",
                ", ".join(v.name for v in settings.validators) or "none",
            )
            outcome = Outcome.OK
        changed = sorted(
            name
            for name in set(settings.sections) | set(self._at_start.sections)
            if settings.sections.get(name, {}) != self._at_start.sections.get(name, {})
        )
        if changed:
            log.warning(
                "config file %s: [%s] changed; those settings take effect at the next restart",
                self._file,
                "], [".join(changed),
            )
            if outcome is Outcome.UNCHANGED:
                outcome = Outcome.RESTART_REQUIRED
        return outcome

    def _swap(self, settings: FileSettings) -> bool:
        routes = all_upstreams(replace(self._config, upstreams=settings.upstreams))
        fresh = build_upstreams(routes)
        kept = [b for b in self._registry.backends if not is_upstream(b)]
        try:
            retired = self._registry.swap([*kept, *fresh])
        except ValueError as error:
            log.error(
                "routing reload failed, keeping the %d upstream routes in force: "
                "config file %s: %s",
                len(self._routes),
                self._file,
                error,
            )
            self._retire(fresh, delay=0.0)
            return False
        self._routes = settings.upstreams
        self._retire(retired, delay=self._config.deadlines.max_deadline)
        log.info(
            "routing reloaded: %d upstream routes (%s)",
            len(routes),
            ", ".join(r.name for r in routes) or "none",
        )
        return True

    def _retire(self, backends: list[Backend], delay: float) -> None:
        """Closes `backends` after `delay` seconds: calls that started on them
        end within the longest deadline."""

        async def close() -> None:
            await asyncio.sleep(delay)
            for backend in backends:
                await backend.aclose()

        if backends:
            task = asyncio.get_running_loop().create_task(close())
            self._retiring[task] = backends
            task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def aclose(self) -> None:
        """At drain: close retired backends now instead of waiting out their delay."""
        for task, backends in list(self._retiring.items()):
            if task.cancel():
                for backend in backends:
                    await backend.aclose()
        self._retiring.clear()
