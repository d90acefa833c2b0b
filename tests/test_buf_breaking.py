"""The wire-compatibility gate: `buf breaking` at FILE level against the previous commit.

Why: Python, Go and TypeScript clients are generated from one proto, and
callers in the field keep old stubs for months. A renamed, renumbered or
deleted field (or a changed JSON name, which grpcurl/buf curl/Connect callers
depend on) must fail CI in the commit that makes it, not surface as garbled
data later. `buf lint` and `buf format` (tests/test_contract_tooling.py) only
look at one version; this compares two.

The gate compares HEAD with HEAD~1: on main that is the previous commit of
main, and on a merge commit its first parent. `TOKENWIRE_BUF_AGAINST` overrides
the against-input (e.g. `.git#branch=main` to check a feature branch against
main). A deliberate break lands in one commit that fails this gate by design;
the next commit compares against it and passes again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("protos") / "tokenwire" / "v1" / "respond.proto"
#: buf's git input: the repository's own history, one commit back. buf.yaml sits
#: at the repository root (module path `protos`), so no `subdir` is needed and
#: both sides are read with the same breaking config (FILE).
DEFAULT_AGAINST = ".git#ref=HEAD~1"
#: buf's exit code when it found breaking changes (1 would be a usage/build error).
BUF_FOUND_VIOLATIONS = 100


def _buf() -> str:
    buf = shutil.which("buf")
    assert buf, "buf comes with the dev extra (buf-bin)"
    return buf


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-c", "user.name=tokenwire-test", "-c", "user.email=test@tokenwire.dev", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def buf_breaking(repo: Path, against: str = DEFAULT_AGAINST) -> subprocess.CompletedProcess[str]:
    """The gate's one command, run in `repo` (the real checkout or a scratch copy)."""
    return subprocess.run(
        [_buf(), "breaking", "--against", against],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _previous_commit_problem() -> str | None:
    """Why HEAD~1 cannot be compared with here, or None when it can."""
    if _git("rev-parse", "--git-dir", cwd=ROOT).returncode != 0:
        return "not a git checkout"
    if _git("rev-parse", "--verify", "--quiet", "HEAD~1^{commit}", cwd=ROOT).returncode != 0:
        shallow = _git("rev-parse", "--is-shallow-repository", cwd=ROOT).stdout.strip()
        if shallow == "true":
            return "shallow clone without HEAD~1 (fetch with depth >= 2)"
        return "HEAD has no parent commit"
    if _git("cat-file", "-e", f"HEAD~1:{PROTO.as_posix()}", cwd=ROOT).returncode != 0:
        return f"HEAD~1 has no {PROTO.as_posix()}: nothing to be compatible with"
    return None


def test_protos_are_wire_compatible_with_the_previous_commit() -> None:
    against = os.environ.get("TOKENWIRE_BUF_AGAINST", "")
    if not against:
        problem = _previous_commit_problem()
        if problem:
            pytest.skip(f"buf breaking against HEAD~1: {problem}")
        against = DEFAULT_AGAINST
    result = buf_breaking(ROOT, against)
    assert result.returncode == 0, (
        f"breaking change against {against} (buf breaking, FILE rules):\n"
        + result.stdout
        + result.stderr
    )


def _scratch_repo(tmp_path: Path) -> Path:
    """A copy of the module in its own git repository, with the current protos committed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "buf.yaml", repo / "buf.yaml")
    shutil.copytree(ROOT / "protos", repo / "protos")
    for args in (("init", "-q"), ("add", "-A"), ("commit", "-qm", "contract as on main")):
        result = _git(*args, cwd=repo)
        assert result.returncode == 0, result.stderr
    return repo


def _commit_edit(repo: Path, old: str, new: str) -> None:
    proto = repo / PROTO
    text = proto.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    proto.write_text(text.replace(old, new), encoding="utf-8")
    result = _git("commit", "-qam", "edit the contract", cwd=repo)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "  string content = 2;",
            "  string text = 2;",
            'Field "2" on message "ChatMessage" changed name from "content" to "text".',
        ),
        (
            "  string content = 2;",
            "  string content = 7;",
            'Previously present field "2" with name "content" on message "ChatMessage"'
            " was deleted.",
        ),
    ],
    ids=["rename", "renumber"],
)
def test_the_gate_fails_a_breaking_commit(tmp_path: Path, old: str, new: str, message: str) -> None:
    """The same command on a scratch repository whose last commit breaks the wire."""
    repo = _scratch_repo(tmp_path)
    assert buf_breaking(repo).returncode == 1, "HEAD~1 does not exist yet: buf must say so"
    _commit_edit(repo, "  // Must be set.\n", "  // Must be set (never ROLE_UNSPECIFIED).\n")
    compatible = buf_breaking(repo)
    assert compatible.returncode == 0, compatible.stdout + compatible.stderr
    _commit_edit(repo, old, new)
    broken = buf_breaking(repo)
    assert broken.returncode == BUF_FOUND_VIOLATIONS, broken.stdout + broken.stderr
    assert message in broken.stdout
    assert f"{PROTO.as_posix()}:" in broken.stdout
