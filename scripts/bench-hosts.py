#!/usr/bin/env python3
"""Relay mode against direct mode with one CPU budget per node.

vx6-bench runs every node in one process on the machine's cores, so a relayed
byte is paid for by the same two vCPUs five times over: that measures the sum
of all nodes' CPU per byte. Here every node is its own `vx6 node` process in
its own cgroup with the same CPU quota, as if each ran on a small machine of
its own (the deployment relay mode is for), and the transfer goes as fast as
its busiest node allows. Both modes run in the same script, alternating, over
the same nodes and the same budget.

With --netns every node is also a host of its own, as in the netlab tests
(NETLAB.md): its own network namespace, its own address in its own /48
(fd00:i::1) on a shared bridge, so path selection applies its real prefix
rule and every link crosses a veth pair and a bridge instead of loopback. The
published service listens on the owner's 127.0.0.1 and the client's forward
on the client's, each inside its namespace.

    sudo python3 scripts/bench-hosts.py [--quota 0.35] [--mib 512] [--rounds 3]
                                        [--transport tcp|quic|both] [--netns]

Needs root and the cgroup v1 `cpu` controller or cgroup v2 with `cpu`
enabled; prints a Markdown report on stdout.
"""

import argparse
import ctypes
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 1 << 20


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


# --- the published service: upload sink / download source -----------------


def serve_bulk(listener):
    """'U' + u64 n: read n bytes, answer b'k'. 'D' + u64 n: send n bytes."""
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=bulk_conn, args=(conn,), daemon=True).start()


def recv_exact(conn, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("connection closed")
        got += k
    return bytes(buf)


def bulk_conn(conn):
    with conn:
        try:
            head = recv_exact(conn, 9)
            n = int.from_bytes(head[1:], "big")
            if head[:1] == b"U":
                sink(conn, n)
                conn.sendall(b"k")
            elif head[:1] == b"D":
                source(conn, n)
        except (EOFError, OSError):
            pass


def sink(conn, n):
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    left = n
    while left > 0:
        k = conn.recv_into(view, min(CHUNK, left))
        if k == 0:
            raise EOFError("connection closed")
        left -= k


def source(conn, n):
    block = bytes(CHUNK)
    left = n
    while left > 0:
        k = min(CHUNK, left)
        conn.sendall(block[:k] if k < CHUNK else block)
        left -= k


def transfer(port, direction, n, ns=None):
    """MiB/s of one transfer of n bytes through the forward on `port`
    (127.0.0.1 in namespace `ns`, or here)."""
    with in_netns(ns):
        c = socket.create_connection(("127.0.0.1", port), timeout=120)
    with c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        if direction == "up":
            c.sendall(b"U" + n.to_bytes(8, "big"))
            source(c, n)
            if recv_exact(c, 1) != b"k":
                raise RuntimeError("no acknowledgement")
        else:
            c.sendall(b"D" + n.to_bytes(8, "big"))
            sink(c, n)
        return n / (1 << 20) / (time.monotonic() - t0)


# --- hosts as network namespaces -----------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(ns):
    """Sockets made inside this block live in namespace `ns` (None: here).
    setns(2) moves only the calling thread, and it moves back on exit."""
    if ns is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(home)
        os.close(target)


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Netns:
    """A hub namespace with a bridge, and one namespace per host on it."""

    def __init__(self):
        self.prefix = f"vx6bh{os.getpid()}"
        self.made = []
        self.next = 1
        self.hub = self.prefix + "h"

    def start(self):
        self._add(self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")

    def _add(self, ns):
        ip("netns", "add", ns)
        self.made.append(ns)

    def host(self):
        """A new host: (namespace, its address)."""
        i = self.next
        self.next += 1
        ns, veth = f"{self.prefix}n{i}", f"{self.prefix}v{i}"
        self._add(ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", veth, "netns", self.hub)
        ip("-n", self.hub, "link", "set", veth, "master", "br0")
        ip("-n", self.hub, "link", "set", veth, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", "eth0", "up")
        addr = f"fd00:{i:x}::1"
        ip("-n", ns, "-6", "addr", "add", f"{addr}/16", "dev", "eth0", "nodad")
        return ns, addr

    def cleanup(self):
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# --- CPU budgets -------------------------------------------------------------


class Cgroups:
    """One cgroup per node under the cpu controller, v1 or v2."""

    def __init__(self, quota):
        self.quota = quota
        self.dirs = []
        v1 = "/sys/fs/cgroup/cpu"
        v2 = "/sys/fs/cgroup"
        if os.path.exists(os.path.join(v1, "cpu.cfs_quota_us")):
            self.base, self.v2 = os.path.join(v1, "vx6-bench-hosts"), False
        elif "cpu" in open(os.path.join(v2, "cgroup.controllers")).read().split():
            self.base, self.v2 = os.path.join(v2, "vx6-bench-hosts"), True
        else:
            raise SystemExit("bench-hosts: no cgroup cpu controller here")
        os.makedirs(self.base, exist_ok=True)
        if self.v2:
            with open(os.path.join(self.base, "cgroup.subtree_control"), "w") as f:
                f.write("+cpu")

    def add(self, name, pid):
        d = os.path.join(self.base, name)
        os.makedirs(d, exist_ok=True)
        period = 100_000
        if self.v2:
            with open(os.path.join(d, "cpu.max"), "w") as f:
                f.write(f"{int(self.quota * period)} {period}")
        else:
            with open(os.path.join(d, "cpu.cfs_period_us"), "w") as f:
                f.write(str(period))
            with open(os.path.join(d, "cpu.cfs_quota_us"), "w") as f:
                f.write(str(int(self.quota * period)))
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write(str(pid))
        self.dirs.append(d)

    def cleanup(self):
        for d in self.dirs:
            try:
                os.rmdir(d)
            except OSError:
                pass
        try:
            os.rmdir(self.base)
        except OSError:
            pass


# --- nodes ---------------------------------------------------------------------


class Net:
    def __init__(self, vx6, work, cg, transport, netns=None):
        self.vx6, self.work, self.cg, self.transport = vx6, work, cg, transport
        self.netns = netns
        self.procs = []
        self.ports = {}
        self.addrs = {}
        self.ns = {}

    def exec_prefix(self, name):
        ns = self.ns.get(name)
        return ["ip", "netns", "exec", ns] if ns else []

    def cli(self, name, *args, check=True):
        r = subprocess.run(
            [*self.exec_prefix(name), self.vx6, "--home", os.path.join(self.work, name), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"vx6 {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def start(self, name, peer=None):
        if self.netns:
            self.ns[name], self.addrs[name] = self.netns.host()
            port = 4000
        else:
            self.addrs[name], port = "::1", free_port()
        self.ports[name] = port
        args = ["init", "--name", name, "--listen", f"[{self.addrs[name]}]:{port}",
                "--transport", self.transport]
        if peer:
            args += ["--peer", self.endpoint(peer)]
        self.cli(name, *args)
        log = open(os.path.join(self.work, f"{name}.log"), "w")
        # `ip netns exec` execs the daemon in place: the pid is the node's.
        p = subprocess.Popen(
            [*self.exec_prefix(name), self.vx6, "--home", os.path.join(self.work, name), "node"],
            stdout=log,
            stderr=log,
            env={**os.environ, "VX6_LOG": "warn"},
        )
        self.procs.append(p)
        self.cg.add(name, p.pid)
        wait_for(lambda: self.cli(name, "status", check=False) != "")

    def endpoint(self, name):
        return f"[{self.addrs[name]}]:{self.ports[name]}"

    def cpu_seconds(self):
        """Each node's CPU time so far (user + system), by name."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for name, p in zip(self.ports, self.procs):
            with open(f"/proc/{p.pid}/stat") as f:
                # Fields after the command name, which may hold spaces.
                rest = f.read().rsplit(")", 1)[1].split()
            out[name] = (int(rest[11]) + int(rest[12])) / tick
        return out

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_for(pred, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return
        except (RuntimeError, OSError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError("timed out")


def connect(net, client, *args):
    port = free_port()
    net.cli(client, "connect", *args, "--listen", f"127.0.0.1:{port}", "--detach")
    return port


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quota", type=float, default=0.35, help="CPUs per node (default 0.35)")
    ap.add_argument("--mib", type=int, default=512, help="MiB per transfer (default 512)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--transport", choices=["tcp", "quic", "both"], default="both",
                    help="what every node speaks, so what its links can be (default both)")
    ap.add_argument("--setups", type=int, default=10,
                    help="further relayed forwards opened to time circuit setup (default 10)")
    ap.add_argument("--netns", action="store_true",
                    help="every node a host in its own network namespace and /48")
    ap.add_argument("--vx6", default=os.path.join(ROOT, "target/release/vx6"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench-hosts: needs root (cgroups)")
    if not os.access(a.vx6, os.X_OK):
        raise SystemExit(f"bench-hosts: no vx6 binary at {a.vx6} (cargo build --release -p vx6-cli)")

    cg = Cgroups(a.quota)
    work = tempfile.mkdtemp(prefix="vx6-bench-hosts.")
    netns = None
    net = None
    try:
        if a.netns:
            netns = Netns()
            netns.start()
        net = Net(a.vx6, work, cg, a.transport, netns)
        run(a, net)
    finally:
        if net:
            net.stop()
        if netns:
            netns.cleanup()
        cg.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def run(a, net):
    net.start("owner")
    with in_netns(net.ns.get("owner")):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
    threading.Thread(target=serve_bulk, args=(listener,), daemon=True).start()
    for r in ("relay1", "relay2", "relay3"):
        net.start(r, peer="owner")
    net.start("client", peer="owner")
    net.cli("owner", "service", "add", "bulk", f"127.0.0.1:{listener.getsockname()[1]}")
    owner_id = json.loads(net.cli("owner", "identity", "--json"))["node_id"]
    direct = connect(
        net, "client", "--addr", net.endpoint("owner"), "--service", "bulk",
        "--node", owner_id, "--transport", "quic" if a.transport == "quic" else "tcp",
    )
    wait_for(lambda: net.cli("client", "resolve", "owner.bulk") != "")
    relayed = None

    def open_relay():
        nonlocal relayed
        relayed = connect(net, "client", "owner.bulk", "--via", "relay")
        return True

    wait_for(open_relay, timeout=60)

    # Each relayed forward builds its own circuit; the client node times
    # each build (whole milliseconds, `status` circuits.own.last_setup_ms).
    def own():
        return json.loads(net.cli("client", "status", "--json"))["circuits"]["own"]

    setups = []
    for _ in range(a.setups):
        before = own()["built"]
        connect(net, "client", "owner.bulk", "--via", "relay")
        st = own()
        if st["built"] > before:
            setups.append(st["last_setup_ms"])
    n = a.mib << 20
    res = {(m, d): [] for m in ("direct", "relay") for d in ("up", "down")}
    cpu = {k: {} for k in res}
    for _ in range(a.rounds):
        for mode, port in (("direct", direct), ("relay", relayed)):
            for d in ("up", "down"):
                before = net.cpu_seconds()
                res[(mode, d)].append(transfer(port, d, n, net.ns.get("client")))
                for name, t in net.cpu_seconds().items():
                    used = cpu[(mode, d)].get(name, 0.0) + t - before[name]
                    cpu[(mode, d)][name] = used
    med = {k: statistics.median(v) for k, v in res.items()}
    print("# vx6 bench-hosts: relay vs direct, one CPU budget per node")
    print()
    where = ("each in its own network namespace and /48 on one bridge"
             if a.netns else "all on loopback")
    print(f"- nodes: owner, 3 relays, client; each `vx6 node` in its own cgroup "
          f"with {a.quota} CPU; {where}; machine: {os.cpu_count()} CPUs; "
          f"links: {a.transport}")
    print(f"- {a.mib} MiB per transfer, median of {a.rounds} rounds, modes alternating")
    print()
    print("| mode | up MiB/s | down MiB/s | up × direct | down × direct |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode in ("direct", "relay"):
        up, down = med[(mode, "up")], med[(mode, "down")]
        print(f"| {mode} | {up:.0f} | {down:.0f} | "
              f"{up / med[('direct', 'up')]:.2f}× | {down / med[('direct', 'down')]:.2f}× |")
    print()
    # Which node the budget binds: the one with the most CPU per byte.
    names = list(net.ports)
    gib = a.rounds * n / (1 << 30)
    print("| CPU s/GiB | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for (mode, d), used in cpu.items():
        cells = " | ".join(f"{used.get(x, 0.0) / gib:.2f}" for x in names)
        print(f"| {mode} {d} | {cells} |")
    print()
    for k, v in res.items():
        print(f"- {k[0]} {k[1]} per round, MiB/s: {[round(x) for x in v]}")
    if setups:
        print(f"- circuit setup, 3 hops ({len(setups)} builds, whole ms as the client "
              f"measures them): p50 {statistics.median(setups):.0f} ms, max {max(setups)} ms")


if __name__ == "__main__":
    sys.exit(main())
