"""A private three-node RabbitMQ cluster with the MQTT plugin (issue 13 item 4, bench/ha.py).

Each node is a ``firmware_sim.rabbitmq.RabbitMQ`` with its own directory and free
loopback ports (AMQP, MQTT, distribution); the nodes share one private ``epmd``, one
Erlang cookie and the accounts, and never meet the machine's own RabbitMQ. The first
node starts alone; the others start blank with classic-config peer discovery naming it
(``cluster_formation.classic_config.nodes.1``), so their first boot joins its cluster
without the ``stop_app``/``reset``/``join_cluster``/``start_app`` round trip; a restarted
member rejoins from its own Mnesia data. Persistent MQTT sessions are quorum queues whose
members are all the nodes that were in the cluster when the queue was declared, so
sessions must be made after ``start`` returns (it waits for every node to be running).

Measured on this 2-core machine (RabbitMQ 3.10.8): ``start`` takes 24-27 s (the first
node about 11 s, the other two joining in parallel the rest), a SIGKILLed member is
running in the cluster again 9 s after ``restart`` on an idle machine and 15-20 s under
bench/ha.py's storm, ``close`` under a second.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Self

from firmware_sim.rabbitmq import (
    START_TIMEOUT_S,
    ClusterShare,
    RabbitMQ,
    RabbitMQError,
    find_sbin,
    free_ports,
    start_epmd,
    stop_process,
)

CLUSTER_START_TIMEOUT_S = 180.0


class RabbitMQCluster:
    """``n`` private RabbitMQ nodes joined into one cluster on 127.0.0.1; a context manager.

    ``kill9(i)`` SIGKILLs node ``i`` (its data stays), ``restart(i)`` starts it again and
    waits until the cluster counts it running; ``close`` ends every node and epmd and
    removes the directory.
    """

    def __init__(self, n: int = 3, *, panicd_password: str | None = None,
                 sbin: Path | None = None) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        self.size = n
        self.sbin = sbin
        self.host = "127.0.0.1"
        (self.epmd_port,) = free_ports(1)
        self.panicd_password = panicd_password or secrets.token_hex(8)
        self.buttons_password = secrets.token_hex(8)
        self.cookie = secrets.token_hex(20).upper()
        self.base: Path | None = None
        self.nodes: list[RabbitMQ] = []
        self.start_s: float | None = None
        self._epmd: subprocess.Popen[bytes] | None = None

    @property
    def panicd_user(self) -> str:
        """The account panicd (and tests) log in with."""
        return self.nodes[0].panicd_user

    @property
    def brokers(self) -> list[tuple[str, int]]:
        """Every node's MQTT address, node 0 first (a ``brokers`` list)."""
        return [(node.host, node.mqtt_port) for node in self.nodes]

    def _share(self, base: Path, seed: str | None) -> ClusterShare:
        return ClusterShare(epmd_port=self.epmd_port, cookie=self.cookie,
                            panicd_password=self.panicd_password,
                            buttons_password=self.buttons_password, base=base, seed=seed)

    def start(self, timeout_s: float = CLUSTER_START_TIMEOUT_S) -> None:
        """Start epmd, the first node, then the others joining it; wait for all running."""
        started = time.monotonic()
        sbin = self.sbin or find_sbin()
        base = self.base = Path(tempfile.mkdtemp(prefix="panicd-rabbitmq-cluster-"))
        try:
            self._epmd = start_epmd(self.epmd_port, base, {"HOME": str(base)})
            first = RabbitMQ(sbin=sbin, share=self._share(base, None))
            self.nodes = [first]
            first.start(START_TIMEOUT_S)
            self.nodes += [RabbitMQ(sbin=sbin, share=self._share(base, first.node))
                           for _ in range(self.size - 1)]
            # The joiners boot in parallel: each one's join is a Mnesia transaction on
            # the first node's tables, which serialises them.
            self._in_parallel([node.start for node in self.nodes[1:]])
            self.wait_settled(started + timeout_s - time.monotonic())
        except BaseException:
            self.close()
            raise
        self.start_s = time.monotonic() - started

    @staticmethod
    def _in_parallel(calls: list[Callable[[], None]]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
            for future in [pool.submit(call) for call in calls]:
                future.result()  # the first failure is raised here

    def _alive(self) -> list[RabbitMQ]:
        return [node for node in self.nodes if node.running]

    def ctl(self, *args: str, timeout_s: float = 30.0) -> str:
        """``rabbitmqctl`` against the first running node."""
        alive = self._alive()
        if not alive:
            raise RabbitMQError("no node of the cluster is running")
        return alive[0].ctl(*args, timeout_s=timeout_s)

    def running_nodes(self) -> set[str]:
        """The node names the cluster counts running (``cluster_status``)."""
        status = json.loads(self.ctl("cluster_status", "--formatter", "json"))
        return set(status.get("running_nodes", []))

    def wait_settled(self, timeout_s: float) -> None:
        """Wait until every running node counts exactly the running nodes as running.

        After a SIGKILL the survivors learn of the loss from the closed distribution
        connection within milliseconds; a client that connects to a survivor before
        that may publish into a stale quorum-queue leader and never get its PUBACK on
        that connection (seen with 3.10.8, docs/BROKERS.md), so tests wait for this.
        """
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            alive = self._alive()
            expected = {node.node for node in alive}
            with contextlib.suppress(RabbitMQError, json.JSONDecodeError):
                seen = [set(json.loads(node.ctl("cluster_status", "--formatter", "json"))
                            .get("running_nodes", [])) for node in alive]
                if seen and all(each == expected for each in seen):
                    return
                last = f"running as seen by each live node: {[sorted(e) for e in seen]}"
            time.sleep(0.2)
        raise RabbitMQError(f"the cluster did not settle on {len(self._alive())} running "
                            f"nodes in {timeout_s:.0f} s ({last})")

    def queue_members(self) -> dict[str, tuple[int, int]]:
        """Quorum queue name -> (members, members online)."""
        out = self.ctl("list_queues", "-q", "--formatter", "json",
                       "name", "type", "members", "online")
        return {queue["name"]: (len(queue.get("members") or []),
                                len(queue.get("online") or []))
                for queue in json.loads(out) if queue.get("type") == "quorum"}

    def kill9(self, index: int) -> None:
        """SIGKILL node ``index``: a lost member, nothing flushed; its data stays.

        Returns at once: the survivors may not have noticed yet (``wait_settled``)."""
        self.nodes[index].kill9()

    def restart(self, index: int, timeout_s: float = START_TIMEOUT_S) -> float:
        """Start node ``index`` again; wait until it runs in the cluster; seconds taken."""
        started = time.monotonic()
        self.nodes[index].start_node(timeout_s)
        self.wait_settled(started + timeout_s - time.monotonic())
        return time.monotonic() - started

    def close(self) -> None:
        """Stop every node (SIGKILL: the data goes with the directory) and epmd."""
        for node in self.nodes:
            node.kill9()
            node.close()
        self.nodes = []
        epmd, self._epmd = self._epmd, None
        if epmd is not None:
            stop_process(epmd)
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

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
