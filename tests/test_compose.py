"""No Docker engine runs here: check docker-compose.yml against the scripts and the settings instead."""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from wikipulse.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
ENV_NAMES = {f.metadata["env"] for f in fields(Settings)}


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_services_and_their_commands() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "publisher", "subscriber", "dash", "archiver", "clickhouse"}
    for name, script in (
        ("publisher", "publisher.py"),
        ("subscriber", "subscriber.py"),
        ("archiver", "archiver.py"),
        ("dash", "dash_app.py"),
    ):
        service = services[name]
        assert service["command"] == ["python", script]
        assert (ROOT / script).is_file()
        assert service["build"] == "."
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_every_environment_variable_is_a_setting() -> None:
    for name, service in compose()["services"].items():
        if name not in ("redis", "clickhouse"):
            assert set(service["environment"]) <= ENV_NAMES, name


def test_the_archiver_writes_to_the_clickhouse_server_kept_in_a_volume() -> None:
    data = compose()
    archiver, clickhouse = data["services"]["archiver"], data["services"]["clickhouse"]
    assert (
        archiver["environment"]["CLICKHOUSE_URL"].startswith("http://") and "@clickhouse:8123" in archiver["environment"]["CLICKHOUSE_URL"]
    )
    assert archiver["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    assert clickhouse["image"].startswith("clickhouse/clickhouse-server:")
    assert clickhouse["volumes"] == ["clickhouse-data:/var/lib/clickhouse"] and "clickhouse-data" in data["volumes"]


def test_redis_is_persistent_and_healthchecked() -> None:
    data = compose()
    redis = data["services"]["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["volumes"] == ["redis-data:/data"] and "redis-data" in data["volumes"]
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]


def test_dashboard_published_on_loopback_only() -> None:
    dash = compose()["services"]["dash"]
    assert dash["ports"] == ["127.0.0.1:8050:8050"]
    assert dash["environment"]["DASH_PORT"] == "8050"
    assert "healthcheck" in dash


def test_the_dashboard_health_check_asks_readyz_which_can_fail() -> None:
    """Any path of the page answers 200 with its HTML: the check must ask the route that answers 503 when the
    dashboard cannot serve (tests/test_operations.py: through a Redis outage)."""
    from wikipulse.dashboard.operations import READY_PATH

    test = compose()["services"]["dash"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"] and f"http://127.0.0.1:8050{READY_PATH}'" in test[-1]


def test_dockerfile_copies_what_the_services_run() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for path in ("wikipulse", "publisher.py", "subscriber.py", "archiver.py", "dash_app.py", "Pipfile.lock"):
        assert path in dockerfile
    assert "--deploy" in dockerfile and "USER nobody" in dockerfile


def test_the_cluster_override_runs_three_persistent_masters_and_points_every_stage_at_them() -> None:
    cluster = yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())
    services = cluster["services"]
    nodes = [services[f"redis-{i}"] for i in (1, 2, 3)]
    for node in nodes:
        assert node["command"][node["command"].index("--cluster-enabled") + 1] == "yes"
        assert node["command"][node["command"].index("--appendonly") + 1] == "yes"
        assert node["volumes"][0].split(":")[0] in cluster["volumes"]
    assert "--cluster create" in services["redis-cluster-init"]["command"][0]
    for name in ("publisher", "subscriber", "archiver", "dash"):
        env = services[name]["environment"]
        assert env["REDIS_URL"].startswith("redis://redis-") and env["SHARDS"] == "3" and set(env) <= ENV_NAMES
        assert services[name]["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully"


def test_the_lock_matches_the_pipfile_as_docker_deploy_requires() -> None:
    """`pipenv install --deploy` (the Dockerfile) refuses a lock whose recorded Pipfile hash is stale; the hash is
    pipenv's own (plette): SHA-256 of the Pipfile's sources, requires and both package tables as sorted, compact JSON."""
    pipfile = tomllib.loads((ROOT / "Pipfile").read_text())
    lock = json.loads((ROOT / "Pipfile.lock").read_text())
    data = {
        "_meta": {"sources": pipfile["source"], "requires": pipfile.get("requires", {})},
        "default": pipfile.get("packages", {}),
        "develop": pipfile.get("dev-packages", {}),
    }
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert lock["_meta"]["hash"]["sha256"] == digest, "Pipfile.lock is stale: run `pipenv lock`"
    for section, table in (("default", "packages"), ("develop", "dev-packages")):
        assert {name.lower() for name in pipfile[table]} <= set(lock[section]), section
    # The benchmark's baseline is a dev package only: the image does not carry it.
    assert "aiohttp-sse-client" not in lock["default"] and "aiohttp-sse-client" in lock["develop"]
