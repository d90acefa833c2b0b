"""The contract's tooling: stubs match the protos, buf lint and format are clean."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "clients" / "python" / "tokenwire" / "v1"


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    result = _run("bash", "scripts/generate_stubs.sh", str(tmp_path))
    assert result.returncode == 0, result.stderr
    fresh = tmp_path / "tokenwire" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == [
        f"{proto}_pb2{kind}"
        for proto in ("respond", "review", "validator")
        for kind in (".py", ".pyi", "_grpc.py", "_grpc.pyi")
    ]
    drifted = [n for n in names if not filecmp.cmp(fresh / n, GENERATED / n, shallow=False)]
    assert not drifted, f"stale stubs {drifted}: run scripts/generate_stubs.sh and commit"


def test_buf_lint_is_clean() -> None:
    buf = shutil.which("buf")
    assert buf, "buf comes with the dev extra (buf-bin)"
    result = _run(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_is_clean() -> None:
    buf = shutil.which("buf")
    assert buf
    result = _run(buf, "format", "--diff", "--exit-code")
    assert result.returncode == 0, result.stdout + result.stderr


def test_proto_imports_only_well_known_types() -> None:
    proto = (ROOT / "protos" / "tokenwire" / "v1" / "respond.proto").read_text()
    imports = [line for line in proto.splitlines() if line.startswith("import ")]
    assert imports and all('"google/protobuf/' in line for line in imports)


def test_validator_and_review_protos_import_only_respond_and_well_known_types() -> None:
    for name in ("validator.proto", "review.proto"):
        proto = (ROOT / "protos" / "tokenwire" / "v1" / name).read_text()
        imports = [line for line in proto.splitlines() if line.startswith("import ")]
        assert 'import "tokenwire/v1/respond.proto";' in imports, name
        assert all(
            '"google/protobuf/' in line or '"tokenwire/v1/respond.proto"' in line
            for line in imports
        ), (name, imports)
