"""The `tokenwire` command: `serve` runs the server, `ask` calls one.

`ask` writes the answer to stdout as it arrives and a one-line summary to
stderr, so the text can be piped while the summary stays on the terminal.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import TextIO

from google.protobuf import json_format

from tokenwire.client import (
    DEFAULT_TARGET,
    Client,
    Mode,
    RespondOptions,
    ResponseStream,
    tls_credentials,
)
from tokenwire.errors import TokenwireError
from tokenwire.stream import Chunk, Result, Retraction, StreamAssembler
from tokenwire.v1 import respond_pb2 as pb


def _summary(result: Result, mode: str) -> str:
    status = "verified" if result.verified else "NOT VERIFIED"
    if result.resumed_after:
        server_check = pb.VerificationStatus.Name(result.completed.verification.status)
        status = (
            f"resumed after {result.resumed_after}, server "
            f"{server_check.removeprefix('VERIFICATION_STATUS_').lower()}"
        )
    if result.retraction is not None and not result.resumed_after:
        status += f", retracted from chunk {result.retraction.from_sequence}"
    completed = result.completed
    reason = pb.FinishReason.Name(completed.finish_reason).removeprefix("FINISH_REASON_").lower()
    verdict = pb.Verdict.Name(completed.verdict).removeprefix("VERDICT_").lower()
    return (
        f"[{mode} · {result.chunk_count} chunks · sha256 {result.sha256[:12]}… {status} · "
        f"ttft {result.time_to_first_token * 1000:.1f} ms · total {result.total_time * 1000:.1f} ms"
        f" · {reason} · {verdict} · {completed.usage.completion_tokens} tokens]"
    )


def _print_stream(stream: ResponseStream, out: TextIO) -> Result:
    for event in stream:
        if isinstance(event, Chunk):
            out.write(event.text)
            out.flush()
        elif isinstance(event, Retraction):
            out.write(
                f"\n[retracted from chunk {event.from_sequence}; final text:]\n{event.final_text}"
            )
    assert stream.result is not None
    return stream.result


def _ask(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    options: RespondOptions = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "labels": dict(args.label),
        "seed": args.seed,
    }
    credentials = (
        tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        if args.tls_ca or args.tls_cert or args.tls
        else None
    )
    api_key = args.api_key or os.environ.get("TOKENWIRE_API_KEY") or None
    with Client(
        args.target, timeout=args.timeout, credentials=credentials, api_key=api_key
    ) as client:
        try:
            if args.unary:
                result = client.respond(args.prompt, **options)
                out.write(result.text)
                mode = "unary"
            else:
                mode_name: Mode = "buffered" if args.buffered else args.mode
                if args.resume:
                    stream = client.stream_request(
                        pb.StreamRespondRequest(
                            resume=pb.ResumeFrom(response_id=args.resume, after_sequence=args.after)
                        ),
                        assembler=StreamAssembler(resumed_after=args.after),
                    )
                else:
                    stream = client.stream(
                        args.prompt, mode=mode_name, resumable=args.resumable, **options
                    )
                try:
                    result = _print_stream(stream, out)
                except KeyboardInterrupt:
                    # A resumable response would go on generating: stop it for real.
                    if stream.response_id:
                        client.cancel_response(stream.response_id, timeout=5)
                    err.write("\ntokenwire ask: cancelled\n")
                    return 130
                mode = pb.DeliveryMode.Name(result.completed.delivery_mode)
                mode = mode.removeprefix("DELIVERY_MODE_").lower()
        except TokenwireError as error:
            out.write("\n")
            err.write(f"tokenwire ask: {error}\n")
            for violation in error.field_violations:
                err.write(f"  {violation.field}: {violation.description}\n")
            if error.last_sequence:
                err.write(f"  last delivered sequence: {error.last_sequence}\n")
            if error.metadata.get("responseId"):
                err.write(
                    f"  resume with: tokenwire ask --resume {error.metadata['responseId']} "
                    f"--after {error.last_sequence or 0}\n"
                )
            return 1
    out.write("\n")
    out.flush()
    err.write(_summary(result, mode) + "\n")
    if args.show_completed:
        err.write(json_format.MessageToJson(result.completed) + "\n")
    return 0


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenwire", description="Governed, verifiable LLM token streams over gRPC."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    try:
        from tokenwire_server.cli import add_serve_arguments
    except ModuleNotFoundError as error:  # a client-only install has no server package
        if error.name != "tokenwire_server":
            raise  # the server is installed but broken: say why, don't hide `serve`
        add_serve_arguments = None  # type: ignore[assignment]
    if add_serve_arguments is not None:
        serve = commands.add_parser("serve", help="run the tokenwire server")
        add_serve_arguments(serve)
    ask = commands.add_parser("ask", help="ask a running server and stream the answer")
    ask.add_argument("prompt", nargs="?", default="", help="the question (not with --resume)")
    ask.add_argument("--target", default=DEFAULT_TARGET, help="server HOST:PORT")
    ask.add_argument("--model", default="", help="model name (server default when empty)")
    ask.add_argument("--max-tokens", type=int, default=0)
    ask.add_argument("--seed", type=int, default=None)
    ask.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
    ask.add_argument(
        "--label", action="append", default=[], type=_label, help="KEY=VALUE, repeatable"
    )
    ask.add_argument("--mode", choices=["auto", "stream", "buffered"], default="stream")
    group = ask.add_mutually_exclusive_group()
    group.add_argument("--buffered", action="store_true", help="one checked chunk, then Completed")
    group.add_argument("--unary", action="store_true", help="use the unary Respond RPC")
    ask.add_argument("--show-completed", action="store_true", help="print Completed as JSON")
    ask.add_argument(
        "--no-resume",
        dest="resumable",
        action="store_false",
        help="do not survive a dropped connection (by default the client resumes by itself, "
        "and Ctrl-C cancels the response)",
    )
    ask.add_argument("--resume", metavar="RESPONSE_ID", help="continue an earlier response")
    ask.add_argument("--api-key", help="API key (default: TOKENWIRE_API_KEY)")
    ask.add_argument("--tls", action="store_true", help="use TLS with the system's trusted roots")
    ask.add_argument("--tls-ca", help="PEM CA that signed the server's certificate (implies TLS)")
    ask.add_argument("--tls-cert", help="PEM client certificate, for mTLS")
    ask.add_argument("--tls-key", help="PEM key of --tls-cert")
    ask.add_argument("--after", type=int, default=0, help="with --resume: the last sequence held")
    keys = commands.add_parser("keys", help="API key helpers")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    keys_commands.add_parser(
        "hash", help="print the SHA-256 to put in the keys file, for a key read from stdin"
    )
    if add_serve_arguments is not None:
        from tokenwire_server.audit.commands import add_arguments as add_audit_arguments

        audit = commands.add_parser(
            "audit", help="read and verify the server's audit trail (list, show, verify)"
        )
        add_audit_arguments(audit)
    return parser


def _restart_with_quiet_grpc_core() -> None:
    """grpc's C core writes its own lines (a failed TLS handshake, one per bad
    client) to stderr as plain text, into a JSON log; it reads GRPC_VERBOSITY
    once, when grpc is first imported, which this command has already done.
    So `serve` starts again in place (exec: the same process id, so the same
    signals from systemd or the kubelet) with the core silenced; an operator
    who wants its lines sets GRPC_VERBOSITY themselves."""
    os.environ["GRPC_VERBOSITY"] = "NONE"
    serve_args = sys.argv[sys.argv.index("serve") + 1 :]
    os.execv(sys.executable, [sys.executable, "-m", "tokenwire_server", *serve_args])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ask" and bool(args.prompt) == bool(args.resume):
        parser.error("ask takes a prompt, or --resume RESPONSE_ID (not both)")
    if args.command == "serve":
        if argv is None and "GRPC_VERBOSITY" not in os.environ:
            _restart_with_quiet_grpc_core()
        from tokenwire_server.cli import run_serve

        return run_serve(args)
    if args.command == "audit":
        from tokenwire_server.audit.commands import run as run_audit

        return run_audit(args, sys.stdout, sys.stderr)
    if args.command == "keys":
        key = sys.stdin.readline().strip()
        if not key:
            parser.error("keys hash reads the key from stdin")
        print(hashlib.sha256(key.encode()).hexdigest())
        return 0
    return _ask(args, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
