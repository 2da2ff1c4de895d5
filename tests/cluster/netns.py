"""A private network of Linux network namespaces for the cluster test.

One namespace is the switch (a bridge); every host is a namespace of its
own, joined to the bridge by a veth pair, with one address in a test
subnet that exists only inside these namespaces. Nothing is added to the
machine's own network namespace: no interface, no address, no route, so no
packet can leave for anything else. Cutting a host's cable is taking its
switch port down.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and ``ip`` from iproute2. Any
failure to build the network raises ``NetworkUnavailable``: the test fails
loudly, it never skips.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetworkUnavailable(RuntimeError):
    """The namespaces could not be made (not root, no iproute2, no veth/bridge)."""


@dataclass
class Host:
    name: str        # short name, e.g. "db", "web-a"
    netns: str       # the namespace, unique to this run
    address: str     # its address in the test subnet
    port_name: str   # its port on the switch (what a cable cut takes down)


class Network:
    """The switch and the hosts of one test run; ``destroy`` removes them all."""

    def __init__(self, subnet: str = "10.213.7", prefix: str = ""):
        self.subnet = subnet
        self.prefix = prefix or f"tm{os.getpid() % 100000}"
        self.switch = f"{self.prefix}-sw"
        self.hosts: dict[str, Host] = {}
        self.made: list[str] = []
        if shutil.which("ip") is None:
            raise NetworkUnavailable("`ip` (iproute2) is not installed: apt-get install iproute2")
        if os.geteuid() != 0:
            raise NetworkUnavailable("the cluster test builds network namespaces and must run as root")
        try:
            self._netns_add(self.switch)
            self.ip(self.switch, "link", "add", "br0", "type", "bridge")
            self.ip(self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.destroy()
            raise

    def ip(self, netns: str, *args: str) -> str:
        """Run ``ip -n NETNS ARGS``; a failure raises NetworkUnavailable with ip's own message."""
        done = subprocess.run(["ip", "-n", netns, *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise NetworkUnavailable(f"ip -n {netns} {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def _netns_add(self, name: str) -> None:
        done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if done.returncode != 0:
            raise NetworkUnavailable(f"ip netns add {name}: {done.stderr.strip()}")
        self.made.append(name)

    def add_host(self, name: str, octet: int) -> Host:
        """A new host namespace with ``eth0`` = ``<subnet>.<octet>/24`` on the switch."""
        host = Host(name, f"{self.prefix}-{name}", f"{self.subnet}.{octet}", f"p-{name}"[:15])
        self._netns_add(host.netns)
        # Both ends are created inside the namespaces (ip -n ... peer ... netns),
        # so not even for a moment does an interface appear in the machine's own.
        self.ip(self.switch, "link", "add", host.port_name, "type", "veth", "peer", "name", "eth0",
                "netns", host.netns)
        self.ip(self.switch, "link", "set", host.port_name, "master", "br0", "up")
        self.ip(host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        self.ip(host.netns, "link", "set", "eth0", "up")
        self.ip(host.netns, "link", "set", "lo", "up")
        self.hosts[name] = host
        return host

    def cut(self, name: str) -> None:
        """Pull ``name``'s cable: its packets vanish, nobody is told (no RST, no FIN)."""
        self.ip(self.switch, "link", "set", self.hosts[name].port_name, "down")

    def mend(self, name: str) -> None:
        """Plug ``name``'s cable back in. Its neighbour table is flushed: the
        addresses it failed to resolve while cut stay FAILED for a while, and
        a connection it opens meanwhile (its daemon reconnecting to the
        database) fails although the cable is back (seen as "server closed
        the connection unexpectedly")."""
        self.ip(self.switch, "link", "set", self.hosts[name].port_name, "up")
        self.ip(self.hosts[name].netns, "neigh", "flush", "all")

    def command(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``name``'s namespace (ip execs it: same pid)."""
        return ["ip", "netns", "exec", self.hosts[name].netns, *argv]

    @contextmanager
    def inside(self, name: str) -> Iterator[None]:
        """Run the calling thread inside host ``name``'s namespace: sockets it
        opens meanwhile (and threads it starts) belong to that host."""
        with entered(f"/run/netns/{self.hosts[name].netns}"):
            yield

    def destroy(self) -> list[str]:
        """Delete every namespace this run made (their veths go with them);
        returns the error messages, if any."""
        errors = []
        for name in reversed(self.made):
            done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            if done.returncode != 0:
                errors.append(done.stderr.strip())
        self.made.clear()
        return errors


@contextmanager
def entered(netns_path: str) -> Iterator[None]:
    """setns(2) the calling thread into a network namespace, and back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns_path, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetworkUnavailable(f"setns: {os.strerror(err)}")
