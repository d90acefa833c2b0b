"""`tokenwire review list|show|approve|reject|edit|watch` against an in-process server
with reviewer keys (clients/python/tokenwire/review_cli.py)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StartServer
from tests.test_review_service import (
    CALLER_A,
    REVIEWER_A,
    REVIEWER_B,
    TEXT,
    Reviews,
    keys_file,
)
from tokenwire import cli
from tokenwire.review_cli import NOT_RELEASED, run_review
from tokenwire_server.review.model import ReviewState


@pytest.fixture
async def reviews(start_server: StartServer, tmp_path: Path) -> Reviews:
    audit = str(tmp_path / "audit.db")
    server = await start_server(auth_keys_file=keys_file(tmp_path / "keys.yaml"), audit_path=audit)
    return Reviews(server, audit)


async def tokenwire_review(reviews: Reviews, key: str | None, *argv: str) -> tuple[int, str, str]:
    """Runs the command in a thread (it is blocking; the server shares this loop)."""
    out, err = io.StringIO(), io.StringIO()
    words = [*argv, "--target", reviews.server.address]
    if key is not None:
        words += ["--api-key", key]
    code = await asyncio.to_thread(run_review, words, out, err)
    return code, out.getvalue(), err.getvalue()


async def test_list_shows_the_tenants_reviews(reviews: Reviews) -> None:
    first = await reviews.open("rsp-1")
    await reviews.open("rsp-2")
    await reviews.open("rsp-g", tenant="globex")
    code, out, err = await tokenwire_review(reviews, REVIEWER_A, "list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["REVIEW", "STATE", "MODE"]
    assert len(lines) == 3 and first.review_id in lines[1] and "pending" in lines[1]
    assert "hold" in lines[1] and "advice" in lines[1] and "rsp-1" in lines[1]
    assert "rsp-g" not in out
    code, out, _ = await tokenwire_review(reviews, REVIEWER_B, "list", "--json")
    assert code == 0 and [r["response_id"] for r in json.loads(out)["reviews"]] == ["rsp-g"]
    code, out, _ = await tokenwire_review(reviews, REVIEWER_A, "list", "--limit", "1")
    assert code == 0 and "(more than 1; raise --limit to see them)" in out


async def test_show_prints_the_held_text_to_reviewers_only(reviews: Reviews) -> None:
    review = await reviews.open()
    code, out, _ = await tokenwire_review(reviews, REVIEWER_A, "show", review.review_id)
    assert code == 0
    assert "state: pending" in out and "hold (nothing released until decided)" in out
    assert "why: advice: validator c: escalate" in out
    assert "check: validator:c escalated" in out and TEXT in out
    code, out, _ = await tokenwire_review(reviews, CALLER_A, "show", review.review_id)
    assert code == 0 and "state: pending" in out and TEXT not in out
    code, out, _ = await tokenwire_review(reviews, CALLER_A, "show", review.review_id, "--json")
    assert json.loads(out)["state"] == "REVIEW_STATE_PENDING"


async def test_approve_reject_and_edit(reviews: Reviews, tmp_path: Path) -> None:
    approve, reject, edit = [await reviews.open(f"rsp-{i}") for i in range(3)]
    code, out, err = await tokenwire_review(reviews, REVIEWER_A, "approve", approve.review_id)
    assert code == 0, err
    assert out.startswith(f"review {approve.review_id} approved · released text sha256 ")
    code, out, _ = await tokenwire_review(
        reviews, REVIEWER_A, "reject", reject.review_id, "--reason", "advice"
    )
    assert (code, out) == (0, f"review {reject.review_id} rejected\n")
    replacement = tmp_path / "better.txt"
    replacement.write_text("Talk to a licensed adviser.")
    code, out, _ = await tokenwire_review(
        reviews,
        REVIEWER_A,
        "edit",
        edit.review_id,
        "--reason",
        "no single-stock advice",
        "--text-file",
        str(replacement),
        "--json",
    )
    decided = json.loads(out)
    assert code == 0 and decided["state"] == "REVIEW_STATE_EDITED"
    assert decided["decided_text"] == "Talk to a licensed adviser."
    history = decided["history"][-1]
    assert (history["actor"], history["reason"]) == ("alice", "no single-stock advice")
    stored = await reviews.server.server.reviews.get(edit.review_id)
    assert stored is not None and stored.state is ReviewState.EDITED


async def test_refusals_are_printed_with_their_reason(reviews: Reviews) -> None:
    review = await reviews.open()
    code, _, err = await tokenwire_review(reviews, CALLER_A, "list")
    assert code == 1 and "PERMISSION_DENIED REVIEWER_ROLE_REQUIRED" in err
    code, _, err = await tokenwire_review(reviews, None, "list")
    assert code == 1 and "UNAUTHENTICATED MISSING_CREDENTIALS" in err
    code, _, err = await tokenwire_review(reviews, REVIEWER_B, "show", review.review_id)
    assert code == 1 and "NOT_FOUND REVIEW_NOT_FOUND" in err
    assert (await tokenwire_review(reviews, REVIEWER_A, "approve", review.review_id))[0] == 0
    code, _, err = await tokenwire_review(
        reviews, REVIEWER_A, "reject", review.review_id, "--reason", "late"
    )
    assert code == 1 and "FAILED_PRECONDITION REVIEW_ALREADY_DECIDED" in err
    code, _, err = await tokenwire_review(
        reviews, REVIEWER_A, "edit", review.review_id, "--reason", "x", "--text", ""
    )
    assert code == 1 and "replacement_text: required to edit" in err


async def test_usage_problems_exit_2(reviews: Reviews, tmp_path: Path) -> None:
    code, _, err = await tokenwire_review(
        reviews, REVIEWER_A, "list", "--tls-ca", str(tmp_path / "missing.pem")
    )
    assert code == 2 and "--tls-ca" in err and "no such file" in err
    code, _, err = await tokenwire_review(
        reviews, REVIEWER_A, "edit", "rev-x", "--reason", "r", "--text-file", "/nope"
    )
    assert code == 2 and "--text-file /nope" in err
    with pytest.raises(SystemExit) as exited:  # argparse: a reason is required to reject
        run_review(["reject", "rev-x"], io.StringIO(), io.StringIO())
    assert exited.value.code == 2


async def test_watch_waits_for_the_decision(reviews: Reviews) -> None:
    approved, rejected = await reviews.open("rsp-1"), await reviews.open("rsp-2")
    watching = asyncio.create_task(tokenwire_review(reviews, CALLER_A, "watch", approved.review_id))
    await asyncio.sleep(0.5)
    assert not watching.done()
    await reviews.decide(REVIEWER_A, review_id=approved.review_id, decision=1)
    code, out, _ = await asyncio.wait_for(watching, 10)
    lines = out.splitlines()
    assert code == 0 and "pending" in lines[0] and "approved" in lines[1]
    assert lines[-1] == TEXT  # the held payload, released
    await reviews.decide(REVIEWER_A, review_id=rejected.review_id, decision=2, reason="no")
    code, out, _ = await tokenwire_review(reviews, CALLER_A, "watch", rejected.review_id)
    assert code == NOT_RELEASED and out.strip().endswith("rejected") and TEXT not in out


async def test_the_api_key_can_come_from_the_environment(
    reviews: Reviews, monkeypatch: pytest.MonkeyPatch
) -> None:
    await reviews.open()
    monkeypatch.setenv("TOKENWIRE_API_KEY", REVIEWER_A)
    code, out, _ = await tokenwire_review(reviews, None, "list")
    assert code == 0 and "rsp-1" in out


async def test_tokenwire_registers_review(
    reviews: Reviews, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = cli.build_parser()
    choices: dict[str, Any] = next(
        a.choices for a in parser._actions if getattr(a, "choices", None) and "ask" in a.choices
    )
    assert "review" in choices
    await reviews.open()
    argv = ["review", "list", "--target", reviews.server.address, "--api-key", REVIEWER_A]
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert "rsp-1" in capsys.readouterr().out
