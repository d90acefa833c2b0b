"""Built-in detectors: what sensitive values look like, and how to confirm one.

Each detector is a regular expression (compiled with the `regex` module, whose
partial matching tells the streaming stage exactly how much trailing text
could still become a match) plus an optional checksum that rejects
look-alikes: Luhn for payment cards, ISO 13616 mod-97 for IBANs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import regex


@dataclass(frozen=True, slots=True)
class Detector:
    name: str
    entity_type: str
    pattern: regex.Pattern[str]
    validate: Callable[[str], bool] | None = None
    #: For values that can outgrow the hold-back cap (key blocks): where they end.
    end_marker: regex.Pattern[str] | None = None


def luhn_valid(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for index, digit in enumerate(reversed(digits)):
        if index % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    compact = "".join(text.split()).upper()
    if not 15 <= len(compact) <= 34 or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def _compile(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern, regex.VERSION1)


BUILTIN_DETECTORS: dict[str, Detector] = {
    d.name: d
    for d in (
        Detector(
            "email",
            "EMAIL",
            _compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
        ),
        Detector(
            "payment_card",
            "PAYMENT_CARD",
            _compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])"),
            luhn_valid,
        ),
        Detector(
            "iban",
            "IBAN",
            _compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"),
            iban_valid,
        ),
        Detector("us_ssn", "US_SSN", _compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])")),
        Detector(
            "phone",
            "PHONE",
            _compile(
                r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
                r"\d{3,4}[ .-]?\d{3,4}(?!\w|[ .-]\d)"
            ),
        ),
        Detector(
            "ipv4",
            "IPV4",
            _compile(
                r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]*\d)"
            ),
        ),
        Detector("aws_access_key", "AWS_ACCESS_KEY", _compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")),
        Detector(
            "api_token",
            "API_TOKEN",
            _compile(
                r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"
                r"|gh[pousr]_[A-Za-z0-9]{36,}"
                r"|github_pat_[A-Za-z0-9_]{22,}"
                r"|xox[abprs]-[A-Za-z0-9-]{10,}"
                r"|AIza[0-9A-Za-z_-]{35}"
                r"|(?:sk|rk)_live_[0-9A-Za-z]{24,}"
                r"|hf_[A-Za-z0-9]{30,})"
            ),
        ),
        Detector(
            "bearer_token",
            "BEARER_TOKEN",
            _compile(r"\b[Bb]earer[ \t]+[A-Za-z0-9._~+/-]{16,}=*"),
        ),
        Detector(
            "jwt",
            "JWT",
            _compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}"),
        ),
        Detector(
            "private_key",
            "PRIVATE_KEY",
            _compile(
                r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?"
                r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"
            ),
            end_marker=_compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
        ),
    )
}
