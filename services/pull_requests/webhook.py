"""GitHub's webhook deliveries, read: is it signed by us, and is it feedback on a Baton PR?

A review comment (`pull_request_review_comment`), a review with a body (`pull_request_review`),
a comment on the PR (`issue_comment`, whose issue is a pull request: its branch is asked of the
API by the caller) or a failed check run (`check_run` completed with `failure`) on a pull
request whose head is `baton/<task_id>` is feedback for that task: the agent's next turn. Its
prompt is one heading line (`# Review comment by @login on `path` line N …`) and then the comment
as written, so the agent reads the reviewer's own words.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

BRANCH_PREFIX = "baton/"
FAILED_CONCLUSIONS = frozenset({"failure", "timed_out"})


def signature_valid(secret: str, body: bytes, header: str | None) -> bool:
    """X-Hub-Signature-256 is `sha256=` + HMAC-SHA256(secret, raw body), compared in constant time."""
    if not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(header.removeprefix("sha256="), expected)


@dataclass(frozen=True)
class Feedback:
    """What becomes a follow-up: the task, who gave it (`github:<login>`), the prompt."""

    task_id: str
    actor: str
    prompt: str


def task_of_branch(ref: str | None) -> str | None:
    return ref[len(BRANCH_PREFIX):] if ref and ref.startswith(BRANCH_PREFIX) and len(ref) > len(BRANCH_PREFIX) else None


def feedback_of(event: str, payload: dict[str, Any], *, head_ref: str | None = None) -> Feedback | None:
    """The follow-up a delivery asks for, or None (another event, action, or a non-Baton PR).
    `head_ref`: the PR's branch, for an `issue_comment` (its payload does not name it)."""
    reader = _READERS.get(event)
    return reader(payload, head_ref) if reader else None


def _review_comment(payload: dict[str, Any], _: str | None) -> Feedback | None:
    comment = payload.get("comment") or {}
    task_id = task_of_branch(((payload.get("pull_request") or {}).get("head") or {}).get("ref"))
    if payload.get("action") != "created" or task_id is None or not comment.get("body"):
        return None
    line = comment.get("line") or comment.get("original_line")
    where = f" on `{comment.get('path')}`" + (f" line {line}" if line else "") if comment.get("path") else ""
    prompt = f"# Review comment by @{_login(comment)}{where} of the pull request (address it in the code):\n{comment['body']}"
    return Feedback(task_id, f"github:{_login(comment)}", prompt)


def _review(payload: dict[str, Any], _: str | None) -> Feedback | None:
    review = payload.get("review") or {}
    task_id = task_of_branch(((payload.get("pull_request") or {}).get("head") or {}).get("ref"))
    if payload.get("action") != "submitted" or task_id is None or not (review.get("body") or "").strip():
        return None
    prompt = (f"# Review by @{_login(review)} of the pull request, {review.get('state', 'commented').lower()} "
              f"(address it in the code):\n{review['body']}")
    return Feedback(task_id, f"github:{_login(review)}", prompt)


def _issue_comment(payload: dict[str, Any], head_ref: str | None) -> Feedback | None:
    comment = payload.get("comment") or {}
    task_id = task_of_branch(head_ref)
    if payload.get("action") != "created" or task_id is None or not comment.get("body"):
        return None
    prompt = f"# Comment by @{_login(comment)} on the pull request (address it in the code):\n{comment['body']}"
    return Feedback(task_id, f"github:{_login(comment)}", prompt)


def _check_run(payload: dict[str, Any], _: str | None) -> Feedback | None:
    run = payload.get("check_run") or {}
    if payload.get("action") != "completed" or run.get("conclusion") not in FAILED_CONCLUSIONS:
        return None
    refs = [task_of_branch((pull.get("head") or {}).get("ref")) for pull in run.get("pull_requests") or []]
    task_id = next((ref for ref in refs if ref), None)
    if task_id is None:
        return None
    output = run.get("output") or {}
    details = "\n".join(filter(None, [output.get("title"), output.get("summary"), output.get("text")]))
    prompt = (f"# The check `{run.get('name', 'check')}` failed ({run['conclusion']}) on the pull request's "
              f"commit {str(run.get('head_sha', ''))[:12]} (fix what makes it fail):\n{details or 'no details given'}")
    app = (run.get("app") or {}).get("slug") or "checks"
    return Feedback(task_id, f"github:{app}", prompt)


def _login(thing: dict[str, Any]) -> str:
    return ((thing.get("user") or {}).get("login")) or "someone"


_READERS = {
    "pull_request_review_comment": _review_comment,
    "pull_request_review": _review,
    "issue_comment": _issue_comment,
    "check_run": _check_run,
}
