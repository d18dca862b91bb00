"""The vm_agent artifact route: only a workspace's unexpired credential, only the running version."""

from __future__ import annotations

import io
import tarfile
import time
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.gateway.routes import vm_agent_dist
from services.provisioner.cloud_init import (
    BootPlan, build_user_data, check_dist_credential, dist_credential, vm_agent_artifact,
)
from services.runtime.settings import Settings

SECRET = "dist-test-secret"


@pytest.fixture
def client(tmp_path) -> TestClient:
    app = FastAPI()
    app.include_router(vm_agent_dist.router)
    app.state.gateway = SimpleNamespace(settings=Settings(data_dir=tmp_path, secret=SECRET))
    return TestClient(app)


def url() -> str:
    return f"/api/vm-agent/dist/{vm_agent_artifact().version}.tar.gz"


def test_a_workspace_credential_fetches_the_running_vm_agent(client):
    credential = dist_credential(SECRET, "hetzner-0123456789abcdef", time.time() + 600)
    response = client.get(url(), headers={"Authorization": f"Bearer {credential}"})
    assert response.status_code == 200
    names = tarfile.open(fileobj=io.BytesIO(response.content)).getnames()
    assert {"vm_agent/main.py", "events/catalog.py", "services/runtime/bus.py", "requirements.txt"} <= set(names)
    assert not any("gateway" in name or "provisioner" in name for name in names)  # only what a vm_agent runs


@pytest.mark.parametrize("credential", [
    dist_credential(SECRET, "hetzner-0123456789abcdef", time.time() - 1),
    dist_credential("another install's secret", "hetzner-0123456789abcdef", time.time() + 600),
    "hetzner-0123456789abcdef.99999999999.forged",
    "",
], ids=["expired", "another-install", "forged", "none"])
def test_an_expired_forged_or_missing_credential_is_refused(client, credential):
    assert client.get(url(), headers={"Authorization": f"Bearer {credential}"}).status_code == 401


def test_only_the_version_the_control_plane_runs_is_served(client):
    credential = dist_credential(SECRET, "hetzner-0123456789abcdef", time.time() + 600)
    response = client.get("/api/vm-agent/dist/0.0.1+000000000000.tar.gz",
                          headers={"Authorization": f"Bearer {credential}"})
    assert response.status_code == 404 and vm_agent_artifact().version in response.text


def test_a_credential_names_its_workspace_and_expires():
    credential = dist_credential(SECRET, "hetzner-ab", 1000.0)
    assert check_dist_credential(SECRET, credential, now=999.0) == "hetzner-ab"
    assert check_dist_credential(SECRET, credential, now=1000.0) is None


def test_user_data_carries_the_calls_home_environment_quoted_and_fits_hetzners_limit():
    plan = BootPlan(workspace_id="hetzner-ab", gateway_url="https://baton.example.com/", version="1.0+abc",
                    dist_credential="cred", nats_url="tls://nats.example.com:4222",
                    vm_agent_env={"BATON_NATS_CREDS_TEXT": "line one\n'quoted' $HOME"})
    script = build_user_data(plan)
    assert script.startswith("#!/bin/sh\n")
    assert "https://baton.example.com/api/vm-agent/dist/1.0+abc.tar.gz" in script
    assert "BATON_NATS_URL=tls://nats.example.com:4222" in script
    assert "BATON_NATS_CREDS_TEXT='line one\n'\"'\"'quoted'\"'\"' $HOME'" in script  # shell-quoted, not expanded
    assert "-m vm_agent --state-dir /var/lib/baton/vm_agent >" in script  # no port option: it connects out
    with pytest.raises(ValueError, match="32768"):
        build_user_data(BootPlan(**{**plan.__dict__, "vm_agent_env": {"BIG": "x" * 40_000}}))


def test_every_service_of_one_baton_up_run_serves_the_artifact_pinned_first(tmp_path, monkeypatch):
    from services.provisioner.cloud_init import pinned_artifact

    monkeypatch.setenv("BATON_SUPERVISOR_PID", "4242")
    # Another service of this run pinned its build first (the code on disk changed since): that one counts.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "vm_agent-4242.artifact").write_bytes(b"0.1.0+pinnedfirst\n" + b"tarball bytes")
    (tmp_path / "run" / "vm_agent-1.artifact").write_bytes(b"an earlier run's\n")
    assert pinned_artifact(tmp_path).version == "0.1.0+pinnedfirst"
    assert pinned_artifact(tmp_path).data == b"tarball bytes"
    # With no pin yet, the first caller pins its own build and clears earlier runs' pins.
    (tmp_path / "run" / "vm_agent-4242.artifact").unlink()
    assert pinned_artifact(tmp_path) == vm_agent_artifact()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["vm_agent-4242.artifact"]
