"""The `tokenwire` command: `ask` calls a server; the server's package adds the rest.

`ask` writes the answer to stdout as it arrives and a one-line summary to
stderr, so the text can be piped while the summary stays on the terminal.

Subcommands come from two places:

- the client's own, plain modules of this package: `ask` here, and each
  module of `CLIENT_COMMAND_MODULES` that is present;
- the operator's (`serve`, `audit`, `keys`), from whatever distribution
  registers them in the `tokenwire.commands` entry-point group: the server,
  `tokenwire-server`. Without it, `tokenwire serve` says what to install and
  exits 2.

Either kind is a function `add_parser(subparsers)` that adds one subcommand
to the argparse sub-parsers and sets its handler as a default,
`parser.set_defaults(run=handler)`, with `handler(args) -> exit status`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, TextIO

import grpc
from google.protobuf import json_format

from tokenwire.client import (
    DEFAULT_TARGET,
    Client,
    Mode,
    RespondOptions,
    ResponseStream,
    split_targets,
    tls_credentials,
)
from tokenwire.errors import IntegrityError, ProtocolError, TokenwireError
from tokenwire.stream import (
    Chunk,
    Result,
    Retraction,
    StreamAssembler,
    ToolCall,
    ToolCallFragment,
)
from tokenwire.tools import json_object_format, schema_document, tool_choice, tools
from tokenwire.v1 import respond_pb2 as pb

ENTRY_POINT_GROUP = "tokenwire.commands"
#: Client-side subcommands in modules of their own, registered when present.
CLIENT_COMMAND_MODULES = ("tokenwire.review_cli",)
#: The operator's subcommands the server distribution brings, for the hint
#: printed when they are asked for without it.
SERVER_COMMANDS = {
    "serve": "run the tokenwire server",
    "audit": "read and verify the server's audit trail",
    "keys": "API key helpers for the server's keys file",
}
SERVER_DISTRIBUTION = "tokenwire-server"
INSTALL_SERVER = f"pip install {SERVER_DISTRIBUTION} (from a checkout of tokenwire: pip install .)"

#: What an `add_parser` gets: the sub-parsers of the `tokenwire` parser.
Subparsers = Any
AddParser = Callable[[Subparsers], None]


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def version_text() -> str:
    """`tokenwire --version`: the client's version, and the server's when installed."""
    from tokenwire import __version__

    lines = [
        f"tokenwire {_version('tokenwire') or __version__} (Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}, protobuf {_version('protobuf') or 'unknown'})"
    ]
    server = _version(SERVER_DISTRIBUTION)
    if server is not None:
        lines.append(f"{SERVER_DISTRIBUTION} {server}")
    return "\n".join(lines)


class _Version(argparse.Action):
    """argparse's own would wrap the lines to the terminal's width."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_text())
        parser.exit()


# ---------------------------------------------------------------------------- ask


def _summary(result: Result, mode: str, stream: ResponseStream | None) -> str:
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
    # After a resume (by hand, or the client's own after a dropped connection or a
    # takeover) the server's figure belongs to the first call: time the one that answered.
    resumed_ttft = stream.resumed_time_to_first_token if stream is not None else None
    if resumed_ttft is not None:
        ttft = f"ttft {resumed_ttft * 1000:.1f} ms from resume"
    else:
        ttft = f"ttft {result.time_to_first_token * 1000:.1f} ms"
    return (
        f"[{mode} · {result.chunk_count} chunks · sha256 {result.sha256[:12]}… {status} · "
        f"{ttft} · total {result.total_time * 1000:.1f} ms"
        f" · {reason} · {verdict} · {completed.usage.completion_tokens} tokens]"
    )


#: The checks of content `ask` lists under its summary (integrity is the summary's own).
SHOWN_CHECKS = ("json_schema", "tool_arguments")


def _checks(result: Result) -> list[str]:
    """One line per json_schema / tool_arguments check (and any other that did
    not pass), each violation under it with its JSON pointer."""
    lines = []
    for check in result.completed.verification.checks:
        outcome = pb.CheckOutcome.Name(check.outcome).removeprefix("CHECK_OUTCOME_").lower()
        if check.name not in SHOWN_CHECKS and check.outcome == pb.CHECK_OUTCOME_PASSED:
            continue
        if check.name == "integrity":
            continue
        lines.append(f"  check {check.name}: {outcome}")
        for violation in check.violations:
            where = violation.json_pointer or (
                f"bytes {violation.start}-{violation.end}" if violation.end else ""
            )
            where = f" at {where}" if where else ""
            lines.append(f"    {violation.code}{where}: {violation.message}")
    return lines


def _call_header(call: ToolCall | ToolCallFragment) -> str:
    return f"→ tool call #{call.index} {call.name or '?'}("


class _CallPrinter:
    """Shows tool calls as they form: a header line when a call begins, its
    arguments as they stream, `)` on a line of its own when it ends (another
    call or text comes, or the stream ends)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.open: int | None = None
        self.seen: set[int] = set()
        self.at_line_start = True

    def text(self, text: str) -> None:
        self.close()
        if text:
            self.out.write(text)
            self.at_line_start = text.endswith("\n")

    def fragment(self, fragment: ToolCallFragment) -> None:
        if self.open != fragment.index:
            self.close()
            if not self.at_line_start:
                self.out.write("\n")
            call = fragment.call
            again = " (continued)" if fragment.index in self.seen else ""
            self.out.write(f"{_call_header(call)}{again}\n")
            self.seen.add(fragment.index)
            self.open = fragment.index
        self.out.write(fragment.arguments)

    def close(self) -> None:
        if self.open is not None:
            self.out.write("\n)\n")
            self.open = None
            self.at_line_start = True

    def calls(self, calls: tuple[ToolCall, ...]) -> None:
        """Whole calls (a unary answer, or the ones a retraction put in place)."""
        self.close()
        for call in calls:
            if not self.at_line_start:
                self.out.write("\n")
            self.out.write(f"{_call_header(call)}\n{call.arguments}\n)\n")
            self.at_line_start = True


def _print_stream(stream: ResponseStream, out: TextIO) -> Result:
    printer = _CallPrinter(out)
    for event in stream:
        if isinstance(event, Chunk):
            printer.text(event.text)
            out.flush()
        elif isinstance(event, ToolCallFragment):
            printer.fragment(event)
            out.flush()
        elif isinstance(event, Retraction):
            printer.close()
            out.write(
                f"\n[retracted from chunk {event.from_sequence}; final text:]\n{event.final_text}"
            )
            if event.final_tool_calls or event.kept_tool_calls:
                out.write("\n[final tool calls:]\n")
                printer.at_line_start = True
                printer.calls(event.final_tool_calls)
    printer.close()
    assert stream.result is not None
    return stream.result


def _read_json(path: str, flag: str) -> object:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except OSError as error:
        raise ValueError(f"{flag} {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{flag} {path}: not JSON: {error}") from None


def _tool_options(args: argparse.Namespace) -> RespondOptions:
    """tools / tool_choice / response_format from --tools, --tool-choice,
    --json-schema, --json-object and --strict; ValueError says what is wrong."""
    options: RespondOptions = {}
    if args.tools:
        document = _read_json(args.tools, "--tools")
        if isinstance(document, dict) and isinstance(document.get("tools"), list):
            document = document["tools"]  # {"tools": [...]}, as in a request body
        if not isinstance(document, list):
            raise ValueError(f"--tools {args.tools}: expected a JSON list of tools")
        try:
            options["tools"] = tools(document, strict=args.strict or None)
        except (TypeError, ValueError) as error:
            raise ValueError(f"--tools {args.tools}: {error}") from None
    if args.tool_choice:
        options["tool_choice"] = tool_choice(args.tool_choice)
    if args.json_schema:
        schema = _read_json(args.json_schema, "--json-schema")
        if not isinstance(schema, dict):
            raise ValueError(f"--json-schema {args.json_schema}: expected a JSON object")
        options["response_format"] = schema_document(schema, strict=args.strict)
    elif args.json_object:
        options["response_format"] = json_object_format(strict=args.strict)
    return options


def resuming_can_help(error: TokenwireError) -> bool:
    """The call ended but the response may live on (or replay whole): a dropped or
    timed-out connection, a shared store that was briefly away, a stream the
    client stopped trusting mid-way. Not a response the server ended (a backend
    failure, a cancel, a failed verification): a resume replays that ending."""
    if isinstance(error, IntegrityError):
        return False  # the whole text arrived and does not hash right
    if isinstance(error, ProtocolError):
        return True  # what the client holds is checked; the rest can be asked again
    if error.domain:
        return error.reason in ("STORE_UNAVAILABLE", "SERVER_STOPPING")
    return error.code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    )


def _resume_command(args: argparse.Namespace, response_id: str, after: int) -> str:
    words = ["tokenwire", "ask"]
    if args.target != DEFAULT_TARGET:
        words += ["--target", args.target]
    words += ["--resume", response_id, "--after", str(after)]
    for flag in ("tls_ca", "tls_cert", "tls_key"):
        if getattr(args, flag):
            words += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    if args.tls and not args.tls_ca:
        words.append("--tls")
    return shlex.join(words)


def _connection_hint(error: TokenwireError, args: argparse.Namespace) -> str | None:
    """What gRPC's "Socket closed" means here: the server hung up during the
    connection's set-up, which is what a TLS server does to a handshake it refuses."""
    if error.code != grpc.StatusCode.UNAVAILABLE or error.domain:
        return None
    if "Socket closed" not in error.message or "failed to connect" not in error.message:
        return None
    if args.tls or args.tls_ca:
        if not args.tls_cert:
            return (
                "the server refused the TLS handshake: it requires a client certificate "
                "(mTLS) and none was given; pass --tls-cert and --tls-key"
            )
        return (
            f"the server refused the TLS handshake: it did not accept the client "
            f"certificate {args.tls_cert} (is it signed by the CA the server trusts?)"
        )
    return "the server closed the connection at once: does it expect TLS? (--tls or --tls-ca)"


def _tls_problem(args: argparse.Namespace) -> str | None:
    for flag in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, flag)
        name = f"--{flag.replace('_', '-')}"
        if not path:
            continue
        if not os.path.exists(path):
            return f"{name} {path}: no such file"
        if not os.path.isfile(path):
            return f"{name} {path}: not a file"
        if not os.access(path, os.R_OK):
            return f"{name} {path}: not readable"
    if bool(args.tls_cert) != bool(args.tls_key):
        return "--tls-cert and --tls-key go together (a client certificate and its key)"
    return None


def _ask(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        split_targets(args.target)
    except ValueError as error:
        err.write(f"tokenwire ask: --target: {error}\n")
        return 2
    problem = _tls_problem(args)
    if problem is not None:
        err.write(f"tokenwire ask: {problem}\n")
        return 2
    try:
        tool_options = _tool_options(args)
    except ValueError as error:
        err.write(f"tokenwire ask: {error}\n")
        return 2
    options: RespondOptions = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "labels": dict(args.label),
        "seed": args.seed,
        **tool_options,
    }
    credentials = (
        tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        if args.tls_ca or args.tls_cert or args.tls
        else None
    )
    api_key = args.api_key or os.environ.get("TOKENWIRE_API_KEY") or None
    stream: ResponseStream | None = None
    with Client(
        args.target, timeout=args.timeout, credentials=credentials, api_key=api_key
    ) as client:
        try:
            if args.unary:
                result = client.respond(args.prompt, **options)
                out.write(result.text)
                if result.tool_calls:
                    printer = _CallPrinter(out)
                    printer.at_line_start = not result.text or result.text.endswith("\n")
                    printer.calls(result.tool_calls)
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
            _report_failure(error, args, stream, out, err)
            return 1
    out.write("\n")
    err.write(_summary(result, mode, stream) + "\n")
    for line in _checks(result):
        err.write(line + "\n")
    if args.show_completed:
        out.write(json_format.MessageToJson(result.completed) + "\n")
    out.flush()
    return 0


def _report_failure(
    error: TokenwireError,
    args: argparse.Namespace,
    stream: ResponseStream | None,
    out: TextIO,
    err: TextIO,
) -> None:
    out.write("\n")
    out.flush()
    hint = _connection_hint(error, args)
    if hint is not None:
        err.write(f"tokenwire ask: {hint}\n  ({error})\n")
    else:
        err.write(f"tokenwire ask: {error}\n")
    for violation in error.field_violations:
        err.write(f"  {violation.field}: {violation.description}\n")
    if stream is None:
        return
    response_id = stream.response_id or args.resume or ""
    held = stream.last_sequence
    if not response_id or (held == 0 and not args.resume):
        return  # failed before the first chunk: nothing to resume, ask again
    err.write(f"  response {response_id}, last sequence received: {held}\n")
    if not (stream.request.resumable or stream.request.HasField("resume")):
        err.write("  not resumable (asked with --no-resume): ask again to get the answer\n")
    elif resuming_can_help(error):
        err.write(f"  resume with: {_resume_command(args, response_id, held)}\n")


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_ask_parser(commands: Subparsers) -> None:
    ask = commands.add_parser(
        "ask",
        help="ask a running server and stream the answer",
        description="Streams the answer to stdout and a summary line to stderr. A failure "
        "after the first chunk of a resumable answer prints the response id, the last "
        "sequence received and the command that resumes it.",
    )
    ask.add_argument("prompt", nargs="?", default="", help="the question (not with --resume)")
    ask.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help="server HOST:PORT, or several comma-separated (HOST:PORT,HOST:PORT) to fail "
        "over: an address that refuses the connection is skipped at once, and a stream "
        "whose connection drops resumes on the next one (replicas sharing a Redis store "
        f"continue it). Default {DEFAULT_TARGET}",
    )
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
    ask.add_argument(
        "--show-completed", action="store_true", help="print Completed as JSON (to stdout)"
    )
    ask.add_argument(
        "--no-resume",
        dest="resumable",
        action="store_false",
        help="do not survive a dropped connection (by default the client resumes by itself, "
        "and Ctrl-C cancels the response)",
    )
    ask.add_argument("--resume", metavar="RESPONSE_ID", help="continue an earlier response")
    ask.add_argument("--after", type=int, default=0, help="with --resume: the last sequence held")
    ask.add_argument(
        "--tools",
        metavar="FILE",
        help="JSON file: a list of tools the model may call, each OpenAI-style "
        '{"type": "function", "function": {"name", "description", "parameters", "strict"}} '
        'or bare {"name", "description", "parameters", "strict"}. Calls are shown as they '
        "form: `→ tool call #0 NAME(`, the arguments as they stream, `)`",
    )
    ask.add_argument(
        "--tool-choice",
        metavar="auto|none|required|NAME",
        help="whether the model may (auto), must not (none) or must (required) call a "
        "tool, or the one tool it must call",
    )
    structured = ask.add_mutually_exclusive_group()
    structured.add_argument(
        "--json-schema",
        metavar="FILE",
        help="the answer must be JSON valid against this JSON Schema (a bare schema, or "
        'OpenAI\'s {"name", "schema", "strict"}); the check is listed under the summary',
    )
    structured.add_argument(
        "--json-object", action="store_true", help="the answer must be one JSON object"
    )
    ask.add_argument(
        "--strict",
        action="store_true",
        help="with --json-schema / --json-object, and for tools whose file does not say: "
        "stop generation as soon as the output can no longer be valid",
    )
    ask.add_argument("--api-key", help="API key (default: TOKENWIRE_API_KEY)")
    ask.add_argument("--tls", action="store_true", help="use TLS with the system's trusted roots")
    ask.add_argument("--tls-ca", help="PEM CA that signed the server's certificate (implies TLS)")
    ask.add_argument("--tls-cert", help="PEM client certificate, for mTLS")
    ask.add_argument("--tls-key", help="PEM key of --tls-cert")
    ask.set_defaults(run=_run_ask)


def _run_ask(args: argparse.Namespace) -> int:
    if bool(args.prompt) == bool(args.resume):
        args.parser.error("ask takes a prompt, or --resume RESPONSE_ID (not both)")
    return _ask(args, sys.stdout, sys.stderr)


# ----------------------------------------------------------------- the command


def _server_entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _client_command_modules() -> list[AddParser]:
    found: list[AddParser] = []
    for name in CLIENT_COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise  # the module is there but broken: say why
            continue
        found.append(module.add_parser)
    return found


def build_parser(wanted: str | None = None) -> argparse.ArgumentParser:
    """The whole `tokenwire` parser. `wanted` is the subcommand about to run:
    a server command that fails to load raises only when it is the one wanted
    (a broken server install must not take `ask` down with it)."""
    parser = argparse.ArgumentParser(
        prog="tokenwire", description="Governed, verifiable LLM token streams over gRPC."
    )
    parser.add_argument(
        "--version",
        action=_Version,
        help="print the client's version, and the server's when it is installed",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_ask_parser(commands)
    for add_parser in _client_command_modules():
        add_parser(commands)
    for name, entry_point in sorted(_server_entry_points().items()):
        try:
            add_parser = entry_point.load()
        except Exception:
            if name == wanted:
                raise  # the server is installed but broken: say why, don't hide it
            continue
        add_parser(commands)
    for name, text in SERVER_COMMANDS.items():
        if name not in commands.choices:
            commands.add_parser(name, help=f"{text} (needs {SERVER_DISTRIBUTION})")
    return parser


def _wanted_command(argv: Sequence[str]) -> str | None:
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    wanted = _wanted_command(words)
    if wanted in SERVER_COMMANDS and wanted not in _server_entry_points():
        print(
            f"tokenwire {wanted}: not installed; it comes with the server: {INSTALL_SERVER}",
            file=sys.stderr,
        )
        return 2
    parser = build_parser(wanted)
    args = parser.parse_args(words)
    args.parser = parser
    # `serve` restarts itself with grpc's C core silenced, from this process's own
    # command line; only when that is what it was given.
    args.from_command_line = argv is None
    handler = getattr(args, "run", None) or getattr(args, "func", None)
    if handler is None:
        parser.error(f"{args.command}: nothing runs this command")
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
