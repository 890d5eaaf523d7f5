"""Run a private RabbitMQ node with the MQTT plugin (the twin of broker.py and pgserver.py).

Issue 13 item 4: a clustered broker that stores QoS 1 messages durably before it
acknowledges them. This starts one node of it for tests and benchmarks: persistent MQTT
sessions (clean_session=False) live in quorum queues (``mqtt.durable_queue_type =
quorum``), as docs/BROKERS.md tells a site to run it. ``firmware_sim.rabbitmq_cluster``
joins several of these nodes (``ClusterShare``: one epmd, cookie and set of accounts)
into a cluster.

Everything of the node is in a new temp directory and on free loopback ports, so it
never meets the machine's own RabbitMQ (Debian's ``rabbit@…`` on 5672/25672, if any):
that node is neither connected to nor stopped nor reconfigured, and its files are not
read. In particular:

* ``RABBITMQ_CONF_ENV_FILE`` points at an empty file of ours, so /etc/rabbitmq's
  rabbitmq-env.conf (its NODENAME and ERL_FLAGS) does not apply; the config file,
  advanced config, enabled-plugins file (``rabbitmq_mqtt`` only: no management or
  Prometheus listener), Mnesia and log directories are ours too;
* ``HOME`` is the temp directory, where we write the node's own Erlang cookie, so root's
  ``~/.erlang.cookie`` (or the rabbitmq user's) is neither read nor created;
* the Erlang port mapper is a private ``epmd`` on a free port (``ERL_EPMD_PORT``) that we
  start in the foreground and stop with the node: the system's epmd on 4369 is not
  touched, and on a machine without one no ``epmd -daemon`` is left behind
  (``-start_epmd false`` makes the node and ``rabbitmqctl`` fail rather than spawn one);
* the node name is unique (``panicd-test-<pid>-<n>@localhost``), the AMQP, MQTT and
  distribution listeners are bound to 127.0.0.1.

Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that ``su``\\ s to the rabbitmq user
and writes to /var/log/rabbitmq; the node here is started with the real script,
``/usr/lib/rabbitmq/bin/rabbitmq-server``, as whoever runs the tests (root in CI is
fine: the node only touches its temp directory). ``scripts/ensure-rabbitmq.sh`` installs
the package without starting its service.

Accounts come from a definitions file loaded at boot: ``panicd`` (full rights on the
default vhost, password ``panicd_password``, random if not given) and ``buttons``, the
account anonymous MQTT clients get (``mqtt.allow_anonymous`` with
``mqtt.default_user``), which may only publish uplinks and read command topics: the
RabbitMQ form of config/mosquitto.acl's split (docs/BROKERS.md). Measured on this 2-core
machine: a first start takes about 11 s (the MQTT plugin alone waits about 5 s for
cluster peers before it elects its own Raft leader), a restart about 5 s, a stop 2 s.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

SBIN = Path("/usr/lib/rabbitmq/bin")
INSTALL_HINT = "run scripts/ensure-rabbitmq.sh (Debian package `rabbitmq-server`)"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
PANICD_USER = "panicd"
BUTTONS_USER = "buttons"
# What config/mosquitto.conf sets for the embedded broker, in RabbitMQ's terms: a
# persistent session outlives 7 days away (persistent_client_expiration 7d; RabbitMQ's
# own default is 24 h), up to 1000 unacknowledged messages go out to one subscriber
# (max_inflight_messages 1000; RabbitMQ's default prefetch is 10).
SESSION_TTL_MS = 7 * 24 * 3600 * 1000
PREFETCH = 1000
# The buttons' rights, as AMQP resource and topic permissions: MQTT topics become
# routing keys on amq.topic with "/" and "." swapped (panicd/v1/dev/X/up ->
# panicd.v1.dev.X.up), subscriptions are queues named mqtt-subscription-<client id>qos<n>.
BUTTON_PERMISSIONS = {
    "configure": r"^mqtt-subscription-.*$",
    "write": r"^(amq\.topic|mqtt-subscription-.*)$",
    "read": r"^(amq\.topic|mqtt-subscription-.*)$",
}
BUTTON_TOPIC_PERMISSIONS = {
    "exchange": "amq.topic",
    "write": r"^panicd\.v1\.(dev|gw)\.[^.]+\.up$",
    "read": r"^panicd\.v1\.(dev|gw)\.[^.]+\.cmd$",
}
_names = itertools.count()


class RabbitMQError(RuntimeError):
    """The private RabbitMQ could not be found, started or stopped."""


class RabbitMQNotInstalledError(RabbitMQError):
    """The RabbitMQ server (or Erlang's epmd) is not on this machine."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    ports: list[int] = []
    sockets: list[socket.socket] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)  # held open until all are chosen: no port twice
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
    finally:
        for sock in sockets:
            sock.close()
    return ports


def find_sbin(root: Path = SBIN) -> Path:
    """The directory of the real rabbitmq-server and rabbitmqctl scripts."""
    if (root / "rabbitmq-server").exists() and (root / "rabbitmqctl").exists():
        return root
    raise RabbitMQNotInstalledError(f"RabbitMQ is not installed (no {root}/rabbitmq-server): "
                                    f"{INSTALL_HINT}")


def find_epmd() -> str:
    """Erlang's port mapper daemon (Debian: /usr/bin/epmd, package erlang-base)."""
    found = shutil.which("epmd")
    if found is None:
        candidates = sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))
        if not candidates:
            raise RabbitMQNotInstalledError(f"Erlang's epmd is missing: {INSTALL_HINT}")
        found = str(candidates[-1])
    return found


def wait_listening(ports: list[int], process: subprocess.Popen[bytes], name: str,
                   timeout_s: float, tail: Callable[[], str] = str) -> None:
    """Wait until every port answers on 127.0.0.1; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    waiting = list(ports)
    while waiting:
        if process.poll() is not None:
            raise RabbitMQError(f"{name} exited with {process.returncode}: {tail()}")
        if time.monotonic() > deadline:
            raise RabbitMQError(f"{name} did not listen on {waiting} in {timeout_s} s: {tail()}")
        try:
            with socket.create_connection(("127.0.0.1", waiting[0]), timeout=0.2):
                waiting.pop(0)
        except OSError:
            time.sleep(0.1)


def start_epmd(port: int, cwd: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """A private Erlang port mapper in the foreground on 127.0.0.1:``port``."""
    process = subprocess.Popen(  # noqa: S603 -- fixed binary, our arguments
        [find_epmd(), "-port", str(port), "-address", "127.0.0.1"],
        cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_listening([port], process, "epmd", 10.0)
    except BaseException:
        stop_process(process)
        raise
    return process


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process group we started and reap its leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def password_hash(password: str, salt: bytes | None = None) -> str:
    """A definitions-file password hash (rabbit_password_hashing_sha256: base64 of a
    4-byte salt and SHA-256 of salt + password)."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(panicd_password: str, buttons_password: str) -> dict[str, object]:
    """The vhost, the two accounts and their rights, as a definitions file."""
    def user(name: str, password: str) -> dict[str, object]:
        return {"name": name, "password_hash": password_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []}

    return {
        "vhosts": [{"name": "/"}],
        "users": [user(PANICD_USER, panicd_password), user(BUTTONS_USER, buttons_password)],
        "permissions": [
            {"user": PANICD_USER, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"},
            {"user": BUTTONS_USER, "vhost": "/", **BUTTON_PERMISSIONS},
        ],
        "topic_permissions": [{"user": BUTTONS_USER, "vhost": "/", **BUTTON_TOPIC_PERMISSIONS}],
    }


def render_config(*, amqp_port: int, mqtt_port: int, definitions_file: Path,
                  buttons_password: str, seed: str | None = None) -> str:
    """rabbitmq.conf of the private node (the lines docs/BROKERS.md explains); with
    ``seed``, a blank node joins that node's cluster at its first boot."""
    lines = [
        f"listeners.tcp.default = 127.0.0.1:{amqp_port}",
        f"mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}",
        # Persistent sessions (clean_session=False) in replicated, fsynced quorum queues.
        "mqtt.durable_queue_type = quorum",
        f"mqtt.subscription_ttl = {SESSION_TTL_MS}",
        f"mqtt.prefetch = {PREFETCH}",
        "mqtt.vhost = /",
        "mqtt.exchange = amq.topic",
        # Clients without a username are the buttons account, with only its rights.
        "mqtt.allow_anonymous = true",
        f"mqtt.default_user = {BUTTONS_USER}",
        f"mqtt.default_pass = {buttons_password}",
        f"load_definitions = {definitions_file}",
        "log.console = false",
        "log.file.level = info",
    ]
    if seed is not None:
        # Classic-config peer discovery runs only on a blank node: the first boot joins
        # the seed's cluster; a restart rejoins from the node's own Mnesia data.
        lines += ["cluster_formation.peer_discovery_backend = classic_config",
                  f"cluster_formation.classic_config.nodes.1 = {seed}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class ClusterShare:
    """What the nodes of one private cluster share: the port mapper, the Erlang cookie,
    the accounts' passwords, the parent directory, and the node a new member joins."""

    epmd_port: int
    cookie: str
    panicd_password: str
    buttons_password: str
    base: Path
    seed: str | None = None


class RabbitMQ:
    """A private single RabbitMQ node with the MQTT plugin on 127.0.0.1; a context manager.

    ``start`` makes the temp directory and starts epmd and the node; ``stop_node`` and
    ``kill9`` end the node but keep its data, so ``start_node`` brings the same node (same
    name, ports, sessions) back; ``close`` ends everything and removes the directory.
    """

    def __init__(self, *, panicd_password: str | None = None,
                 sbin: Path | None = None, share: ClusterShare | None = None) -> None:
        self.sbin = sbin
        self.host = "127.0.0.1"
        self.amqp_port, self.mqtt_port, self.dist_port, self.epmd_port = free_ports(4)
        self.node = f"panicd-test-{os.getpid()}-{next(_names)}@localhost"
        self.panicd_user = PANICD_USER
        self.panicd_password = panicd_password or secrets.token_hex(8)
        self.buttons_password = secrets.token_hex(8)
        # A cluster member uses the cluster's epmd, cookie and accounts (RabbitMQCluster).
        self.share = share
        if share is not None:
            self.epmd_port = share.epmd_port
            self.panicd_password = share.panicd_password
            self.buttons_password = share.buttons_password
        self.workdir: Path | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._node: subprocess.Popen[bytes] | None = None

    # --- paths and environment ----------------------------------------------------

    def _dir(self) -> Path:
        if self.workdir is None:
            raise RabbitMQError("the private RabbitMQ has not been started")
        return self.workdir

    @property
    def log_path(self) -> Path:
        """The node's log file."""
        return self._dir() / "log" / f"{self.node}.log"

    def _env(self) -> dict[str, str]:
        workdir = self._dir()
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("RABBITMQ_", "ERL_")) and key != "NOTIFY_SOCKET"}
        no_epmd = "-start_epmd false"
        env.update(
            HOME=str(workdir),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_CONF_ENV_FILE=str(workdir / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(workdir / "mnesia"),
            RABBITMQ_PID_FILE=str(workdir / "node.pid"),
            RABBITMQ_LOG_BASE=str(workdir / "log"),
            RABBITMQ_CONFIG_FILE=str(workdir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(workdir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(workdir / "enabled_plugins"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                "-kernel inet_dist_use_interface {127,0,0,1} " + no_epmd),
            RABBITMQ_CTL_ERL_ARGS=no_epmd,
        )
        return env

    def _prepare(self) -> Path:
        share = self.share
        base = share.base if share is not None else None
        workdir = Path(tempfile.mkdtemp(prefix="panicd-rabbitmq-", dir=base))
        self.workdir = workdir
        (workdir / "rabbitmq-env.conf").write_text("# panicd private node: no env overrides\n")
        (workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        defs = workdir / "definitions.json"
        defs.write_text(json.dumps(definitions(self.panicd_password, self.buttons_password)))
        defs.chmod(0o600)
        conf = workdir / "rabbitmq.conf"
        conf.write_text(render_config(amqp_port=self.amqp_port, mqtt_port=self.mqtt_port,
                                      definitions_file=defs,
                                      buttons_password=self.buttons_password,
                                      seed=share.seed if share is not None else None))
        conf.chmod(0o600)
        cookie = workdir / ".erlang.cookie"
        cookie.write_text(share.cookie if share is not None else secrets.token_hex(20).upper())
        cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        return workdir

    # --- processes ----------------------------------------------------------------

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Make the directory, start the private epmd and the node; wait for MQTT."""
        if self.sbin is None:
            self.sbin = find_sbin()
        workdir = self._prepare()
        try:
            if self.share is None:  # a cluster member's epmd is the cluster's
                self._epmd = start_epmd(self.epmd_port, workdir, self._env())
            self.start_node(timeout_s)
        except BaseException:
            self.close()
            raise

    def start_node(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the node (again, after ``stop_node`` or ``kill9``) and wait until its
        MQTT and AMQP listeners answer."""
        workdir = self._dir()
        assert self.sbin is not None
        with (workdir / "stdout.log").open("ab") as out:
            self._node = subprocess.Popen(  # noqa: S603 -- the package's script, our env
                [str(self.sbin / "rabbitmq-server")], cwd=workdir, env=self._env(),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ports([self.mqtt_port, self.amqp_port], self._node, "rabbitmq-server",
                             timeout_s)
        except BaseException:
            self._kill_node()
            raise

    def _wait_ports(self, ports: list[int], process: subprocess.Popen[bytes], name: str,
                    timeout_s: float) -> None:
        wait_listening(ports, process, name, timeout_s, self._tail)

    def _tail(self) -> str:
        paths = (self._dir() / "stdout.log", self.log_path)
        return "\n".join(path.read_text(errors="replace")[-3000:] for path in paths
                         if path.exists())

    def ctl(self, *args: str, timeout_s: float = 30.0) -> str:
        """``rabbitmqctl -n NODE args…`` against this node only; returns its stdout."""
        assert self.sbin is not None
        try:
            result = subprocess.run(  # noqa: S603 -- the package's script, our arguments
                [str(self.sbin / "rabbitmqctl"), "-n", self.node, *args], cwd=self._dir(),
                env=self._env(), capture_output=True, timeout=timeout_s, check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise RabbitMQError(f"rabbitmqctl {args[0]} did not finish in {timeout_s} s") from exc
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise RabbitMQError(f"rabbitmqctl {' '.join(args)} failed: {detail}")
        return result.stdout.decode(errors="replace")

    def queues(self) -> dict[str, tuple[str, bool, int]]:
        """Queue name -> (type, durable, messages) on the default vhost."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "type", "durable",
                       "messages")
        found = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                found[parts[0]] = (parts[1], parts[2] == "true", int(parts[3]))
        return found

    def elect_quorum_leaders(self) -> None:
        """Ask every quorum queue of the node to hold a leader election now.

        After a restart, a single node's quorum queue sometimes never elects itself
        leader: a client's queue declaration waits forever ("leader call - leader not
        known. Command will be forwarded once leader is known." in the log; seen here
        with 3.10.8 after both a clean stop and SIGKILL, and reported as
        rabbitmq/rabbitmq-server issue #10070, open). In a cluster the other members
        elect one; a single node has no one else, and ``ra:trigger_election`` — the
        workaround given in that issue — is what ends the wait.
        """
        self.ctl("eval", "[ra:trigger_election(amqqueue:get_pid(Q)) || Q <- "
                 "rabbit_amqqueue:list(), amqqueue:get_type(Q) == rabbit_quorum_queue].")

    @property
    def running(self) -> bool:
        """Whether the node's process is up (started and neither stopped nor killed)."""
        return self._node is not None and self._node.poll() is None

    def stop_node(self) -> None:
        """Stop the node cleanly (``rabbitmqctl stop``), killed if that hangs; data stays."""
        if self._node is None:
            return
        if self._node.poll() is None:
            with contextlib.suppress(RabbitMQError):
                self.ctl("stop", timeout_s=STOP_TIMEOUT_S)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._node.wait(timeout=STOP_TIMEOUT_S)
        self._kill_node()

    def kill9(self) -> None:
        """SIGKILL the node and its helpers: a lost node, nothing flushed; data stays."""
        self._kill_node()

    def _beam_pid(self) -> int | None:
        try:
            text = (self._dir() / "node.pid").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _kill_node(self) -> None:
        process, self._node = self._node, None
        if process is None:
            return
        # The Debian script runs the VM as its child and waits for it: kill the VM
        # (beam.smp, from the node's pid file) and the script, which reaps it, ends.
        # erl_child_setup and inet_gethost leave when the VM is gone.
        if process.poll() is None:
            beam = self._beam_pid()
            with contextlib.suppress(ProcessLookupError):
                if beam is not None:
                    os.kill(beam, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        (self._dir() / "node.pid").unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the node and epmd and remove the directory: nothing is left behind."""
        if self.workdir is None:
            return
        self.stop_node()
        epmd, self._epmd = self._epmd, None
        if epmd is not None:
            stop_process(epmd)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None

    @property
    def accounts(self) -> Mapping[str, str]:
        """Username -> password of the node's accounts."""
        return {PANICD_USER: self.panicd_password, BUTTONS_USER: self.buttons_password}

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
