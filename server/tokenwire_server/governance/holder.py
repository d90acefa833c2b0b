"""The current policy, swapped atomically on reload.

Each response takes the policy current when it starts and keeps it to the
end, so a reload never changes a stream midway; a reload that fails keeps the
previous policy and says why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from tokenwire_server.governance.policy import Policy
from tokenwire_server.governance.policy_file import PolicyError, load_policy

log = logging.getLogger(__name__)


class PolicyHolder:
    def __init__(self, policy: Policy, source: str | None = None) -> None:
        self.current = policy
        self.source = source

    @classmethod
    def from_source(cls, source: str, env: Mapping[str, str] | None = None) -> PolicyHolder:
        return cls(load_policy(source, env), source)

    def reload(self, env: Mapping[str, str] | None = None) -> bool:
        """Re-reads the policy source; True when a new policy is now in force."""
        if self.source is None:
            return False
        try:
            policy = load_policy(self.source, env)
        except PolicyError as error:
            log.error(
                "policy reload failed, keeping %s v%s: %s",
                self.current.policy_id,
                self.current.policy_version,
                error,
            )
            return False
        self.current = policy
        log.info("policy reloaded: %s v%s", policy.policy_id, policy.policy_version)
        return True
