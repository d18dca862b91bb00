"""Replicas: BATON_REPLICA, a cluster's URL list, and the processes `baton up --replicas N` starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.cli.supervisor import SERVICE_NAMES, Supervisor
from services.provisioner.vm_agents import VmAgentPool
from services.runtime.settings import Settings, nats_server_urls


def test_a_replica_is_its_index_and_count_and_one_of_one_by_default():
    assert Settings().replica == (0, 1)
    assert Settings(replica="1/3").replica == (1, 3)


@pytest.mark.parametrize("wrong", ["3/3", "1", "a/b", "-1/2"])
def test_a_replica_outside_its_count_is_refused_saying_the_form(wrong: str):
    with pytest.raises(ValidationError, match="INDEX/COUNT|counts from 0"):
        Settings(replica=wrong)


def test_a_comma_separated_nats_url_is_the_list_of_a_clusters_servers():
    assert nats_server_urls("nats://a:4222, nats://b:4222,") == ["nats://a:4222", "nats://b:4222"]
    assert nats_server_urls("nats://a:4222") == ["nats://a:4222"]


def test_replicas_are_each_service_n_times_with_their_index_and_gateways_on_consecutive_ports(tmp_path: Path):
    supervisor = Supervisor(Settings(data_dir=tmp_path, port=9000), replicas=3)
    gateways = supervisor._replicas_of("gateway")
    assert [child.name for child in gateways] == ["gateway-0", "gateway-1", "gateway-2"]
    assert [child.own_env for child in gateways] == [
        {"BATON_REPLICA": f"{i}/3", "BATON_PORT": str(9000 + i)} for i in range(3)]
    assert [child.log_path.name for child in gateways] == ["gateway-0.log", "gateway-1.log", "gateway-2.log"]
    for name in SERVICE_NAMES:
        assert [child.argv[-1] for child in supervisor._replicas_of(name)] == [name] * 3


def test_without_replicas_each_service_is_one_process_named_as_before(tmp_path: Path):
    children = Supervisor(Settings(data_dir=tmp_path))._replicas_of("task-runner")
    assert [(c.name, c.own_env, c.pid_path.name) for c in children] == [("task-runner", {}, "task-runner.pid")]


def test_provisioner_replicas_sharing_a_data_dir_keep_their_warm_pools_apart(tmp_path: Path):
    pools = [VmAgentPool(Settings(data_dir=tmp_path, replica=f"{i}/2"), mix={}) for i in range(2)]
    assert [pool.pool_dir.name for pool in pools] == ["pool-0", "pool-1"]
    assert [pool.pool_workspaces.name for pool in pools] == [".pool-0", ".pool-1"]
    # Alone, as before.
    assert VmAgentPool(Settings(data_dir=tmp_path), mix={}).pool_dir.name == "pool"
