"""Writes `tokenwire-slo.rules.yml`: the SLOs' recording rules and burn-rate alerts.

Each SLO is stated once below (objective, what counts as bad, what counts at
all) and expanded into the SRE workbook's multi-window, multi-burn-rate shape
(https://sre.google/workbook/alerting-on-slos/, "Multiwindow, Multi-Burn-Rate
Alerts"): an error ratio recorded over 5m, 30m, 1h, 2h, 6h, 1d and 3d, and per
SLO four alert rules under one alert name, told apart by `severity` and
`windows`:

| severity | long / short window | burn rate | budget spent when it fires |
|---|---|---|---|
| page   | 1h / 5m  | 14.4 | 2 % of 30 days in 1 hour  |
| page   | 6h / 30m | 6    | 5 % in 6 hours            |
| ticket | 1d / 2h  | 3    | 10 % in 1 day             |
| ticket | 3d / 6h  | 1    | 10 % in 3 days            |

The long window makes an alert significant, the short one makes it stop soon
after the burn stops. Generated rather than hand-written because the same
objective appears in eleven expressions per SLO and must never disagree.
`tests/test_slo_alerts.py` fails when this file and the YAML drift.

    python deploy/prometheus/generate_slo_rules.py    # rewrites the YAML
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "tokenwire-slo.rules.yml"

#: Statuses the server, not the caller, is to blame for (docs/slo.md says why
#: DEADLINE_EXCEEDED, CANCELLED and RESOURCE_EXHAUSTED are not among them).
SERVER_ERRORS = "INTERNAL|UNKNOWN|DATA_LOSS|UNAVAILABLE"
#: The time-to-first-token threshold: a bucket boundary of the histogram (the
#: OpenTelemetry GenAI conventions' 0.001 ... 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0),
#: spelt as the `le` label the server writes ("1.0", "2.5", "5.0"), which
#: tests/test_slo_alerts.py checks.
TTFT_THRESHOLD = "2.5"

WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
#: (severity, long window, short window, burn rate)
BURNS = (
    ("page", "1h", "5m", 14.4),
    ("page", "6h", "30m", 6.0),
    ("ticket", "1d", "2h", 3.0),
    ("ticket", "3d", "6h", 1.0),
)


@dataclass(frozen=True)
class Slo:
    name: str
    alert: str
    objective: float
    #: PromQL of the bad-event ratio over `{w}`, aggregated by job.
    ratio: str
    summary: str


def _or_zero(rate: str, like: str) -> str:
    """`rate`, or 0 where only `like` has series: a job with no bad event yet
    records a ratio of 0 instead of nothing."""
    return f"(\n  {rate}\nor\n  0 * {like}\n)"


def _sum_rate(selector: str) -> str:
    return f"sum by (job) (rate({selector}[{{w}}]))"


def _per(part: str, total: str) -> str:
    """`part / total`, and no sample at all where `total` is 0: a window without
    traffic records nothing rather than NaN, which would poison every average
    over it (the dashboard's 30-day budget) for as long as it is in range."""
    return f"{part}\n/\n(\n{total}\n> 0\n)"


RESPONSES = "tokenwire_responses_total"
STREAMS = 'tokenwire_responses_total{method="StreamRespond"'

SLOS = (
    Slo(
        name="availability",
        alert="TokenwireAvailabilityBudgetBurn",
        objective=0.999,
        ratio=_per(
            _or_zero(_sum_rate(f'{RESPONSES}{{status=~"{SERVER_ERRORS}"}}'), _sum_rate(RESPONSES)),
            _sum_rate(RESPONSES),
        ),
        summary="calls end in a server-side error (INTERNAL, UNKNOWN, DATA_LOSS, UNAVAILABLE)",
    ),
    Slo(
        name="time_to_first_token",
        alert="TokenwireTimeToFirstTokenBudgetBurn",
        objective=0.99,
        ratio=(
            "1 - (\n"
            + _per(
                _sum_rate(
                    f'gen_ai_server_time_to_first_token_seconds_bucket{{le="{TTFT_THRESHOLD}"}}'
                ),
                _sum_rate("gen_ai_server_time_to_first_token_seconds_count"),
            )
            + "\n)"
        ),
        summary=f"responses take longer than {TTFT_THRESHOLD}s to their first token",
    ),
    Slo(
        name="stream_stability",
        alert="TokenwireStreamStabilityBudgetBurn",
        objective=0.995,
        ratio=_per(
            "(\n"
            + _or_zero(
                _sum_rate(f'{STREAMS},status=~"{SERVER_ERRORS}"}}'), _sum_rate(STREAMS + "}")
            )
            + "\n+\n"
            + _or_zero(_sum_rate("tokenwire_stalls_total"), _sum_rate(STREAMS + "}"))
            + "\n)",
            _sum_rate(f'{STREAMS},status=~"OK|{SERVER_ERRORS}"}}'),
        ),
        summary="streams are cut by a server-side error or stall instead of ending in Completed",
    ),
    Slo(
        name="divergence",
        alert="TokenwireDivergenceBudgetBurn",
        objective=0.99,
        # Retractions over retractions plus the other verifications, rather than
        # over all verifications: `tokenwire_retractions_total` exists at 0 from
        # the start, while a `status` series only appears with its first response
        # (its first increase is invisible to `rate`), which would leave the
        # ratio empty just when a fresh server's responses all diverge.
        ratio=_per(
            _sum_rate("tokenwire_retractions_total"),
            _sum_rate("tokenwire_retractions_total")
            + "\n+\n"
            + _or_zero(
                _sum_rate('tokenwire_verifications_total{status!="DIVERGED"}'),
                _sum_rate("tokenwire_retractions_total"),
            ),
        ),
        summary="responses diverge from what was streamed and are retracted",
    ),
)


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.splitlines())


def _budget(slo: Slo) -> str:
    return f"{1 - slo.objective:.4g}"


def render() -> str:
    out = [
        "# Generated by deploy/prometheus/generate_slo_rules.py; edit that, then run it.",
        "# The SLOs and why each objective was chosen: docs/slo.md.",
        "groups:",
        "  - name: tokenwire-slo-objectives",
        "    rules:",
    ]
    for slo in SLOS:
        out += [
            "      - record: slo:tokenwire_objective:ratio",
            f"        expr: vector({slo.objective:g})",
            f"        labels: {{slo: {slo.name}}}",
        ]
    out += ["  - name: tokenwire-slo-error-ratios", "    rules:"]
    for slo in SLOS:
        for window in WINDOWS:
            out += [
                f"      - record: job:tokenwire_slo_errors:ratio_rate{window}",
                "        expr: |",
                _indent(slo.ratio.replace("{w}", window), 10),
                f"        labels: {{slo: {slo.name}}}",
            ]
    out += ["  - name: tokenwire-slo-burn-rate-alerts", "    rules:"]
    for slo in SLOS:
        budget = _budget(slo)
        for severity, long, short, burn in BURNS:
            threshold = f"({burn:g} * {budget})"
            selector = f'{{slo="{slo.name}"}}'
            out += [
                f"      - alert: {slo.alert}",
                "        expr: |",
                f"          job:tokenwire_slo_errors:ratio_rate{long}{selector} > {threshold}",
                "          and",
                f"          job:tokenwire_slo_errors:ratio_rate{short}{selector} > {threshold}",
                "        labels:",
                f"          severity: {severity}",
                f"          windows: {long}/{short}",
                "        annotations:",
                "          summary: >-",
                f"            {slo.name}: {burn:g}x the error budget burn rate over {long}"
                f" and {short}",
                "          description: >-",
                f"            {{{{ $value | humanizePercentage }}}} of {slo.summary}"
                f" over {long} (objective {slo.objective:.4g}, budget {budget});"
                f" burning over {burn:g}x spends the 30-day budget in under {30 / burn:.3g} days."
                " See docs/slo.md.",
            ]
    return "\n".join(out) + "\n"


def main() -> int:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
