"""Built-in detectors: what sensitive values look like, and how to confirm one.

Each detector finds a value by its own shape (prefix, alphabet, length,
checksum), never by what surrounds it: a key written between letters
(`xAKIA...y`, `token=ghp_...end`) is still a key. Where a glued neighbour
makes the end of a value ambiguous, the pattern takes the longer span, so
the redaction fails closed. Look-alikes are told apart by what the value
itself carries: Luhn for payment cards, the ISO 13616 country length and
mod-97 for IBANs, the digit count for phone numbers.

Patterns are compiled with the `regex` module, whose partial matching tells
the streaming stage exactly how much trailing text could still become a
match. `begun` says when such a trailing fragment already is a value that
has started (a key's prefix, eight digits of a card): if the response ends
there, the fragment is redacted instead of released.

Why one module: it is a table, one detector after another with its pattern,
confirmation and `needs` characters; the scrub fast path depends on every
detector being listed here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import regex

#: The longest one regular-expression call of a policy's own rule may hold the
#: event loop; past it the rule fails closed for that response.
MATCH_BUDGET_SECONDS = 0.010


@dataclass(frozen=True, slots=True)
class Detector:
    name: str
    entity_type: str
    pattern: regex.Pattern[str]
    validate: Callable[[str], bool] | None = None
    #: For values that can outgrow the hold-back cap (key blocks): where they end.
    end_marker: regex.Pattern[str] | None = None
    #: A trailing fragment that matches this is a value already under way.
    begun: regex.Pattern[str] | None = None
    #: A whole match at the very end of a cut-off text that fails `validate` is a
    #: value the end cut short (15 digits of a card) when it matches this.
    cut: regex.Pattern[str] | None = None
    #: Seconds one regex call may run (None: a vetted built-in, no timer).
    budget: float | None = None
    #: A cheap necessary condition on the unreleased text: when it finds nothing,
    #: no match and no match in progress can be there, so the pattern need not run.
    gate: regex.Pattern[str] | None = None
    #: What every value this detector redacts in a whole text contains, a
    #: value under way at its end included (None: not known): `scrub` passes
    #: text holding none of the built-ins' needs without running them.
    needs: str | None = None


def _luhn(digits: list[int]) -> bool:
    total = 0
    for index, digit in enumerate(reversed(digits)):
        if index % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


#: A digit run this long may be a card with digits glued to it (two cards
#: written one after the other included); longer runs are some other number.
MAX_GLUED_CARD_DIGITS = 40


def luhn_valid(text: str) -> bool:
    """A card number: 13-19 digits passing Luhn. A run of 17 or more digits
    that fails as a whole is a card with neighbours glued to it when some run
    of 13-19 digits inside it passes, and the whole run is redacted (the longer
    span). A 13-16 digit look-alike is never split, so it stays untouched."""
    digits = [int(c) for c in text if c.isdigit()]
    count = len(digits)
    if 13 <= count <= 19 and _luhn(digits):
        return True
    if not 17 <= count <= MAX_GLUED_CARD_DIGITS:
        return False
    return any(
        _luhn(digits[start : start + size])
        for size in range(13, min(19, count - 1) + 1)
        for start in range(count - size + 1)
        if size < count and digits[start] != 0  # no card number starts with 0
    )


#: ISO 13616 registry: the one length an IBAN has in each country.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}  # fmt: skip


def _mod97_valid(compact: str) -> bool:
    rearranged = compact[4:] + compact[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def iban_valid(text: str) -> bool:
    """A valid IBAN at the start of `text`; characters glued after it ride along
    (the caller redacts the longer span). Countries outside the registry need
    the whole text to check."""
    compact = "".join(text.split()).upper()
    if len(compact) < 15 or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    length = IBAN_LENGTHS.get(compact[:2])
    if length is not None:
        return len(compact) >= length and _mod97_valid(compact[:length])
    return len(compact) <= 34 and _mod97_valid(compact)


def phone_digits_valid(text: str) -> bool:
    """Fewer than 7 digits is not a dialable number; up to 15 (E.164) is one.
    Longer: after a "+", digits glued to a phone number; without one, a span
    that still holds a phone number's own shape (an area code in parentheses,
    or starting or ending with the 3-3-4 groups of a North American number: a
    date, a second number or an extension glued to it) or whose end group is longer than any phone
    group (its end is ambiguous) goes whole (fail closed), while evenly
    grouped long numbers (a card that failed its checksum) are something else."""
    groups = _DIGIT_RUNS.findall(text)
    digits = sum(len(group) for group in groups)
    if digits < 7:
        return False
    if digits <= 15 or text.startswith("+"):
        return True
    if _AREA_CODE.search(text) or _NANP_HEAD.match(text) or _NANP_TAIL.search(text):
        return True
    return len(groups[0]) > 4 or len(groups[-1]) > 4


_DIGIT_RUNS = regex.compile(r"\d+")
_AREA_CODE = regex.compile(r"\(\d{2,4}\)")
_NANP_HEAD = regex.compile(r"\d{3}([ .-])\d{3}\1\d{4}(?!\d)")
_NANP_TAIL = regex.compile(r"(?<!\d)\d{3}([ .-])\d{3}\1\d{4}$")


def _compile(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern, regex.VERSION1)


def _literals(literals: tuple[str, ...], fold: bool) -> str:
    return f"{'(?i:' if fold else '(?:'}{'|'.join(regex.escape(lit) for lit in literals)})"


def literal_gate(*literals: str, fold: bool = False) -> regex.Pattern[str]:
    """For patterns that start with one of `literals`: a match needs one in the
    text, and one in progress needs the text to end with a start of one."""
    starts = sorted({lit[:k] for lit in literals for k in range(1, len(lit))}, key=len)
    ends = "|".join(regex.escape(start) for start in reversed(starts))
    # A case-insensitive literal's start is one in any case too (`Be` of `Bearer`).
    return _compile(f"{_literals(literals, fold)}|{'(?i:' if fold else '(?:'}{ends})\\Z")


def literal_needs(*literals: str, fold: bool = False) -> str:
    """The `needs` of a detector whose values start with one of `literals`."""
    return _literals(literals, fold)


#: Every card, SSN and address has a digit.
_DIGIT_GATE = _compile(r"\d")
#: A phone number in progress may be only its "+" or "(" so far.
_PHONE_GATE = _compile(r"\d|[+(]\Z")
#: Check digits are part of every IBAN; a bare country code can only be one in
#: progress at the very end.
_IBAN_GATE = _compile(r"\d|[A-Z]\Z")
#: An IBAN under way: country code, check digits and a first group of four.
_IBAN_BEGUN = _compile(r"^[A-Z]{2}\d{2} ?[A-Z0-9]{4}")
#: Every email has an @; one in progress may still be its local part.
_EMAIL_GATE = _compile(r"@|[\w.+-]\Z")


_API_TOKEN_PREFIXES = (
    *("sk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xapp-", "AIza"),
    *(f"xox{kind}-" for kind in "abeoprs"),
    *(f"{kind}k_{mode}_" for kind in "sr" for mode in ("live", "test")),
    "hf_",
)

_PEM_LABEL = r"(?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?"

BUILTIN_DETECTORS: dict[str, Detector] = {
    d.name: d
    for d in (
        Detector(
            "email",
            "EMAIL",
            _compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
            begun=_compile(r"@"),
            gate=_EMAIL_GATE,
            needs="@",
        ),
        Detector(
            "payment_card",
            "PAYMENT_CARD",
            _compile(r"(?<!\d[ -]?)\d(?:[ -]?\d){12,39}(?!\d)"),
            luhn_valid,
            begun=_compile(r"(?:\d[ -]?){10}"),
            # Written as cards are: ungrouped, or in groups of four.
            cut=_compile(
                r"^(?:\d{13,18}|\d{4}(?:[ -]\d{4}){2,3}[ -]\d{1,3}|\d{4}(?:[ -]\d{4}){3})$"
            ),
            gate=_DIGIT_GATE,
            needs=r"(?:\d[ -]?){10}",
        ),
        Detector(
            "iban",
            "IBAN",
            _compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?"),
            iban_valid,
            begun=_IBAN_BEGUN,
            # The country code, check digits and a first group: cut short by the end.
            cut=_IBAN_BEGUN,
            gate=_IBAN_GATE,
            needs=r"[A-Z]{2}\d{2}",
        ),
        Detector(
            "us_ssn",
            "US_SSN",
            # Digit groups joined to either end by a dash join the span
            # (`1-123-45-6789`, `123-45-6789-01`): the longer span is redacted.
            _compile(r"(?<!\d-?)(?:\d{1,4}-){0,3}\d{3,}-\d{2}-\d{4,}(?:-\d+)*(?!\d)"),
            begun=_compile(r"\d{3}-\d{2}(?!\d)"),
            gate=_DIGIT_GATE,
            needs=r"\d{3}-\d{2}",
        ),
        Detector(
            "phone",
            "PHONE",
            _compile(
                # International: + and digits in groups; national: an area
                # code set off by a separator or parentheses, after an optional
                # trunk or country code. Letters may touch either end; digits
                # and separated digit groups that touch it join the span (the
                # end of the number is ambiguous: the longer span is redacted),
                # and the digit count decides (see phone_digits_valid).
                # A number in its own unmistakable shape is found whatever
                # digits come before it (a date, a version, a second number
                # in a list): one that starts with its parenthesised area
                # code, or 3-3-4 digits with one separator (`415-555-0134`);
                # any other never starts right after a digit group it could
                # be glued to (that group would start it).
                r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d+)+"
                r"|(?<!\d)(?:\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,}"
                r"|\d{3}(?:-\d{3}-|\.\d{3}\.| \d{3} )\d{4})(?:[ .-]\d+)*"
                r"|(?<!\d)(?<!\d[ .-])(?:\d{1,4}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,}[ .-])"
                r"\d{3,4}[ .-]?\d{3,}(?:[ .-]\d+)*"
            ),
            phone_digits_valid,
            # Shaped like a phone number (a +, a separated group or an area code in
            # parentheses) with seven digits: a bare number at the end is not one.
            begun=_compile(r"^(?=.*(?:\+|\d[ .-]\d|\(\d))[+(]?(?:\d\D{0,2}){7}"),
            gate=_PHONE_GATE,
            needs=r"(?:[+(]|\d[ .-])\d",
        ),
        Detector(
            "ipv4",
            "IPV4",
            _compile(
                # Digits glued to either end join the span; a fifth dotted part
                # (a version string) rules it out.
                r"(?<!\d\.?)\d*(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\d*(?!\.\d)"
            ),
            begun=_compile(r"(?:\d{1,3}\.){3}"),
            gate=_DIGIT_GATE,
            needs=r"\d\.\d",
        ),
        Detector(
            "aws_access_key",
            "AWS_ACCESS_KEY",
            _compile(r"(?:AKIA|ASIA)[A-Z0-9]{16,}"),
            begun=_compile(r"^(?:AKIA|ASIA)[A-Z0-9]{4}"),
            gate=literal_gate("AKIA", "ASIA"),
            needs=literal_needs("AKIA", "ASIA"),
        ),
        Detector(
            "api_token",
            "API_TOKEN",
            _compile(
                r"sk-[A-Za-z0-9_-]{20,}"
                r"|gh[pousr]_[A-Za-z0-9]{20,}"
                r"|github_pat_[A-Za-z0-9_]{22,}"
                r"|xox[abeoprs]-[A-Za-z0-9-]{10,}"
                r"|xapp-[A-Za-z0-9-]{10,}"
                r"|AIza[0-9A-Za-z_-]{35,}"
                r"|[sr]k_(?:live|test)_[0-9A-Za-z]{24,}"
                r"|hf_[A-Za-z0-9]{30,}"
            ),
            begun=_compile(
                r"^(?:sk-|gh[pousr]_|github_pat_|xox[abeoprs]-|xapp-|AIza|[sr]k_(?:live|test)_|hf_)"
                r"[A-Za-z0-9_-]{4}"
            ),
            gate=literal_gate(*_API_TOKEN_PREFIXES),
            needs=literal_needs(*_API_TOKEN_PREFIXES),
        ),
        Detector(
            "bearer_token",
            "BEARER_TOKEN",
            _compile(r"(?i:bearer)[ \t]+[A-Za-z0-9._~+/-]{16,}=*"),
            begun=_compile(r"(?i:bearer)[ \t]+[A-Za-z0-9._~+/-]{4}"),
            gate=literal_gate("bearer", fold=True),
            needs=literal_needs("bearer", fold=True),
        ),
        Detector(
            "jwt",
            "JWT",
            # base64url as specified, plus the padding and standard-alphabet
            # characters some encoders emit anyway.
            _compile(r"eyJ[A-Za-z0-9_+/-]{5,}=*\.[A-Za-z0-9_+/-]{4,}=*\.[A-Za-z0-9_+/-]*=*"),
            begun=_compile(r"^eyJ[A-Za-z0-9_-]{4}"),
            gate=literal_gate("eyJ"),
            needs=literal_needs("eyJ"),
        ),
        Detector(
            "private_key",
            "PRIVATE_KEY",
            _compile(rf"-----BEGIN {_PEM_LABEL}-----[\s\S]*?-----END {_PEM_LABEL}-----"),
            end_marker=_compile(rf"-----END {_PEM_LABEL}-----"),
            begun=_compile(r"^-----BEGIN "),
            gate=literal_gate("-----BEGIN "),
            needs=literal_needs("-----BEGIN "),
        ),
    )
}
