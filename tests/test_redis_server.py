"""The embedded Redis is safe by default: loopback only, protected mode, persistence on."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import redis

from wikipulse.devtools.redis_server import RedisServer, find_binary


def test_embedded_redis_listens_on_loopback_only_with_protected_mode_and_aof(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("protected-mode")["protected-mode"] == "yes"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        client.close()
        assert server.process is not None
        listening = [c.laddr for c in psutil.Process(server.process.pid).net_connections() if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
    finally:
        server.stop()


def test_a_chosen_redis_server_binary_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    chosen = tmp_path / "redis-server"
    chosen.write_text("#!/bin/sh\n")
    monkeypatch.setenv("WIKIPULSE_REDIS_SERVER", str(chosen))
    assert find_binary() == str(chosen)
    monkeypatch.delenv("WIKIPULSE_REDIS_SERVER")
    assert find_binary() != str(chosen)


def test_a_cluster_node_whose_bus_port_was_taken_meanwhile_starts_on_another(tmp_path: Path) -> None:
    """Seen in CI: a bus port free_port() found was taken by the time the node bound it, and the cluster failed."""
    import socket

    from wikipulse.devtools.redis_server import LocalCluster

    cluster = LocalCluster(tmp_path, masters=3)
    taken = int(cluster.nodes[0].extra[cluster.nodes[0].extra.index("--cluster-port") + 1])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with cluster:
            assert cluster.nodes[0].extra[cluster.nodes[0].extra.index("--cluster-port") + 1] != str(taken)
            with redis.cluster.RedisCluster.from_url(cluster.url) as client:
                client.set("k", "v")
                assert client.get("k") == b"v"
