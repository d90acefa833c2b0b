"""`tokenwire audit list | show | verify`: reading and checking the audit file.

The client's `tokenwire` command adds these when the server package is
installed (a lazy import, so a client-only install never needs it). Exit
status: 0 on success; 1 when `verify` finds the chain broken, or `list` /
`show` cannot answer (no file, no such response); 2 when the file cannot be
checked at all (missing, not an audit file, the old layout).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
from typing import Any, TextIO


def add_arguments(audit: argparse.ArgumentParser) -> None:
    commands = audit.add_subparsers(dest="audit_command", required=True)
    listing = commands.add_parser("list", help="newest rows (events) first")
    listing.add_argument("--limit", type=int, default=20)
    show = commands.add_parser("show", help="a response's whole history, oldest event first")
    show.add_argument("response_id")
    verify = commands.add_parser(
        "verify", help="check the hash chain: exit 0 when intact, 1 naming the first broken row"
    )
    verify.add_argument("path", nargs="?", help="SQLite audit file (or --audit-path)")
    verify.add_argument(
        "--expect-head",
        default="",
        metavar="SHA256",
        help="a head hash noted earlier: fails unless it is still in the chain",
    )
    for sub in (listing, show, verify):
        sub.add_argument(
            "--audit-path",
            default=None,
            help="SQLite audit file (default: TOKENWIRE_AUDIT_PATH or the server default)",
        )
        sub.add_argument("--json", action="store_true", help="print JSON")


def _path(args: argparse.Namespace) -> str:
    from tokenwire_server.config import AuditConfig

    given: str | None = getattr(args, "path", None) or args.audit_path
    return given or os.environ.get("TOKENWIRE_AUDIT_PATH") or AuditConfig().audit_path


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path = _path(args)
    if not os.path.isfile(path):
        err.write(f"tokenwire audit: no audit file at {path}\n")
        return 2 if args.audit_command == "verify" else 1
    try:
        if args.audit_command == "verify":
            return _verify(path, args, out, err)
        if args.audit_command == "show":
            return _show(path, args, out, err)
        return _list(path, args, out)
    except sqlite3.DatabaseError as error:  # AuditFileError included
        err.write(f"tokenwire audit: {path}: {error}\n")
        return 2 if args.audit_command == "verify" else 1


def _verify(path: str, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from tokenwire_server.audit.chain import verify
    from tokenwire_server.audit.reader import open_read_only

    with open_read_only(path) as connection:
        report = verify(connection, args.expect_head)
    if args.json:
        document = {
            "intact": report.intact,
            "rows": report.rows,
            "head_seq": report.head_seq,
            "head_sha256": report.head_sha256,
            "problems": [
                {"seq": p.seq, "kind": p.kind, "message": p.message} for p in report.problems
            ],
        }
        out.write(json.dumps(document, indent=2) + "\n")
    elif report.intact:
        out.write(
            f"intact: {report.rows} rows, head row {report.head_seq} sha256 {report.head_sha256}\n"
        )
    else:
        for problem in report.problems:
            err.write(f"tokenwire audit verify: {problem.message}\n")
        err.write(f"tokenwire audit verify: {path}: the chain is broken\n")
    return 0 if report.intact else 1


def _show(path: str, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from tokenwire_server.audit.reader import read_history

    history = read_history(path, args.response_id) if args.response_id else []
    if not history:
        err.write(f"tokenwire audit: no response {args.response_id} in {path}\n")
        return 1
    if args.json:
        document = {"response_id": args.response_id, "events": history}
        out.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
        return 0
    for row in history:
        out.write(_heading(row))
        _write_row(row, out)
    return 0


def _heading(row: dict[str, Any]) -> str:
    status = f" {row['status']}" if row["status"] else ""
    reason = f" {row['error_reason']}" if row["error_reason"] else ""
    return f"#{row['seq']} {row['event']}{status}{reason} ({row['method']})\n"


def _write_row(row: dict[str, Any], out: TextIO) -> None:
    skip = {"actions", "token_events", "labels", "seq", "event", "status", "error_reason"}
    for key in sorted(row):
        if key not in skip and row[key] not in ("", None):
            out.write(f"{key:>24}: {row[key]}\n")
    out.write(f"{'labels':>24}: {json.dumps(row['labels'], sort_keys=True)}\n")
    for action in row["actions"]:
        if "review_id" in action:  # an `escalated` / `reviewed` row (audit/review_events.py)
            out.write(f"{'review':>24}: {json.dumps(action, sort_keys=True)}\n")
            continue
        if "operator" not in action:  # any other kind of entry (a check's summary...)
            out.write(f"{'entry':>24}: {json.dumps(action, sort_keys=True)}\n")
            continue
        out.write(
            f"{'action':>24}: {action['operator']} {action['entity_type']} "
            f"[{action['start']}, {action['end']}) rule {action['rule_id']}\n"
        )
    for event in row["token_events"]:
        out.write(
            f"{'chunk':>24}: #{event['sequence']} @{event['text_offset']} "
            f"+{event['byte_length']}B {event['token_count']} tokens "
            f"{event['action_count']} actions\n"
        )


def _list(path: str, args: argparse.Namespace, out: TextIO) -> int:
    from tokenwire_server.audit.reader import read_records

    rows = read_records(path, args.limit)
    if args.json:
        out.write(json.dumps(rows, indent=2, sort_keys=True) + "\n")
        return 0
    out.write(
        f"{'seq':>6} {'event':<9} {'response_id':<38} {'status':<18} {'mode':<8} {'chunks':>6} "
        f"{'verdict':<9} {'verification':<12} {'policy':<24} model\n"
    )
    for r in rows:
        policy = f"{r['policy_id']} v{r['policy_version']}" if r["policy_id"] else "-"
        out.write(
            f"{r['seq']:>6} {r['event']:<9} {r['response_id'] or '-':<38} "
            f"{r['status'] or '-':<18} {r['delivery_mode'] or '-':<8} {r['chunk_count']:>6} "
            f"{r['verdict'] or '-':<9} {r['verification'] or '-':<12} {policy:<24} "
            f"{r['model'] or '-'}\n"
        )
    return 0
