"""The client distribution on its own: the library and `tokenwire ask` against a
fake RespondService, and what `tokenwire` says about the server's commands.

These run in the full development environment (from the repository's
`pytest`) and in a virtualenv holding only `pip install ./clients/python`
(`.ci/run`, with TOKENWIRE_CLIENT_ALONE=1): nothing here may need
tokenwire_server.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import types
from importlib import metadata
from pathlib import Path

import grpc
import pytest
from fake_respond import FakeServer, answer, chunks, fail

import tokenwire
from tokenwire import cli as tokenwire_cli
from tokenwire.v1 import respond_pb2 as pb

PACKAGE = Path(tokenwire.__file__).resolve().parent
#: Set by .ci/run in the client-only virtualenv: the server must really be absent.
CLIENT_ALONE = os.environ.get("TOKENWIRE_CLIENT_ALONE") == "1"
PARTS = ["The ", "quick ", "brown ", "fox"]


def tokenwire_command() -> list[str]:
    """The installed `tokenwire` console script of this interpreter's environment
    (venv or not), else the module."""
    script = Path(sysconfig.get_path("scripts")) / "tokenwire"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tokenwire.cli"]


def run_tokenwire(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Not from the checkout's clients/python: the installed package must answer.
    return subprocess.run(
        [*tokenwire_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def ask(
    capsys: pytest.CaptureFixture[str], *args: str, target: str | None = None
) -> tuple[int, str, str]:
    argv = ["ask", *(["--target", target] if target else []), *args]
    code = tokenwire_cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------ the package


def test_the_client_never_imports_the_server() -> None:
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            assert not any(n.split(".")[0] == "tokenwire_server" for n in names), path


def test_the_distribution_needs_only_grpc_and_protobuf() -> None:
    requires = metadata.requires("tokenwire") or []
    needed = sorted(
        {re.match(r"[\w.-]+", r)[0] for r in requires if "extra ==" not in r}  # type: ignore[index]
    )
    assert needed == ["googleapis-common-protos", "grpcio", "protobuf"]
    assert metadata.version("tokenwire") == tokenwire.__version__


@pytest.mark.skipif(
    not CLIENT_ALONE and importlib.util.find_spec("tokenwire_server") is not None,
    reason="the server is installed here; .ci/run runs this in a client-only virtualenv",
)
def test_installed_alone_the_server_commands_say_what_to_install(tmp_path: Path) -> None:
    assert importlib.util.find_spec("tokenwire_server") is None
    assert "site-packages" in tokenwire.__file__  # the installed copy, not the checkout's
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("tokenwire-server")
    for command in (["serve"], ["serve", "--port", "0"], ["audit", "verify"], ["keys", "hash"]):
        result = run_tokenwire(*command, cwd=tmp_path)
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1 and "pip install tokenwire-server" in result.stderr
        assert "Traceback" not in result.stderr
    result = run_tokenwire("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith(f"tokenwire {tokenwire.__version__} (")
    assert "tokenwire-server" not in result.stdout
    assert "(needs tokenwire-server)" in run_tokenwire("--help", cwd=tmp_path).stdout


def test_without_the_server_its_commands_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tokenwire_cli, "_server_entry_points", dict)
    for command in (["serve", "--port", "0"], ["audit", "list"], ["keys", "hash"]):
        assert tokenwire_cli.main(command) == 2
        err = capsys.readouterr().err
        assert err == (
            f"tokenwire {command[0]}: not installed; it comes with the server: "
            "pip install tokenwire-server (from a checkout of tokenwire: pip install .)\n"
        )
    with pytest.raises(SystemExit):
        tokenwire_cli.main(["--help"])
    assert "serve" in capsys.readouterr().out


def test_version_names_the_client(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        tokenwire_cli.main(["--version"])
    assert exited.value.code == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"tokenwire {tokenwire.__version__} (Python ")


def test_a_client_side_command_module_is_registered(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """How `tokenwire review` (clients/python/tokenwire/review_cli.py) plugs in."""
    module = types.ModuleType("tokenwire_test_review_cli")

    def add_parser(commands: object) -> None:
        review = commands.add_parser("review", help="review things")  # type: ignore[attr-defined]
        review.add_argument("what")
        review.set_defaults(run=lambda args: print(f"reviewed {args.what}") or 0)

    module.add_parser = add_parser  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(tokenwire_cli, "CLIENT_COMMAND_MODULES", (module.__name__,))
    assert tokenwire_cli.main(["review", "x"]) == 0
    assert capsys.readouterr().out == "reviewed x\n"
    # A module that is simply not there is no error (review_cli.py may not exist yet).
    monkeypatch.setattr(tokenwire_cli, "CLIENT_COMMAND_MODULES", ("tokenwire.no_such_cli",))
    assert "review" not in tokenwire_cli.build_parser().format_help()


# ------------------------------------------------------------------ tokenwire ask


def test_ask_streams_and_show_completed_goes_to_stdout(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = ask(capsys, "--show-completed", "q", target=fake.address)
    assert code == 0
    assert out.startswith("hello world\n{")
    assert '"finalSha256"' in out and "finalSha256" not in err
    assert "verified" in err


def test_a_failure_after_the_first_chunk_says_how_to_resume(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    def dropped(request: pb.StreamRespondRequest, context: grpc.ServicerContext):
        if request.HasField("resume"):
            fail(context, grpc.StatusCode.UNAVAILABLE, "still down")
        yield from chunks(PARTS)[:3]
        fail(context, grpc.StatusCode.UNAVAILABLE, "connection reset")

    fake.script = dropped
    code, out, err = ask(capsys, "q", target=fake.address)
    assert code == 1 and out == "The quick brown \n"
    lines = err.splitlines()
    assert lines[0].startswith("tokenwire ask: UNAVAILABLE: ")
    assert lines[1] == "  response rsp_fake, last sequence received: 3"
    assert lines[2].startswith("  resume with: ")
    command = shlex.split(lines[2].removeprefix("  resume with: "))
    assert command == ["tokenwire", "ask", "--target", fake.address, "--resume", "rsp_fake",
                       "--after", "3"]  # fmt: skip

    # The printed command works once the server answers again.
    fake.script = lambda request, context: answer(PARTS, first=request.resume.after_sequence + 1)
    code, out, err = ask(capsys, *command[2:])
    assert code == 0 and out == "fox\n"
    assert "resumed after 3, server verified" in err and "from resume" in err


@pytest.mark.parametrize(
    ("code", "reason", "resumable"),
    [
        (grpc.StatusCode.UNAVAILABLE, "BACKEND_FAILED", True),  # the server ended the response
        (grpc.StatusCode.CANCELLED, "RESPONSE_CANCELLED", True),
        (grpc.StatusCode.DATA_LOSS, "VERIFICATION_FAILED", True),
        (grpc.StatusCode.UNAVAILABLE, "", False),  # asked with --no-resume
    ],
)
def test_no_resume_advice_where_resuming_cannot_help(
    fake: FakeServer,
    capsys: pytest.CaptureFixture[str],
    code: grpc.StatusCode,
    reason: str,
    resumable: bool,
) -> None:
    def failing(request: pb.StreamRespondRequest, context: grpc.ServicerContext):
        yield from chunks(PARTS)[:2]
        fail(context, code, "it ended", reason, {"responseId": "rsp_fake", "lastSequence": "2"})

    fake.script = failing
    status, _, err = ask(capsys, *([] if resumable else ["--no-resume"]), "q", target=fake.address)
    assert status == 1
    assert "response rsp_fake, last sequence received: 2" in err
    assert "resume with" not in err and "--resume" not in err
    if not resumable:
        assert "not resumable" in err


@pytest.mark.parametrize(
    ("code", "reason"),
    [(grpc.StatusCode.INVALID_ARGUMENT, "MAX_TOKENS_TOO_LARGE"),
     (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")],
)  # fmt: skip
def test_a_refused_request_gets_no_resume_advice(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], code: grpc.StatusCode, reason: str
) -> None:
    def refused(request: pb.StreamRespondRequest, context: grpc.ServicerContext):
        fail(context, code, "no", reason)
        yield from ()

    fake.script = refused
    status, _, err = ask(capsys, "q", target=fake.address)
    assert status == 1 and reason in err
    assert err.count("\n") == 1, err


def test_a_resume_of_an_unknown_response_gets_no_advice(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    def unknown(request: pb.StreamRespondRequest, context: grpc.ServicerContext):
        fail(context, grpc.StatusCode.NOT_FOUND, "no such response", "RESPONSE_NOT_FOUND")
        yield from ()

    fake.script = unknown
    status, _, err = ask(capsys, "--resume", "rsp_gone", "--after", "4", target=fake.address)
    assert status == 1 and "RESPONSE_NOT_FOUND" in err and "resume with" not in err


def test_missing_tls_files_are_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    present = tmp_path / "ca.pem"
    present.write_text("not really a certificate")
    for flags, message in [
        (["--tls-ca", str(tmp_path / "nope.pem")], f"--tls-ca {tmp_path / 'nope.pem'}: no such"),
        (["--tls-ca", str(present), "--tls-cert", "/no/cert.pem", "--tls-key", str(present)],
         "--tls-cert /no/cert.pem: no such file"),
        (["--tls-cert", str(present), "--tls-key", "/no/key.pem"],
         "--tls-key /no/key.pem: no such file"),
        (["--tls-cert", str(present)], "--tls-cert and --tls-key go together"),
        (["--tls-ca", str(tmp_path)], "not a file"),
    ]:  # fmt: skip
        code, out, err = ask(capsys, *flags, "q", target="127.0.0.1:1")
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and message in err, err
        assert err.startswith("tokenwire ask: ")


def test_a_target_without_an_address_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = ask(capsys, "q", target=" , ")
    assert (code, out) == (2, "")
    assert err == "tokenwire ask: --target: no address in target ' , '\n"


def test_the_console_script_runs_ask(fake: FakeServer, tmp_path: Path) -> None:
    result = run_tokenwire("ask", "--target", fake.address, "q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello world\n"
    help_text = run_tokenwire("ask", "--help", cwd=tmp_path).stdout
    assert "comma-separated" in help_text and "fail" in help_text
