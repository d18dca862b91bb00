"""Agent kinds (vm_agent/backends.py), their credentials' store, and the warm pool's mix of kinds."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from services.provisioner.members import VmAgentProcess
from services.provisioner.vm_agents import VmAgentPool
from services.runtime.agent_secrets import AgentSecrets, UnknownSecretName, agent_environ
from services.runtime.settings import Settings
from vm_agent.backends import AGENT_KINDS, refusal
from vm_agent.sandbox import Sandbox

SECRET_VALUE = "sk-ant-unit-0123456789"


def fake_install(agents_dir: Path, name: str) -> None:
    """An adapter's bin where `baton agents install` puts it (what `installed` looks for)."""
    kind = AGENT_KINDS[name]
    place = kind.install_dir(agents_dir)
    assert place is not None
    binary = place / "node_modules" / ".bin" / kind.executable
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)


def test_every_real_kind_runs_its_pinned_adapter_from_the_agents_dir(tmp_path: Path):
    expected = {"claude": ("claude-agent-acp",), "codex": ("codex-acp",), "gemini": ("gemini", "--acp"),
                "opencode": ("opencode", "acp")}
    for name, (executable, *args) in expected.items():
        kind = AGENT_KINDS[name]
        assert kind.version and kind.package
        command = kind.command_in(tmp_path)
        assert command == (str(tmp_path / f"{name}-{kind.version}" / "node_modules" / ".bin" / executable), *args)
    assert AGENT_KINDS["shell"].installed(tmp_path) and not AGENT_KINDS["shell"].requires


def test_a_refusal_names_the_command_that_fixes_it(tmp_path: Path):
    assert refusal("shell", tmp_path, {}) is None
    assert refusal("codex", tmp_path, {}) == "agent 'codex' is not installed: run `baton agents install codex`"
    fake_install(tmp_path, "codex")
    missing = refusal("codex", tmp_path, {"ANTHROPIC_API_KEY": "x"})
    assert missing is not None and "OPENAI_API_KEY" in missing and "`baton secrets set OPENAI_API_KEY`" in missing
    assert refusal("codex", tmp_path, {"OPENAI_API_KEY": "x"}) is None
    assert refusal("codex", tmp_path, {"OPENAI_API_KEY": ""}) is not None, "an empty value is no credential"
    unknown = refusal("cursor", tmp_path, {})
    assert unknown is not None and all(name in unknown for name in AGENT_KINDS)


def test_any_one_variable_of_a_group_satisfies_it():
    claude = AGENT_KINDS["claude"]
    assert claude.missing_credentials({}) == (("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN"),)
    assert claude.missing_credentials({"CLAUDE_CODE_OAUTH_TOKEN": "t"}) == ()


def test_an_agent_gets_its_own_kinds_credentials_and_nothing_else_of_batons(tmp_path: Path):
    environ = {"ANTHROPIC_API_KEY": "sk-ant", "OPENAI_API_KEY": "sk-openai", "GEMINI_API_KEY": "g",
               "BATON_SECRET": "install", "BATON_VM_AGENT_TOKEN": "tok", "BATON_DATA_DIR": "/d",
               "PATH": "/usr/bin", "AWS_SECRET_ACCESS_KEY": "aws"}
    for name, own, others in (("claude", "ANTHROPIC_API_KEY", {"OPENAI_API_KEY", "GEMINI_API_KEY"}),
                              ("codex", "OPENAI_API_KEY", {"ANTHROPIC_API_KEY", "GEMINI_API_KEY"})):
        env = kind_env(name, tmp_path, environ)
        assert env[own] == environ[own]
        assert not others & env.keys(), env
        assert "AWS_SECRET_ACCESS_KEY" not in env
        assert {n for n in env if n.startswith("BATON_")} <= {"BATON_DATA_DIR"}, "only the process mark"
    assert kind_env("claude", tmp_path, environ)["IS_SANDBOX"] == "1"


def kind_env(name: str, home: Path, environ: dict[str, str]) -> dict[str, str]:
    """What agent `name` starts with (unconfined: the sandbox's own test shows bwrap keeps it)."""
    kind = AGENT_KINDS[name]
    launch = Sandbox("none").launch(kind.command_in(home), workspace=home, home=home / name,
                                    env_names=kind.env, environ=environ)
    return kind.environment(home / name, launch.env)


def test_secrets_are_stored_encrypted_private_and_bound_to_their_name(tmp_path: Path):
    store = AgentSecrets(tmp_path / "agent-secrets", "install-secret")
    store.set("ANTHROPIC_API_KEY", SECRET_VALUE)
    stored = tmp_path / "agent-secrets" / "ANTHROPIC_API_KEY"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert SECRET_VALUE.encode() not in stored.read_bytes()
    assert store.names() == ["ANTHROPIC_API_KEY"] and store.values() == {"ANTHROPIC_API_KEY": SECRET_VALUE}
    # Another install's key opens nothing; a file renamed to another name does not open either.
    assert AgentSecrets(tmp_path / "agent-secrets", "another-install").values() == {}
    os.rename(stored, tmp_path / "agent-secrets" / "OPENAI_API_KEY")
    assert store.values() == {}
    assert store.unset("OPENAI_API_KEY") and store.names() == []


def test_only_variables_an_agent_declares_can_be_stored(tmp_path: Path):
    store = AgentSecrets(tmp_path, "install-secret")
    for name in ("BATON_SECRET", "PATH", "LD_PRELOAD", "../x"):
        with pytest.raises(UnknownSecretName):
            store.set(name, "v")


def test_the_environment_where_baton_runs_wins_over_the_store(tmp_path: Path):
    settings = Settings(data_dir=tmp_path, secret="s")
    AgentSecrets.of(settings).set("OPENAI_API_KEY", "stored")
    AgentSecrets.of(settings).set("GEMINI_API_KEY", "stored-gemini")
    merged = agent_environ(settings, {"OPENAI_API_KEY": "from-env", "HOME": "/root"})
    assert merged == {"OPENAI_API_KEY": "from-env", "GEMINI_API_KEY": "stored-gemini"}


def test_the_warm_pool_keeps_the_kinds_asked_for_that_can_run_here(tmp_path: Path, monkeypatch):
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(data_dir=tmp_path / "data", agents_dir=tmp_path / "agents", secret="s",
                        warm_agents="shell=2,claude=1,codex=1")
    assert settings.warm_mix == {"shell": 2, "claude": 1, "codex": 1}
    assert Settings(data_dir=tmp_path, warm_pool=4).warm_mix == {"shell": 4}
    pool = VmAgentPool(settings, mix=settings.warm_mix)
    # claude is installed and has its key; codex is not installed: not warmed.
    fake_install(tmp_path / "agents", "claude")
    AgentSecrets.of(settings).set("ANTHROPIC_API_KEY", "k")
    assert sorted(pool._shortfall()) == ["claude", "shell", "shell"]
    pool._waiting.append("codex")  # A take for a kind that cannot run is served by a shell member.
    assert sorted(pool._shortfall()) == ["claude", "shell", "shell", "shell"]


def test_a_warm_member_started_before_a_secret_changed_is_replaced_not_assigned(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    settings = Settings(data_dir=tmp_path, secret="s")
    pool = VmAgentPool(settings, mix={"shell": 2})
    before = pool._credentials_version(agent_environ(settings))
    stale, fresh = (subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(2))
    try:
        pool._ready = [VmAgentProcess("http://stale", stale.pid, tmp_path, "shell", None, before)]
        AgentSecrets.of(settings).set("OPENAI_API_KEY", "new")
        now = pool._credentials_version(agent_environ(settings))
        assert now != before and "new" not in now
        pool._ready.append(VmAgentProcess("http://fresh", fresh.pid, tmp_path, "shell", None, now))
        assert [member.url for member in pool._fresh_members()] == ["http://fresh"]
        assert stale.wait(10) is not None, "the stale member is stopped"
    finally:
        for process in (stale, fresh):
            process.kill()
            process.wait()


def test_warm_agents_says_what_it_expects():
    with pytest.raises(ValueError, match="KIND=COUNT"):
        Settings(warm_agents="shell:3")


def test_batons_own_github_token_can_be_stored_and_is_never_an_agents(tmp_path: Path):
    from services.pull_requests.github import github_token

    settings = Settings(data_dir=tmp_path, secret="s")
    AgentSecrets.of(settings).set("GITHUB_TOKEN", "ghp-stored")
    # The pull-requests service and the provisioner's push credential find it…
    assert github_token(settings) == "ghp-stored"
    assert github_token(settings.model_copy(update={"github_token": "ghp-env"})) == "ghp-env"
    # …but no vm_agent (so no agent) is handed it.
    assert "GITHUB_TOKEN" not in agent_environ(settings, {"GITHUB_TOKEN": "ghp-env-too"})


def test_no_vm_agent_gets_the_installs_secrets(tmp_path: Path, monkeypatch):
    from services.runtime.settings import secret_setting_names

    # Every setting that is never shown is a secret no vm_agent's environment carries.
    assert {"BATON_SECRET", "BATON_DATABASE_URL", "BATON_HCLOUD_TOKEN", "BATON_GITHUB_TOKEN",
            "BATON_GITHUB_WEBHOOK_SECRET", "BATON_NOTIFY_WEBHOOKS", "BATON_API_TOKEN"} <= secret_setting_names()
    assert "BATON_NATS_URL" not in secret_setting_names()
