"""The kinds of coding agent a vm_agent can start, each spoken to over ACP.

A kind is `shell` (Baton's own, always there) or a real agent whose ACP adapter is an npm package,
pinned here and installed by `baton agents install NAME` into `<agents dir>/<name>-<version>/`
(the agents dir is BATON_AGENTS_DIR, default `<data dir>/agents`). A kind declares the environment
variables its agent may receive (its API key, its base URL…: the only ones, besides a small
allowlist in `vm_agent/sandbox.py`, it gets), which of them it needs (any-of groups), variables it
always gets (`fixed_env`), and a `prepare` hook run before it starts that may write config files
into its private home and adjust its environment.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

Prepare = Callable[[Path, dict[str, str]], dict[str, str]]
"""`prepare(home, env) -> env`: `home` is the agent's private home as a host path (write config
files there); `env` is the environment it will start with, where `env["HOME"]` is that same home
as the agent sees it (in the sandbox, `/agent-home`): point variables at it, not at `home`."""


def unchanged(home: Path, env: dict[str, str]) -> dict[str, str]:
    """The default `prepare`: nothing to write, the environment as it is."""
    return env


@dataclass(frozen=True)
class AgentKind:
    name: str
    title: str
    package: str | None
    """The npm package of its ACP adapter (None: Baton's own `shell`)."""
    version: str | None
    """The pinned version `baton agents install` installs."""
    executable: str
    """The adapter's bin name in `node_modules/.bin/` (for `shell`, the Python module run)."""
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    """The environment variables this agent may receive from the vm_agent's environment."""
    requires: tuple[tuple[str, ...], ...] = ()
    """Credentials it needs: each group is satisfied by any one of its variables being set."""
    fixed_env: Mapping[str, str] = field(default_factory=dict)
    """Variables it always gets (not secrets: shown in `baton agents`)."""
    prepare: Prepare = unchanged
    reads_through_client: bool = True
    """Offer it the client's `fs/read_text_file` (with `fs/write_text_file` and terminals). Off for
    an agent that mistakes the client's "no such file" for a failure, and then writes no new file."""

    @property
    def npm_spec(self) -> str | None:
        return None if self.package is None else f"{self.package}@{self.version}"

    def install_dir(self, agents_dir: Path) -> Path | None:
        """Where `baton agents install` puts this kind's adapter (None: nothing to install)."""
        return None if self.package is None else agents_dir / f"{self.name}-{self.version}"

    def command_in(self, agents_dir: Path) -> tuple[str, ...]:
        """The command that starts this agent, its adapter installed under `agents_dir`."""
        place = self.install_dir(agents_dir)
        if place is None:  # Baton's own: a Python module (or, for a test kind, a script).
            run = (self.executable,) if self.executable.endswith(".py") else ("-m", self.executable)
            return (sys.executable, *run, *self.args)
        return (str(place / "node_modules" / ".bin" / self.executable), *self.args)

    def installed(self, agents_dir: Path) -> bool:
        place = self.install_dir(agents_dir)
        return place is None or os.access(place / "node_modules" / ".bin" / self.executable, os.X_OK)

    def missing_credentials(self, environ: Mapping[str, str]) -> tuple[tuple[str, ...], ...]:
        """The groups of `requires` none of whose variables `environ` sets (non-empty)."""
        return tuple(group for group in self.requires if not any(environ.get(name) for name in group))

    def available(self, agents_dir: Path, environ: Mapping[str, str]) -> bool:
        return self.installed(agents_dir) and not self.missing_credentials(environ)

    def environment(self, home: Path, env: Mapping[str, str]) -> dict[str, str]:
        """`env` (already filtered to what this kind may see) with its fixed variables, then
        `prepare`d: what the agent starts with."""
        return self.prepare(home, {**env, **self.fixed_env})


def _claude_prepare(home: Path, env: dict[str, str]) -> dict[str, str]:
    """Start Claude Code in its "default" permission mode: each tool call it wants is then asked
    of Baton over ACP (`session/request_permission`, answered by the task's policy and recorded).
    Left alone it starts in "auto" mode, where its own classifier decides, in extra model calls
    that are billed and that Baton never sees."""
    _merge_json(home / ".claude" / "settings.json", {"permissions": {"defaultMode": "default"}})
    return env


CODEX_CONFIG = """\
# Written by Baton for each run: the model API is the only thing Codex reaches.
model_provider = "baton"
# Baton's sandbox confines Codex (its own bubblewrap cannot nest inside it), and every tool call
# runs unasked: there is no "auto review" of each call by extra, billed model requests.
sandbox_mode = "danger-full-access"
approval_policy = "never"
check_for_update_on_startup = false
{model}
[model_providers.baton]
name = "Baton"
base_url = {base_url}
env_key = {env_key}
wire_api = "responses"

[analytics]
enabled = false

[feedback]
enabled = false

[history]
persistence = "none"

[features]
# No sync of the curated plugins from github.com at start.
plugins = false
# A shell snapshot would store the environment, the API key with it, in a file.
shell_snapshot = false

[shell_environment_policy]
# The commands Codex runs never see its credentials (nor any *KEY*, *SECRET*, *TOKEN*).
ignore_default_excludes = false
exclude = ["OPENAI_API_KEY", "CODEX_API_KEY", "OPENAI_BASE_URL"]
"""
"""Codex's `config.toml`: a model provider speaking the OpenAI Responses API at OPENAI_BASE_URL,
its key read from the variable named by `env_key` (the key itself is never written)."""
OPENAI_API_URL = "https://api.openai.com/v1"


def _codex_prepare(home: Path, env: dict[str, str]) -> dict[str, str]:
    """Give Codex its own CODEX_HOME in the private home, with a `config.toml` from its variables
    (OPENAI_BASE_URL, else OpenAI's; the key in CODEX_API_KEY or OPENAI_API_KEY; CODEX_MODEL, else
    Codex's default): no login state, no telemetry, no update check."""
    env_key = "CODEX_API_KEY" if env.get("CODEX_API_KEY") else "OPENAI_API_KEY"
    model = f"model = {json.dumps(env['CODEX_MODEL'])}" if env.get("CODEX_MODEL") else ""
    config = CODEX_CONFIG.format(model=model, base_url=json.dumps(env.get("OPENAI_BASE_URL") or OPENAI_API_URL),
                                 env_key=json.dumps(env_key))
    codex_home = home / ".codex"
    codex_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(config)
    return {**env, "CODEX_HOME": f"{env['HOME']}/.codex"}


GEMINI_SETTINGS: dict[str, dict[str, object]] = {
    # Nothing but the model API is reached: no usage statistics, telemetry or update checks.
    "privacy": {"usageStatisticsEnabled": False},
    "telemetry": {"enabled": False},
    "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
    # No IDE to look for: it runs headless.
    "ide": {"enabled": False},
}
"""What Gemini CLI is told in its private home's `~/.gemini/settings.json`. The workspace stays an
untrusted folder (so the repo's own `.gemini/settings.json`, MCP servers and `.env` are ignored); there
Gemini CLI refuses "allow always" answers, which Baton's policy (allow once) never gives."""


def _gemini_prepare(home: Path, env: dict[str, str]) -> dict[str, str]:
    """Write Gemini CLI's settings into its private home, with the login its credentials call for."""
    vertex = env.get("GOOGLE_GENAI_USE_VERTEXAI", "").lower() in ("1", "true") or not env.get("GEMINI_API_KEY")
    auth = {"security": {"auth": {"selectedType": "vertex-ai" if vertex else "gemini-api-key"}}}
    _merge_json(home / ".gemini" / "settings.json", {**GEMINI_SETTINGS, **auth})
    return env


def _merge_json(path: Path, wanted: Mapping[str, Mapping[str, object]]) -> None:
    """Set `wanted`'s sections' keys in the JSON object at `path`, keeping what else it holds."""
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        current = {}
    current = current if isinstance(current, dict) else {}
    for section, values in wanted.items():
        existing = current.get(section)
        current[section] = {**(existing if isinstance(existing, dict) else {}), **values}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2))


OPENCODE_CONFIG: dict[str, object] = {
    # No git snapshot of the whole workspace in its home at every step (for its own undo): Baton
    # commits the workspace, and a big repo would be copied again and again.
    "snapshot": False,
}
"""OpenCode's global config (`~/.config/opencode/opencode.json`), below the repo's and the user's."""
OPENCODE_PLUGIN_PACKAGE = {"@opencode-ai/plugin": "1.18.33"}
"""What OpenCode npm-installs into its config dir at every start unless that dir holds it already."""


def _opencode_prepare(home: Path, env: dict[str, str]) -> dict[str, str]:
    """Give OpenCode its model (OPENCODE_MODEL, e.g. `anthropic/claude-sonnet-4-5`) and no snapshots
    in its global config, which OPENCODE_CONFIG_CONTENT (the user's own providers, if any)
    overrides; mark its config dir's plugin package installed, so it starts without the npm
    registry; and read ANTHROPIC_BASE_URL as Claude Code does (the AI SDK wants the `/v1` in it)."""
    config_dir = home / ".config" / "opencode"
    _mark_opencode_plugin_installed(config_dir)
    model = {"model": env["OPENCODE_MODEL"]} if env.get("OPENCODE_MODEL") else {}
    (config_dir / "opencode.json").write_text(json.dumps({**OPENCODE_CONFIG, **model}))
    base_url = env.get("ANTHROPIC_BASE_URL", "").rstrip("/")
    if base_url and not base_url.endswith("/v1"):
        env = {**env, "ANTHROPIC_BASE_URL": f"{base_url}/v1"}
    return env


def _mark_opencode_plugin_installed(config_dir: Path) -> None:
    """OpenCode skips its background `npm install @opencode-ai/plugin` when the dir's package.json
    and package-lock.json both list it and `node_modules/` exists; nothing in Baton needs it."""
    (config_dir / "node_modules").mkdir(mode=0o700, parents=True, exist_ok=True)
    (config_dir / "package.json").write_text(json.dumps({"dependencies": OPENCODE_PLUGIN_PACKAGE}))
    lock = {"lockfileVersion": 3, "packages": {"": {"dependencies": OPENCODE_PLUGIN_PACKAGE}}}
    (config_dir / "package-lock.json").write_text(json.dumps(lock))


AGENT_KINDS: dict[str, AgentKind] = {
    kind.name: kind
    for kind in (
        AgentKind("shell", "Shell (runs the prompt as a bash script)", None, None, "vm_agent.agents.shell"),
        AgentKind(
            "claude", "Claude Code (claude-agent-acp)",
            "@agentclientprotocol/claude-agent-acp", "0.101.0", "claude-agent-acp",
            env=("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "ANTHROPIC_MODEL",
                 "CLAUDE_CODE_OAUTH_TOKEN", "CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX"),
            requires=(("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN"),),
            fixed_env={
                # Run as root, Claude Code refuses some modes unless told it is in a sandbox (it is).
                "IS_SANDBOX": "1",
                # No telemetry, error reports, update checks or feature flags from api.anthropic.com
                # (it calls them whatever ANTHROPIC_BASE_URL says): only the model API is reached.
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                # No billed model call after each turn to guess the user's next prompt.
                "CLAUDE_CODE_ENABLE_PROMPT_SUGGESTION": "false",
            },
            prepare=_claude_prepare,
        ),
        AgentKind(
            "codex", "Codex (codex-acp)",
            "@agentclientprotocol/codex-acp", "2.6.0", "codex-acp",
            env=("OPENAI_API_KEY", "OPENAI_BASE_URL", "CODEX_API_KEY", "CODEX_MODEL"),
            requires=(("OPENAI_API_KEY", "CODEX_API_KEY"),),
            fixed_env={
                # The adapter's own modes override config.toml: "agent-full-access" is the one
                # matching it (no approvals, no sandbox of its own: Baton's confines it).
                "INITIAL_AGENT_MODE": "agent-full-access",
                # No ChatGPT browser login offered: it runs headless, on its API key.
                "NO_BROWSER": "1",
            },
            prepare=_codex_prepare,
        ),
        AgentKind(
            "gemini", "Gemini CLI (gemini --acp)",
            "@google/gemini-cli", "0.61.0", "gemini", args=("--acp",),
            env=("GEMINI_API_KEY", "GOOGLE_GEMINI_BASE_URL", "GEMINI_MODEL", "GOOGLE_API_KEY",
                 "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION",
                 "GOOGLE_VERTEX_BASE_URL"),
            requires=(("GEMINI_API_KEY", "GOOGLE_API_KEY"),),
            # One process, not a launcher that re-runs itself with a bigger heap (and ignores SIGTERM):
            # it starts a second sooner and stops when told.
            fixed_env={"GEMINI_CLI_NO_RELAUNCH": "true"},
            prepare=_gemini_prepare,
            # Gemini CLI 0.61 takes an ACP error for a missing file as a failure (the ACP SDK rejects
            # with a bare object, not an Error it can classify), so it writes no new file: it reads
            # the workspace itself, in the sandbox, and writes through Baton.
            reads_through_client=False,
        ),
        AgentKind(
            "opencode", "OpenCode (opencode acp)",
            "opencode-ai", "1.18.33", "opencode", args=("acp",),
            env=("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL",
                 "OPENCODE_API_KEY", "OPENCODE_MODEL", "OPENCODE_CONFIG_CONTENT"),
            requires=(("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "OPENCODE_API_KEY"),),
            fixed_env={
                # Only the model API is reached: no self-update, no models.dev catalogue (the one
                # built into the pinned version serves), no language-server downloads.
                "OPENCODE_DISABLE_AUTOUPDATE": "1",
                "OPENCODE_DISABLE_MODELS_FETCH": "1",
                "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
            },
            prepare=_opencode_prepare,
        ),
    )
}

TEST_AGENT_KINDS = "BATON_TEST_AGENT_KINDS"
"""TEST ONLY, off by default: `BATON_TEST_AGENT_KINDS=scripted` (where `baton up` runs) adds the kind
`scripted`, tests/support/scripted_acp_agent.py, a real ACP agent whose prompt is its script (tool
calls, diffs, plan, permissions, usage, with no model behind it). Never set it in an install."""


def _test_kinds(environ: Mapping[str, str]) -> dict[str, AgentKind]:
    if "scripted" not in environ.get(TEST_AGENT_KINDS, "").split(","):
        return {}
    script = Path(__file__).resolve().parents[1] / "tests" / "support" / "scripted_acp_agent.py"
    return {"scripted": AgentKind("scripted", "TEST ONLY: scripted ACP agent", None, None, str(script))}


AGENT_KINDS.update(_test_kinds(os.environ))

Backend = AgentKind
"""The former name of a kind (still used by the vm_agent's runner)."""
BACKENDS = AGENT_KINDS


def available_backends(agents_dir: Path, environ: Mapping[str, str] = os.environ) -> dict[str, AgentKind]:
    """The kinds that can run here: installed under `agents_dir`, their credentials in `environ`."""
    return {name: kind for name, kind in AGENT_KINDS.items() if kind.available(agents_dir, environ)}


def refusal(name: str, agents_dir: Path, environ: Mapping[str, str]) -> str | None:
    """Why a task for agent `name` cannot run here, naming the command that fixes it; None if it can."""
    kind = AGENT_KINDS.get(name)
    if kind is None:
        return f"unknown agent {name!r}; the agent kinds are: {', '.join(sorted(AGENT_KINDS))}"
    if not kind.installed(agents_dir):
        return f"agent {name!r} is not installed: run `baton agents install {name}`"
    missing = kind.missing_credentials(environ)
    if missing:
        needs = "; ".join(" or ".join(group) for group in missing)
        return (f"agent {name!r} has no credentials: it needs {needs}; run `baton secrets set "
                f"{missing[0][0]}` (or set it where `baton up` runs)")
    return None
