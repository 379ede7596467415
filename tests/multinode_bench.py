#!/usr/bin/env python3
"""Between two nodes, measured: `sudo python3 tests/multinode_bench.py [SECONDS]`.

Two nodes as in tests/e2e/test_multinode.py (two rootless users, each with its daemon
and podman bridge network, etcd in the test namespace).  Node B's container talks to a
container of node A two ways, iperf3 (one stream, each way) and a connect/close loop:

- bypassed: to the container's own address, through etcd and node A's host port, both
  containers started with their node's profile (the server publishes its ports itself);
- without the tool: to node A's host address and a port podman publishes (`-p`,
  rootlessport) for a container without the profile; node B's container on its bridge
  network, no profile.

Prints a markdown table: medians of the runs, one run per row and path, interleaved.
"""

import json
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import testbed as tb  # noqa: E402
from e2e.daemon import Daemon, run  # noqa: E402

NETWORK = {tb.USER: ("b4ns-c2c-a", "10.89.71.0/24"), tb.USER_B: ("b4ns-mn-b", "10.89.72.0/24")}
IPERF_PORT, LOOP_PORT = 5201, 7000

ACCEPT_AND_CLOSE = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4096)
while True:
    s.accept()[0].close()
"""

CONNECT_LOOP = """
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n, end = 0, time.monotonic() + seconds
start = time.monotonic()
while time.monotonic() < end:
    socket.create_connection((host, port)).close()
    n += 1
print(n / (time.monotonic() - start))
"""


def server(user, seccomp, extra):
    """A container of `user` running iperf3 -s and the accept/close server; (remove argv, address)."""
    name = "b4ns-mnb-" + uuid.uuid4().hex[:8]
    run(tb.run_container(["sh", "-c", "iperf3 -s -p %d >/dev/null & exec python3 -c '%s' %d"
                          % (IPERF_PORT, ACCEPT_AND_CLOSE, LOOP_PORT)],
                         network=NETWORK[user][0], name=name, seccomp=seccomp, user=user,
                         extra=["-d"] + extra), check=True)
    address = run(tb.podman(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name],
                            user=user), check=True).stdout.strip()
    return tb.podman(["rm", "-f", "-t", "0", name], user=user), address


def client(user, seccomp, cmd):
    argv = tb.run_container(cmd, network=NETWORK[user][0], seccomp=seccomp, user=user)
    return run(argv, timeout=300, check=True).stdout


def iperf(seccomp, host, port, seconds, reverse):
    out = client(tb.USER_B, seccomp, ["iperf3", "-J", "-c", host, "-p", str(port), "-t", str(seconds)]
                 + (["-R"] if reverse else []))
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def connect_loop(seccomp, host, port, seconds):
    return float(client(tb.USER_B, seccomp, ["python3", "-c", CONNECT_LOOP, host, str(port), str(seconds)]))


def main(seconds=5.0, rounds=3):
    tb.up()
    tb.ensure_second_user()
    for user, (name, subnet) in NETWORK.items():
        if run(tb.podman(["network", "exists", name], user=user)).returncode != 0:
            run(tb.podman(["network", "create", "--subnet", subnet, name], user=user), check=True)
    url, etcd_proc, data = tb.start_etcd()
    nodes, removes = [], []
    try:
        nodes = [Daemon(["--multinode", "--multinode-etcd-address", url, "--multinode-host-address", host,
                         "--ignore", "10.0.0.0/8"], debug=False, user=user)
                 for user, host in ((tb.USER, tb.HOST_IP4), (tb.USER_B, tb.HOST_IP4_B))]
        a, b = nodes
        iperf_host, loop_host = tb.free_port(), tb.free_port()
        remove, bypassed_address = server(tb.USER, a.profile, [
            "--annotation", "bypass4netns.publish=%d:%d %d:%d" % (iperf_host, IPERF_PORT, loop_host, LOOP_PORT)])
        removes.append(remove)
        iperf_pub, loop_pub = tb.free_port(), tb.free_port()
        remove, _address = server(tb.USER, None, ["-p", "%d:%d" % (iperf_pub, IPERF_PORT),
                                                  "-p", "%d:%d" % (loop_pub, LOOP_PORT)])
        removes.append(remove)
        time.sleep(5)  # the servers up, node B's agent has read the keys (every 2 s)
        paths = {"bypassed": (b.profile, bypassed_address, IPERF_PORT, LOOP_PORT),
                 "without the tool": (None, tb.HOST_IP4, iperf_pub, loop_pub)}
        rows = {}
        for _ in range(rounds):
            for path, (seccomp, host, iperf_port, loop_port) in paths.items():
                for what, measure in (
                        ("iperf3, node B -> node A, Gbit/s", lambda: iperf(seccomp, host, iperf_port, seconds, False)),
                        ("iperf3, node A -> node B, Gbit/s", lambda: iperf(seccomp, host, iperf_port, seconds, True)),
                        ("connect/close loop, conn/s", lambda: connect_loop(seccomp, host, loop_port, seconds))):
                    rows.setdefault(what, {}).setdefault(path, []).append(measure())
        print("| workload | without the tool | bypassed | ratio |\n|---|---:|---:|---:|")
        for what, by_path in rows.items():
            plain, fast = (sorted(by_path[p])[len(by_path[p]) // 2] for p in ("without the tool", "bypassed"))
            fmt = "%.2f" if "Gbit" in what else "%.0f"
            print("| %s | %s | %s | %.1fx |" % (what, fmt % plain, fmt % fast, fast / plain))
    finally:
        for remove in removes:
            run(remove)
        for d in nodes:
            d.stop()
        tb.stop_etcd(etcd_proc, data)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 5.0)
