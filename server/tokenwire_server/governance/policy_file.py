"""Loads a policy from a YAML or TOML file (or a built-in name) and checks it whole.

Every mistake is reported with its place in the file, and a policy that
cannot be enforced as written (an unknown detector, a bad pattern, a keyed
hash without a key) is refused: the server will not start with it, and a
reload keeps the previous policy.

Why one module: every key a policy file may hold is read and checked here,
with one error format (file, rule, field); the escalation section is parsed
beside the rules it names (flag rule ids) so a rule it cites must exist.
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
from tokenwire_server.governance.detectors import (
    BUILTIN_DETECTORS,
    MATCH_BUDGET_SECONDS,
    Detector,
)
from tokenwire_server.governance.escalation import (
    MAX_EXPIRE_AFTER,
    VALIDATOR_OUTCOMES,
    EscalationAction,
    EscalationRule,
    EscalationRules,
)
from tokenwire_server.governance.pattern_safety import nested_unbounded_quantifier
from tokenwire_server.governance.policy import PassThroughPolicy, Policy
from tokenwire_server.governance.redaction import RedactionRule, Redactor
from tokenwire_server.governance.rules_policy import (
    BLOCK_ENTITY,
    FLAG_ENTITY,
    RulesPolicy,
    TextRule,
)
from tokenwire_server.reload import FileProblem

DEFAULT_REFUSAL = "This response was blocked by policy."
DEFAULT_HASH_KEY_ENV = "TOKENWIRE_POLICY_HASH_KEY"
BUILTIN_PREFIX = "builtin:"
_OPERATORS = {"mask": Operator.MASK, "replace": Operator.REPLACE, "hash": Operator.HASH}


class PolicyError(FileProblem):
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
        return _build(yaml.safe_load(resource.read_text(encoding="utf-8")), source, env)
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
    return _build(spec, source, env)


def _build(spec: object, source: str, env: Mapping[str, str]) -> RulesPolicy:
    """`build_policy`, with any shape it did not foresee refused as a PolicyError
    (a reload must never die of a wrongly typed field)."""
    try:
        return build_policy(spec, source, env)
    except PolicyError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as error:
        raise PolicyError(f"{source}: malformed policy: {type(error).__name__}: {error}") from error


def _compile(pattern: object, where: str) -> regex.Pattern[str]:
    """A policy pattern that compiles and has no obviously catastrophic shape."""
    if not isinstance(pattern, str) or not pattern:
        raise PolicyError(f"{where}: pattern must be a non-empty string")
    try:
        compiled = regex.compile(pattern, regex.VERSION1)
    except regex.error as error:
        pos = getattr(error, "pos", None)  # types-regex does not declare it
        position = f" at position {pos}" if pos is not None else ""
        raise PolicyError(
            f"{where}: bad pattern{position}: {getattr(error, 'msg', error)}"
        ) from error
    nested = nested_unbounded_quantifier(pattern)
    if nested is not None:
        outer, inner = nested
        raise PolicyError(
            f"{where}: catastrophic pattern at position {outer}: an unbounded quantifier "
            f"repeats a group with another one (position {inner}); bound one of them, or "
            "make it atomic (?>...) or possessive (*+, ++)"
        )
    return compiled


#: Characters that render as nothing: zero-width space and joiners, word
#: joiner, BOM, soft hyphen, bidi marks, variation selectors, fillers.
_INVISIBLE = r"\p{Default_Ignorable_Code_Point}"
#: What may stand between two words of a term, in any run: whitespace (a
#: no-break or thin space, a tab, a line break) and invisible characters. A
#: hyphen or other visible mark is a different spelling (list it as a term).
_TERM_GAP = rf"[\s{_INVISIBLE}]"
#: A term's edges look past invisible characters to the visible neighbour, as
#: Unicode word segmentation does: a zero-width joiner before a term does not
#: make it part of a longer word, a letter behind one does. Fifteen at most,
#: so the lookbehind stays within the context a stream keeps
#: (`redaction.CONTEXT_CHARS`, 16) and costs constant time.
_VISIBLE_WORD_CHAR = rf"[\w--{_INVISIBLE}]"
_TERM_BEFORE = rf"(?<!{_VISIBLE_WORD_CHAR}{_INVISIBLE}{{0,15}})"
_TERM_AFTER = rf"(?!{_INVISIBLE}{{0,15}}{_VISIBLE_WORD_CHAR})"


def _terms_pattern(terms: object, where: str) -> regex.Pattern[str]:
    """Case-insensitive whole words; between two words of a term, any run of
    `_TERM_GAP` (possessive: linear, and it still matches partially, so a term
    or its gap split across tokens is held)."""
    if not isinstance(terms, list) or not terms or not all(isinstance(t, str) and t for t in terms):
        raise PolicyError(f"{where}: terms must be a non-empty list of strings")
    split: list[list[str]] = []
    for term in terms:
        words = [w for w in regex.split(rf"{_TERM_GAP}+", term, flags=regex.VERSION1) if w]
        if not words:
            raise PolicyError(f"{where}: term {term!r} has no word in it")
        split.append(words)
    split.sort(key=lambda words: len(" ".join(words)), reverse=True)  # longest first
    # Only the words ignore case: a property class under (?i) costs ten times more.
    alternatives = "|".join(
        f"{_TERM_GAP}++".join(f"(?i:{regex.escape(w)})" for w in words) for words in split
    )
    return _compile(f"{_TERM_BEFORE}(?:{alternatives}){_TERM_AFTER}", where)


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


def _entity_type(rule: Mapping[str, Any], where: str, default: str) -> str:
    entity = rule.get("entity_type", default)
    if not isinstance(entity, str) or not entity:
        raise PolicyError(f"{where}: entity_type must be a non-empty string")
    return entity


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
        "escalation",
    }
    for key in sorted(str(k) for k in set(spec) - known):
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
        operator_name = item.get("operator", "replace")
        operator = _OPERATORS.get(operator_name) if isinstance(operator_name, str) else None
        if operator is None:
            raise PolicyError(f"{where}: operator must be mask, replace or hash")
        if "detector" in item:
            name = item["detector"]
            detector = BUILTIN_DETECTORS.get(name) if isinstance(name, str) else None
            if detector is None:
                raise PolicyError(
                    f"{where}: unknown detector {item['detector']!r}; "
                    f"known: {', '.join(sorted(BUILTIN_DETECTORS))}"
                )
            rule_id = _rule_id(item, where, detector.name)
        else:
            rule_id = _rule_id(item, where)
            entity = _entity_type(item, where, rule_id.upper().replace("-", "_"))
            detector = Detector(
                rule_id, entity, _compile(item.get("pattern"), where), budget=MATCH_BUDGET_SECONDS
            )
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
                RedactionRule(
                    rule_id,
                    Detector(rule_id, BLOCK_ENTITY, pattern, budget=MATCH_BUDGET_SECONDS),
                    Operator.BLOCK,
                )
            )
        else:
            raise PolicyError(f"{where}: scope must be stream or final")

    flags = tuple(
        TextRule(
            _rule_id(item, f"{source}: flag[{i}]"),
            _matcher(item, f"{source}: flag[{i}]"),
            _entity_type(item, f"{source}: flag[{i}]", FLAG_ENTITY),
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

    escalation = parse_escalation(
        spec.get("escalation", []), source, frozenset(f.rule_id for f in flags)
    )
    policy = RulesPolicy(
        policy_id=policy_id,
        policy_version=str(version),
        redactor=Redactor(tuple(rules), hash_key, holdback),
        final_blocks=tuple(final_blocks),
        flags=flags,
        refusal_text=refusal,
        token_events=bool(audit.get("token_events", False)),
    )
    policy.escalation = escalation
    return policy


_ESCALATION_KEYS = {"id", "when", "action", "expire_after"}
_CONDITIONS = {
    "validator_outcome",
    "validators",
    "entity_types",
    "flags",
    "labels",
    "models",
    "tenants",
    "check_errored",
    "diverged",
    "tools",
}


def _names(when: Mapping[str, Any], key: str, where: str) -> frozenset[str]:
    value = when.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{where}: when.{key} must be a list of non-empty strings")
    return frozenset(value)


def _truth(when: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = when.get(key)
    if value is not None and not isinstance(value, bool):
        raise PolicyError(f"{where}: when.{key} must be true or false")
    return value


def parse_escalation(raw: object, source: str, flag_ids: frozenset[str]) -> EscalationRules:
    """The `escalation:` section: a list of rules, each `id`, `when` (conditions,
    all of which must hold), `action` (hold | review_after) and `expire_after`
    (seconds, default 24 h). Refused with the file and the rule's place, like
    every other policy mistake: unknown keys or conditions, no condition at all,
    an unknown validator outcome, a flag rule the policy does not have."""
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise PolicyError(f"{source}: escalation must be a list of tables")
    rules: list[EscalationRule] = []
    for index, item in enumerate(raw):
        where = f"{source}: escalation[{index}]"
        for key in sorted(str(k) for k in set(item) - _ESCALATION_KEYS):
            raise PolicyError(
                f"{where}: unknown key {key!r} (known: action, expire_after, id, when)"
            )
        rule_id = _rule_id(item, where)
        where = f"{where} ({rule_id})"
        action_name = item.get("action")
        try:
            action = EscalationAction(action_name)
        except ValueError:
            raise PolicyError(f"{where}: action must be hold or review_after") from None
        expire = item.get("expire_after", 86_400)
        if (
            not isinstance(expire, int | float)
            or isinstance(expire, bool)
            or not 0 < expire <= MAX_EXPIRE_AFTER
        ):
            raise PolicyError(
                f"{where}: expire_after must be seconds > 0 and <= {MAX_EXPIRE_AFTER:.0f} (30 days)"
            )
        when = item.get("when")
        if not isinstance(when, dict) or not when:
            raise PolicyError(f"{where}: when must be a table with at least one condition")
        for key in sorted(str(k) for k in set(when) - _CONDITIONS):
            raise PolicyError(
                f"{where}: unknown condition {key!r} (known: {', '.join(sorted(_CONDITIONS))})"
            )
        outcomes = _names(when, "validator_outcome", where)
        for word in sorted(outcomes - VALIDATOR_OUTCOMES):
            raise PolicyError(
                f"{where}: when.validator_outcome: unknown outcome {word!r} "
                f"(known: {', '.join(sorted(VALIDATOR_OUTCOMES))})"
            )
        validators = _names(when, "validators", where)
        if validators and not outcomes:
            raise PolicyError(f"{where}: when.validators needs when.validator_outcome")
        flags = _names(when, "flags", where)
        for flag in sorted(flags - flag_ids):
            raise PolicyError(f"{where}: when.flags: the policy has no flag rule {flag!r}")
        labels = when.get("labels", {})
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise PolicyError(f"{where}: when.labels must map label names to string values")
        rules.append(
            EscalationRule(
                rule_id=rule_id,
                action=action,
                expire_after=float(expire),
                validator_outcomes=outcomes,
                validators=validators,
                entity_types=_names(when, "entity_types", where),
                flags=flags,
                labels=tuple(sorted(labels.items())),
                models=_names(when, "models", where),
                tenants=_names(when, "tenants", where),
                check_errored=_truth(when, "check_errored", where),
                diverged=_truth(when, "diverged", where),
                tools=_names(when, "tools", where),
            )
        )
    ids = [rule.rule_id for rule in rules]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise PolicyError(
            f"{source}: escalation rule ids must be unique; repeated: {', '.join(duplicates)}"
        )
    return EscalationRules(tuple(rules))
