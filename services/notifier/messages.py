"""What a notification says, in JSON or Slack's form, and how it is signed (no I/O)."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any

from events import Envelope

SIGNATURE_HEADER = "X-Baton-Signature-256"
DELIVERY_HEADER = "X-Baton-Delivery"
EVENT_HEADER = "X-Baton-Event"
_DELIVERY_NAMESPACE = uuid.UUID("9b7e4c1a-2f0d-4d8e-b1a7-5c3e0f6d2a91")

STATES = {"TaskCompleted": "completed", "TaskFailed": "failed", "TaskCancelled": "cancelled",
          "PermissionRequested": "waiting_for_permission", "PullRequestOpened": "pull_request_opened"}


def delivery_id(event_id: str, endpoint: str) -> str:
    """The same for every attempt at one event's notification of one endpoint (receivers dedupe on it)."""
    return uuid.uuid5(_DELIVERY_NAMESPACE, f"{event_id}/{endpoint}").hex


def notification(envelope: Envelope, *, repo: str | None, public_url: str | None) -> dict[str, Any]:
    """The JSON body: what happened to which task, where its work is, why, and a link to its page."""
    data = envelope.data
    return {
        "event_type": envelope.type,
        "event_id": envelope.event_id,
        "task_id": envelope.task_id,
        "state": STATES.get(envelope.type, envelope.type),
        "occurred_at": envelope.occurred_at.isoformat(),
        "repo": repo,
        "branch": data.get("branch"),
        "commit": data.get("commit"),
        "pull_request_url": data.get("url") if envelope.type == "PullRequestOpened" else None,
        "reason": data.get("reason") or data.get("title"),
        "link": task_link(public_url, envelope.task_id),
    }


def task_link(public_url: str | None, task_id: str) -> str | None:
    return f"{public_url.rstrip('/')}/tasks/{task_id}" if public_url else None


def slack_text(body: dict[str, Any]) -> dict[str, str]:
    """Slack's incoming-webhook form: one line of mrkdwn text."""
    words = {"completed": ":white_check_mark: completed", "failed": ":x: failed",
             "cancelled": ":no_entry_sign: cancelled", "waiting_for_permission": ":raised_hand: waits for a permission",
             "pull_request_opened": ":arrow_heading_up: opened a pull request"}
    task = f"<{body['link']}|{body['task_id']}>" if body["link"] else body["task_id"]
    text = f"Baton task {task} {words.get(body['state'], body['state'])}"
    details = [f"repo {body['repo']}" if body["repo"] else None,
               f"branch `{body['branch']}`" if body["branch"] else None,
               body["pull_request_url"], body["reason"]]
    extra = " · ".join(str(d) for d in details if d)
    return {"text": f"{text}: {extra}" if extra else text}


def encode(body: dict[str, Any], *, form: str) -> bytes:
    """The bytes posted (and signed): the JSON body, or its Slack text."""
    return json.dumps(slack_text(body) if form == "slack" else body, sort_keys=True).encode()


def signature(secret: str, payload: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256(secret, payload), as GitHub signs its webhooks."""
    return "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def is_signed_by(secret: str, payload: bytes, header: str | None) -> bool:
    """A receiver's check: `header` is the payload's signature with `secret` (constant time)."""
    return header is not None and hmac.compare_digest(signature(secret, payload), header)
