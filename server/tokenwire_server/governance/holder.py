"""The current policy, swapped atomically on reload.

Each response takes the policy current when it starts and keeps it to the
end, so a reload never changes a stream midway; a reload that fails, for any
reason (a PolicyError, or a field of a type the loader did not foresee),
keeps the previous policy and says why in one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from tokenwire_server.governance.policy import Policy
from tokenwire_server.governance.policy_file import BUILTIN_PREFIX, load_policy
from tokenwire_server.reload import FileLoader, Outcome

log = logging.getLogger(__name__)


def policy_loader(source: str, env: Mapping[str, str] | None = None) -> FileLoader[Policy]:
    is_file = source not in ("", "pass-through") and not source.startswith(BUILTIN_PREFIX)
    return FileLoader(
        "policy", source, (source,) if is_file else (), lambda: load_policy(source, env)
    )


class PolicyHolder:
    def __init__(
        self, policy: Policy, source: str | None = None, loader: FileLoader[Policy] | None = None
    ) -> None:
        self.current = policy
        self.source = source
        self._loader = loader if loader is not None or source is None else policy_loader(source)

    @classmethod
    def from_source(cls, source: str, env: Mapping[str, str] | None = None) -> PolicyHolder:
        """Loads `source`; a failure of any kind is a LoadError of one line."""
        loader = policy_loader(source, env)
        return cls(loader.first(), source, loader)

    def reload(self) -> Outcome:
        """Re-reads the policy source; OK when a new policy is now in force."""
        if self._loader is None:
            return Outcome.UNCHANGED
        old = self.current
        policy = self._loader.next(f"{old.policy_id} v{old.policy_version}")
        if policy is None:
            return self._loader.outcome
        self.current = policy
        log.info("policy reloaded: %s v%s", policy.policy_id, policy.policy_version)
        return Outcome.OK
