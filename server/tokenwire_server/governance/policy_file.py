"""Loads a policy from a YAML or TOML file (or a built-in name) and checks it whole.

Every mistake is reported with its place in the file, and a policy that
cannot be enforced as written (an unknown detector, a bad pattern, a keyed
hash without a key) is refused: the server will not start with it, and a
reload keeps the previous policy.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import regex
import yaml

from tokenwire_server.domain import Operator
from tokenwire_server.governance.detectors import BUILTIN_DETECTORS, Detector
from tokenwire_server.governance.policy import PassThroughPolicy, Policy
from tokenwire_server.governance.redaction import RedactionRule, Redactor
from tokenwire_server.governance.rules_policy import (
    BLOCK_ENTITY,
    FLAG_ENTITY,
    RulesPolicy,
    TextRule,
)

DEFAULT_REFUSAL = "This response was blocked by policy."
DEFAULT_HASH_KEY_ENV = "TOKENWIRE_POLICY_HASH_KEY"
BUILTIN_PREFIX = "builtin:"
_OPERATORS = {"mask": Operator.MASK, "replace": Operator.REPLACE, "hash": Operator.HASH}


class PolicyError(ValueError):
    """The policy file is not usable; the message says where and why."""


def load_policy(source: str, env: Mapping[str, str] | None = None) -> Policy:
    """`pass-through`, `builtin:NAME`, or a path to a .yaml/.yml/.toml policy file."""
    env = os.environ if env is None else env
    if source in ("", "pass-through"):
        return PassThroughPolicy()
    if source.startswith(BUILTIN_PREFIX):
        name = source.removeprefix(BUILTIN_PREFIX)
        resource = resources.files("tokenwire_server.governance") / "policies" / f"{name}.yaml"
        if not resource.is_file():
            raise PolicyError(f"{source}: no built-in policy named {name!r}")
        return build_policy(yaml.safe_load(resource.read_text(encoding="utf-8")), source, env)
    path = Path(source)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PolicyError(f"{source}: {error.strerror or error}") from error
    try:
        if path.suffix == ".toml":
            spec: Any = tomllib.loads(raw)
        elif path.suffix in (".yaml", ".yml"):
            spec = yaml.safe_load(raw)
        else:
            raise PolicyError(f"{source}: policy files end in .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise PolicyError(f"{source}: {error}") from error
    return build_policy(spec, source, env)


def _compile(pattern: object, where: str) -> regex.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise PolicyError(f"{where}: pattern must be a non-empty string")
    try:
        return regex.compile(pattern, regex.VERSION1)
    except regex.error as error:
        raise PolicyError(f"{where}: bad pattern: {error}") from error


def _terms_pattern(terms: object, where: str) -> regex.Pattern[str]:
    if not isinstance(terms, list) or not terms or not all(isinstance(t, str) and t for t in terms):
        raise PolicyError(f"{where}: terms must be a non-empty list of strings")
    alternatives = "|".join(regex.escape(t) for t in sorted(terms, key=len, reverse=True))
    return regex.compile(rf"(?i)(?<!\w)(?:{alternatives})(?!\w)", regex.VERSION1)


def _matcher(rule: Mapping[str, Any], where: str) -> regex.Pattern[str]:
    if ("terms" in rule) == ("pattern" in rule):
        raise PolicyError(f"{where}: give exactly one of terms or pattern")
    if "terms" in rule:
        return _terms_pattern(rule["terms"], where)
    return _compile(rule["pattern"], where)


def _rule_id(rule: Mapping[str, Any], where: str, default: str | None = None) -> str:
    rule_id = rule.get("id", default)
    if not isinstance(rule_id, str) or not rule_id:
        raise PolicyError(f"{where}: id must be a non-empty string")
    return rule_id


def _list(spec: Mapping[str, Any], key: str, source: str) -> list[Mapping[str, Any]]:
    items = spec.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise PolicyError(f"{source}: {key} must be a list of tables")
    return items


def build_policy(spec: object, source: str, env: Mapping[str, str]) -> RulesPolicy:
    if not isinstance(spec, dict):
        raise PolicyError(f"{source}: a policy is a table with id, version and rules")
    known = {
        "id",
        "version",
        "refusal_text",
        "max_holdback_chars",
        "hash_key_env",
        "audit",
        "redact",
        "block",
        "flag",
    }
    for key in sorted(set(spec) - known):
        raise PolicyError(f"{source}: unknown key {key!r}")
    policy_id, version = spec.get("id"), spec.get("version")
    if not isinstance(policy_id, str) or not policy_id:
        raise PolicyError(f"{source}: id must be a non-empty string")
    if not isinstance(version, str | int | float) or isinstance(version, bool) or version == "":
        raise PolicyError(f"{source}: version must be a string or number")
    refusal = spec.get("refusal_text", DEFAULT_REFUSAL)
    if not isinstance(refusal, str) or not refusal:
        raise PolicyError(f"{source}: refusal_text must be a non-empty string")
    holdback = spec.get("max_holdback_chars", 2048)
    if not isinstance(holdback, int) or isinstance(holdback, bool) or holdback < 16:
        raise PolicyError(f"{source}: max_holdback_chars must be an integer of at least 16")
    audit = spec.get("audit", {})
    if not isinstance(audit, dict) or set(audit) - {"token_events"}:
        raise PolicyError(f"{source}: audit takes only token_events")

    rules: list[RedactionRule] = []
    for index, item in enumerate(_list(spec, "redact", source)):
        where = f"{source}: redact[{index}]"
        operator = _OPERATORS.get(item.get("operator", "replace"))
        if operator is None:
            raise PolicyError(f"{where}: operator must be mask, replace or hash")
        if "detector" in item:
            detector = BUILTIN_DETECTORS.get(item["detector"])
            if detector is None:
                raise PolicyError(
                    f"{where}: unknown detector {item['detector']!r}; "
                    f"known: {', '.join(sorted(BUILTIN_DETECTORS))}"
                )
            rule_id = _rule_id(item, where, detector.name)
        else:
            rule_id = _rule_id(item, where)
            entity = item.get("entity_type", rule_id.upper().replace("-", "_"))
            detector = Detector(rule_id, str(entity), _compile(item.get("pattern"), where))
        rules.append(RedactionRule(rule_id, detector, operator))

    final_blocks: list[TextRule] = []
    for index, item in enumerate(_list(spec, "block", source)):
        where = f"{source}: block[{index}]"
        rule_id = _rule_id(item, where)
        pattern = _matcher(item, where)
        scope = item.get("scope", "stream")
        if scope == "final":
            final_blocks.append(TextRule(rule_id, pattern, BLOCK_ENTITY))
        elif scope == "stream":
            rules.append(
                RedactionRule(rule_id, Detector(rule_id, BLOCK_ENTITY, pattern), Operator.BLOCK)
            )
        else:
            raise PolicyError(f"{where}: scope must be stream or final")

    flags = tuple(
        TextRule(
            _rule_id(item, f"{source}: flag[{i}]"),
            _matcher(item, f"{source}: flag[{i}]"),
            str(item.get("entity_type", FLAG_ENTITY)),
        )
        for i, item in enumerate(_list(spec, "flag", source))
    )

    ids = (
        [r.rule_id for r in rules] + [r.rule_id for r in final_blocks] + [r.rule_id for r in flags]
    )
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise PolicyError(f"{source}: rule ids must be unique; repeated: {', '.join(duplicates)}")

    hash_key: bytes | None = None
    if any(r.operator is Operator.HASH for r in rules):
        key_env = spec.get("hash_key_env", DEFAULT_HASH_KEY_ENV)
        key = env.get(str(key_env), "")
        if len(key) < 16:
            raise PolicyError(
                f"{source}: the hash operator needs a key of at least 16 characters in ${key_env}"
            )
        hash_key = key.encode()

    return RulesPolicy(
        policy_id=policy_id,
        policy_version=str(version),
        redactor=Redactor(tuple(rules), hash_key, holdback),
        final_blocks=tuple(final_blocks),
        flags=flags,
        refusal_text=refusal,
        token_events=bool(audit.get("token_events", False)),
    )
