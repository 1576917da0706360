"""Several hosts on one machine: Linux network namespaces on a bridge, for tests of what crosses a network.

Each host is a network namespace with one interface (`eth0`) on a bridge in the root namespace, an
address in 198.18.0.0/24 (reserved for network tests) and no default route: a packet to anything
else fails at once ("network unreachable"), so nothing leaves the machine. The root namespace is
host .1 (the test that drives the bed). A host can be cut off (its link down: packets vanish, as in
a real partition) and healed, one path can be cut (the host's packets to one peer vanish), and a
host's processes can be killed. Needs root and iproute2.

Names carry a random id, and every bed leaves a note under /run/inpaint-netbed while it lives, so a
bed whose process died (an interrupted test run) is swept away by the next one.

By hand: `sudo python -m stack.netbed` brings up an empty bed of three hosts, prints how to use it,
and tears it down on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from stack.services import stop_process

SUBNET = "198.18.0"
STATE = Path("/run/inpaint-netbed")
NOWHERE_MAC = "02:00:00:00:00:01"  # a neighbour entry to this MAC makes packets to a peer vanish


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def available() -> str | None:
    """Why this machine cannot run a bed, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if subprocess.run(["ip", "-V"], capture_output=True).returncode != 0:
        return "needs iproute2"
    return None


@dataclass
class Host:
    bed: Netbed
    name: str
    index: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def ip(self) -> str:
        return f"{SUBNET}.{self.index}"

    @property
    def ns(self) -> str:
        return f"inpaint-{self.bed.id}-{self.name}"

    @property
    def link(self) -> str:
        """The root namespace's end of the host's cable."""
        return f"inv{self.bed.id}{self.index:02x}"

    @property
    def prefix(self) -> list[str]:
        """What runs a command on this host."""
        return ["ip", "netns", "exec", self.ns]

    def run(self, args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start a process on this host (its own session, so killing it takes its children too)."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*self.prefix, *args], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def cut(self) -> None:
        """Off the network: its link goes down, packets to and from it vanish."""
        _ip("link", "set", self.link, "down")

    def heal(self) -> None:
        _ip("link", "set", self.link, "up")

    def cut_path(self, peer: Host) -> None:
        """Only this host's packets to `peer` vanish (a neighbour entry that points nowhere)."""
        _ip("-n", self.ns, "neigh", "replace", peer.ip, "lladdr", NOWHERE_MAC, "dev", "eth0", "nud", "permanent")

    def heal_path(self, peer: Host) -> None:
        _ip("-n", self.ns, "neigh", "del", peer.ip, "dev", "eth0")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Every process started on the host, and their children."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.procs.clear()


class Netbed:
    def __init__(self) -> None:
        self.id = secrets.token_hex(3)
        self.bridge = f"inb{self.id}"
        self.hosts: dict[str, Host] = {}
        self.driver_ip = f"{SUBNET}.1"

    def up(self) -> Netbed:
        sweep()
        STATE.mkdir(parents=True, exist_ok=True)
        self._note()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.driver_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        _forward(self.bridge, "-I")
        return self

    def _note(self) -> None:
        note = {"pid": os.getpid(), "bridge": self.bridge, "namespaces": [h.ns for h in self.hosts.values()]}
        (STATE / self.id).write_text(json.dumps(note))

    def host(self, name: str, index: int) -> Host:
        """A new host `name` at 198.18.0.`index`."""
        h = Host(self, name, index)
        self.hosts[name] = h
        self._note()  # before the namespace exists: an interrupted run is swept either way
        _ip("netns", "add", h.ns)
        _ip("link", "add", h.link, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
        _ip("link", "set", h.link, "master", self.bridge, "up")
        _ip("-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
        _ip("-n", h.ns, "link", "set", "eth0", "up")
        _ip("-n", h.ns, "link", "set", "lo", "up")
        return h

    def down(self) -> None:
        """Everything, whatever state it is in."""
        for h in self.hosts.values():
            for proc in h.procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    stop_process(proc, 1)
        _teardown(self.bridge, [h.ns for h in self.hosts.values()])
        (STATE / self.id).unlink(missing_ok=True)


def _teardown(bridge: str, namespaces: list[str]) -> None:
    """Kill whatever still runs in the namespaces, delete them (their veths go with them), then the bridge."""
    for ns in namespaces:
        found = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in found:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if bridge:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        _forward(bridge, "-D")


def _forward(bridge: str, op: str) -> None:
    """Let frames between the bed's hosts through the FORWARD chain (`-I`), or stop (`-D`).

    A Docker engine with its iptables rules sets FORWARD's policy to DROP and, with br_netfilter, that
    chain sees frames crossing any bridge: the bed's hosts would not reach each other. Nothing to do
    where iptables is not installed (nothing filters then)."""
    if shutil.which("iptables"):
        rule = ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
        subprocess.run(["iptables", op, *rule], capture_output=True)


def sweep() -> None:
    """Remove the beds whose process is gone (a test run killed before it could clean up)."""
    if not STATE.is_dir():
        return
    for note in STATE.iterdir():
        try:
            doc = json.loads(note.read_text())
            pid, bridge, namespaces = int(doc["pid"]), str(doc["bridge"]), list(doc["namespaces"])
        except (OSError, ValueError, KeyError, TypeError):
            note.unlink(missing_ok=True)
            continue
        try:
            os.kill(pid, 0)
            continue  # its owner lives
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _teardown(bridge, namespaces)
        note.unlink(missing_ok=True)


def main() -> int:
    why = available()
    if why:
        print(f"netbed: {why}")
        return 2
    bed = Netbed().up()
    try:
        for i, name in enumerate(("a", "b", "c"), start=2):
            bed.host(name, i)
        print(f"bed {bed.id}: this namespace is {bed.driver_ip}; hosts:")
        for h in bed.hosts.values():
            print(f"  {h.name}  {h.ip}  run: {' '.join(h.prefix)} <command>   cut: ip link set {h.link} down")
        print("Ctrl-C tears it down.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        bed.down()


if __name__ == "__main__":
    raise SystemExit(main())
