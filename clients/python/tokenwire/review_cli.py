"""`tokenwire review list|show|approve|reject|edit|watch`: human review from a terminal.

Every action calls the server's ReviewService with the caller's API key
(`--api-key`, else `TOKENWIRE_API_KEY`); listing and deciding need a key with
the reviewer role, and only ever see that key's tenant. Who decided is the
key, never a flag. Target and TLS flags are the ones of `tokenwire ask`.

    tokenwire review list                          # pending reviews, oldest first
    tokenwire review list --state all --limit 200
    tokenwire review show REVIEW_ID                # reasons, checks, the held text, history
    tokenwire review approve REVIEW_ID [--reason WHY]
    tokenwire review reject REVIEW_ID --reason WHY
    tokenwire review edit REVIEW_ID --reason WHY (--text TEXT | --text-file FILE|-)
    tokenwire review watch REVIEW_ID               # until decided; prints the decided text

Exit status: 0 done, 1 the server refused (the reason is printed), 2 a usage
problem (a flag, a file). `watch` exits 0 when the text was released (approved
or edited) and 3 when it was not (rejected or expired).

`run_review(argv, out, err)` runs one action without the `tokenwire` parser
(for scripts and tests); `add_parser` is what `tokenwire` registers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

import grpc
from google.protobuf import json_format

from tokenwire.client import DEFAULT_TARGET, tls_credentials
from tokenwire.errors import TokenwireError, from_rpc_error
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import review_pb2 as rpb
from tokenwire.v1 import review_pb2_grpc as rgrpc

STATES = {
    "pending": pb.REVIEW_STATE_PENDING,
    "approved": pb.REVIEW_STATE_APPROVED,
    "rejected": pb.REVIEW_STATE_REJECTED,
    "edited": pb.REVIEW_STATE_EDITED,
    "expired": pb.REVIEW_STATE_EXPIRED,
    "all": pb.REVIEW_STATE_UNSPECIFIED,
}
#: `watch`: the decided text was not released.
NOT_RELEASED = 3
#: The server's largest page; `list --limit` reads as many pages as it needs.
PAGE_SIZE = 500


def _state(value: int) -> str:
    return pb.ReviewState.Name(value).removeprefix("REVIEW_STATE_").lower()


def _when(stamp: Any) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    moment = datetime.datetime.fromtimestamp(stamp.ToNanoseconds() / 1e9, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


class UsageProblem(Exception):
    """A flag or file the action cannot use (exit status 2)."""


@contextmanager
def _stub(args: argparse.Namespace) -> Iterator[tuple[rgrpc.ReviewServiceStub, Any]]:
    for flag in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise UsageProblem(f"--{flag.replace('_', '-')} {path}: no such file")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageProblem("--tls-cert and --tls-key go together")
    if args.tls or args.tls_ca or args.tls_cert:
        channel = grpc.secure_channel(
            args.target, tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        )
    else:
        channel = grpc.insecure_channel(args.target)
    key = args.api_key or os.environ.get("TOKENWIRE_API_KEY") or ""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    try:
        yield rgrpc.ReviewServiceStub(channel), metadata
    finally:
        channel.close()


# ------------------------------------------------------------------- printing


def _summary_line(review: rpb.Review) -> str:
    reasons = ", ".join(r.rule_id for r in review.reasons) or "-"
    return (
        f"{review.review_id:<36} {_state(review.state):<8} "
        f"{'hold' if review.held else 'after':<5} {_when(review.created_at):<20} "
        f"{_when(review.expires_at):<20} {review.response_id:<38} {reasons}"
    )


def _write_review(review: rpb.Review, out: TextIO) -> None:
    fields = [
        ("review", review.review_id),
        ("response", review.response_id),
        ("tenant", review.tenant or "-"),
        ("state", _state(review.state)),
        ("action", "hold (nothing released until decided)" if review.held else "review after"),
        ("model", f"{review.model} {review.model_version}".strip() or "-"),
        ("policy", f"{review.policy_id} v{review.policy_version}" if review.policy_id else "-"),
        ("verdict", pb.Verdict.Name(review.verdict).removeprefix("VERDICT_").lower()),
        ("created", _when(review.created_at)),
        ("expires", _when(review.expires_at)),
    ]
    if review.labels:
        fields.append(("labels", ", ".join(f"{k}={v}" for k, v in sorted(review.labels.items()))))
    for name, value in fields:
        out.write(f"{name:>10}: {value}\n")
    for reason in review.reasons:
        out.write(f"{'why':>10}: {reason.rule_id}: {reason.description}\n")
    for check in review.checks:
        outcome = pb.CheckOutcome.Name(check.outcome).removeprefix("CHECK_OUTCOME_").lower()
        codes = ", ".join(v.code for v in check.violations)
        out.write(
            f"{'check':>10}: {check.name} {outcome}" + (f" ({codes})" if codes else "") + "\n"
        )
    for event in review.history:
        who = f" by {event.actor}" if event.actor else ""
        why = f": {event.reason}" if event.reason else ""
        out.write(f"{'history':>10}: {_when(event.at)} {_state(event.state)}{who}{why}\n")
    if review.governed_text:
        out.write(f"\n--- governed text ---\n{review.governed_text}\n")
    if review.decided_text:
        out.write(f"\n--- decided text (sha256 {review.decided_sha256}) ---\n")
        out.write(f"{review.decided_text}\n")


def _json(message: Any) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True)


# -------------------------------------------------------------------- actions


def _list(args: argparse.Namespace, out: TextIO) -> int:
    reviews: list[rpb.Review] = []
    token = ""
    with _stub(args) as (stub, metadata):
        while len(reviews) < args.limit:
            page = stub.ListReviews(
                rpb.ListReviewsRequest(
                    state=STATES[args.state],
                    page_size=min(PAGE_SIZE, args.limit - len(reviews)),
                    page_token=token,
                ),
                metadata=metadata,
                timeout=args.timeout,
            )
            reviews.extend(page.reviews)
            token = page.next_page_token
            if not token:
                break
    if args.json:
        out.write(_json(rpb.ListReviewsResponse(reviews=reviews, next_page_token=token)) + "\n")
        return 0
    out.write(
        f"{'REVIEW':<36} {'STATE':<8} {'MODE':<5} {'CREATED':<20} {'EXPIRES':<20} "
        f"{'RESPONSE':<38} WHY\n"
    )
    for review in reviews:
        out.write(_summary_line(review) + "\n")
    if token:
        out.write(f"(more than {args.limit}; raise --limit to see them)\n")
    return 0


def _show(args: argparse.Namespace, out: TextIO) -> int:
    with _stub(args) as (stub, metadata):
        answer = stub.GetReview(
            rpb.GetReviewRequest(review_id=args.review_id), metadata=metadata, timeout=args.timeout
        )
    if args.json:
        out.write(_json(answer.review) + "\n")
    else:
        _write_review(answer.review, out)
    return 0


def _replacement(args: argparse.Namespace) -> str:
    if args.text is not None:
        return str(args.text)
    if args.text_file == "-":
        return sys.stdin.read()
    try:
        with open(args.text_file, encoding="utf-8") as file:
            return file.read()
    except OSError as error:
        raise UsageProblem(f"--text-file {args.text_file}: {error.strerror or error}") from None


def _decide(args: argparse.Namespace, out: TextIO) -> int:
    decision = {
        "approve": rpb.REVIEW_DECISION_APPROVE,
        "reject": rpb.REVIEW_DECISION_REJECT,
        "edit": rpb.REVIEW_DECISION_EDIT,
    }[args.action]
    request = rpb.DecideReviewRequest(
        review_id=args.review_id, decision=decision, reason=args.reason or ""
    )
    if args.action == "edit":
        request.replacement_text = _replacement(args)
    with _stub(args) as (stub, metadata):
        answer = stub.DecideReview(request, metadata=metadata, timeout=args.timeout)
    review = answer.review
    if args.json:
        out.write(_json(review) + "\n")
        return 0
    line = f"review {review.review_id} {_state(review.state)}"
    if review.decided_sha256:
        line += f" · released text sha256 {review.decided_sha256[:12]}…"
    out.write(line + "\n")
    return 0


def _watch(args: argparse.Namespace, out: TextIO) -> int:
    last: rpb.Review | None = None
    with _stub(args) as (stub, metadata):
        for update in stub.WatchReview(
            rpb.WatchReviewRequest(review_id=args.review_id),
            metadata=metadata,
            timeout=args.timeout,
        ):
            last = update.review
            if args.json:
                out.write(_json(last) + "\n")
            else:
                out.write(f"{_when(last.history[-1].at) if last.history else '-'} ")
                out.write(f"{last.review_id} {_state(last.state)}\n")
            out.flush()
    if last is None:
        return 1
    released = last.state in (pb.REVIEW_STATE_APPROVED, pb.REVIEW_STATE_EDITED)
    if released and not args.json:
        out.write(last.decided_text + "\n")
    return 0 if released else NOT_RELEASED


_ACTIONS = {
    "list": _list,
    "show": _show,
    "approve": _decide,
    "reject": _decide,
    "edit": _decide,
    "watch": _watch,
}


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Runs the parsed action; the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        return _ACTIONS[args.action](args, out)
    except UsageProblem as problem:
        err.write(f"tokenwire review {args.action}: {problem}\n")
        return 2
    except grpc.RpcError as error:
        failure: TokenwireError = from_rpc_error(error)
        err.write(f"tokenwire review {args.action}: {failure}\n")
        for violation in failure.field_violations:
            err.write(f"  {violation.field}: {violation.description}\n")
        return 1


# --------------------------------------------------------------------- parser


def _connection_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"server HOST:PORT ({DEFAULT_TARGET})"
    )
    flags.add_argument("--api-key", help="API key (default: TOKENWIRE_API_KEY)")
    flags.add_argument("--tls", action="store_true", help="use TLS with the system's trusted roots")
    flags.add_argument("--tls-ca", help="PEM CA that signed the server's certificate (implies TLS)")
    flags.add_argument("--tls-cert", help="PEM client certificate, for mTLS")
    flags.add_argument("--tls-key", help="PEM key of --tls-cert")
    flags.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    flags.add_argument("--json", action="store_true", help="print the answer as JSON")
    return flags


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_parser(commands: Any) -> None:
    """Adds `review` and its actions to the `tokenwire` sub-parsers."""
    review = commands.add_parser(
        "review",
        help="list and decide responses held or queued for human review",
        description="Human review through the server's ReviewService. Listing and deciding "
        "need an API key with the reviewer role (role: reviewer in the server's keys file); "
        "a held response's caller can show and watch its review with its own key.",
    )
    actions = review.add_subparsers(dest="action", required=True, metavar="ACTION")
    flags = _connection_flags()
    listing = actions.add_parser("list", parents=[flags], help="reviews of your tenant")
    listing.add_argument("--state", choices=list(STATES), default="pending")
    listing.add_argument("--limit", type=_positive, default=50, help="at most this many")
    show = actions.add_parser("show", parents=[flags], help="one review")
    show.add_argument("review_id")
    watch = actions.add_parser("watch", parents=[flags], help="wait for a review's decision")
    watch.add_argument("review_id")
    watch.set_defaults(timeout=None)  # a review may wait for hours; --timeout bounds it
    approve = actions.add_parser("approve", parents=[flags], help="release the text as it is")
    approve.add_argument("review_id")
    approve.add_argument("--reason", default="", help="why (recorded in the audit trail)")
    reject = actions.add_parser("reject", parents=[flags], help="release nothing")
    reject.add_argument("review_id")
    reject.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    edit = actions.add_parser("edit", parents=[flags], help="release a replacement text")
    edit.add_argument("review_id")
    edit.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    text = edit.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the replacement text")
    text.add_argument("--text-file", help="read the replacement from a file ('-': stdin)")
    review.set_defaults(run=run)


def run_review(argv: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`tokenwire review ARGV...` on its own: parses and runs one action."""
    parser = argparse.ArgumentParser(prog="tokenwire")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["review", *argv])
    return run(args, out, err)
