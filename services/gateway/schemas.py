"""The HTTP API's request and response bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_BYTES = 256 * 1024
"""A prompt's size in UTF-8; bigger material belongs in the repo."""


class TaskCreate(BaseModel):
    """`POST /api/tasks`: what to run, where, with which agent."""

    model_config = ConfigDict(extra="forbid")

    repo: str = Field(min_length=1, max_length=2000, description="git URL or path of the repository")
    prompt: str = Field(
        min_length=1, description=f"the agent's first prompt (at most {MAX_PROMPT_BYTES:,} bytes in UTF-8)"
    )
    agent: str = Field(default="shell", min_length=1, description="a name from GET /api/backends")
    base_branch: str | None = Field(default=None, max_length=250)
    permission_policy: Literal["auto", "ask"] = Field(
        default="auto", description="auto: the agent's permission requests are allowed once; ask: a person answers each")
    provider: str | None = Field(
        default=None, max_length=40, description="where the workspace runs: local or hetzner (default: BATON_PROVIDER)")
    pull_request: bool = Field(
        default=True, description="open a GitHub pull request once pushed (where a token is configured for the repo's host)")
    draft: bool = Field(default=False, description="open the pull request as a draft")

    @field_validator("repo", "prompt", "agent", "base_branch")
    @classmethod
    def _valid_unicode(cls, value: str | None) -> str | None:
        # JSON can carry a lone surrogate ("\ud800"), which no store, log or bus can encode.
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(f"has a lone surrogate (U+{ord(value[error.start]):04X} at character "
                                 f"{error.start}), which is not text: send valid UTF-8") from None
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_fits(cls, value: str) -> str:
        size = len(value.encode("utf-8"))
        if size > MAX_PROMPT_BYTES:
            raise ValueError(f"is {size:,} bytes in UTF-8; the limit is {MAX_PROMPT_BYTES:,}: shorten it "
                             "or put the material in the repo and point the prompt at it")
        return value

    @field_validator("repo", "prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("repo", "base_branch")
    @classmethod
    def _no_option_injection(cls, value: str | None) -> str | None:
        # git would read a leading dash as an option.
        if value is not None and value.strip().startswith("-"):  # " --upload-pack=…" too
            raise ValueError("must not start with '-'")
        return value.strip() if value else value


class FollowUpCreate(BaseModel):
    """`POST /api/tasks/{task_id}/messages`: a follow-up prompt, checked as a task's first prompt is."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, description=f"the next turn's prompt (at most {MAX_PROMPT_BYTES:,} bytes in UTF-8)")

    @field_validator("prompt")
    @classmethod
    def _checked_as_a_first_prompt(cls, value: str) -> str:
        return TaskCreate.model_validate({"repo": "x", "prompt": value}).prompt


class TaskPublic(BaseModel):
    task_id: str
    state: str
    repo: str | None = None
    agent: str | None = None
    prompt: str | None = None
    base_branch: str | None = None
    branch: str | None = None
    commit: str | None = None
    reason: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    last_event: str | None = None
    gaps: list[dict[str, Any]] = Field(default_factory=list)
    """Handoffs that were overdue: `{"expected", "after", "waited_s", "recovered"}`."""
    queue_position: int | None = None
    """While the task waits for a place (BATON_MAX_RUNNING_TASKS): its place in the line, 1 = next."""
    permission_policy: str | None = None
    waiting_for: str | None = None
    """`"person"` while a permission request waits for an answer, else null."""
    cost_eur: float | None = None
    """What the task's cloud servers cost (each server's hourly price times its life), null for a
    task that ran on none."""


class TaskEvents(BaseModel):
    task_id: str
    events: list[dict[str, Any]]
