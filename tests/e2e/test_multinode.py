"""--multinode, end to end: two nodes, a real etcd (Debian's etcd-server) in the test
namespace, rootless podman.

A node is a rootless user with its own daemon, host address and podman bridge network:
the test user on 198.18.0.1 with 10.89.71.0/24, and a second user on 198.18.1.1 with
10.89.72.0/24 (both host addresses are the test namespace's: the nodes' "host").  Each
user's rootless network namespace holds its bridge, so nothing routes between the two
networks: node B's container reaches node A's by its container address only through
etcd and node A's host.
"""

import collections
import contextlib
import json
import os
import signal
import subprocess
import textwrap
import time
import uuid

import pytest

from e2e.daemon import Daemon, run
from e2e.test_c2c import FETCH

# user -> (its podman network, subnet), filled in by the nodes fixture
NETWORKS = {}

ETCD_RANGE = """
import base64, json, sys, urllib.request
prefix = "bypass4netns/multinode/"
body = {"key": base64.b64encode(prefix.encode()).decode(),
        "range_end": base64.b64encode(prefix[:-1].encode() + b"0").decode()}
request = urllib.request.Request(sys.argv[1] + "/v3/kv/range", json.dumps(body).encode())
kvs = json.load(urllib.request.urlopen(request, timeout=5)).get("kvs", [])
print(json.dumps({base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]).decode() for kv in kvs}))
"""


@pytest.fixture
def etcd(testbed):
    """(etcd's client URL, its Popen), inside the test namespace."""
    url, proc, data = testbed.start_etcd()
    yield url, proc
    testbed.stop_etcd(proc, data)


def keys(testbed, url):
    return json.loads(run(testbed.in_netns(["python3", "-c", ETCD_RANGE, url]), check=True).stdout)


def node(url, host, user, extra=()):
    return Daemon(["--multinode", "--multinode-etcd-address", url, "--multinode-host-address", host,
                   "--ignore", "10.0.0.0/8", *extra], user=user)


@pytest.fixture
def nodes(testbed, etcd):
    """Node A (the test user) and node B (the second user): their Daemons."""
    url, _proc = etcd
    testbed.ensure_second_user()
    NETWORKS.update({testbed.USER: "b4ns-c2c-a", testbed.USER_B: "b4ns-mn-b"})
    for user, (name, subnet) in ((testbed.USER, ("b4ns-c2c-a", "10.89.71.0/24")),
                                 (testbed.USER_B, ("b4ns-mn-b", "10.89.72.0/24"))):
        if run(testbed.podman(["network", "exists", name], user=user)).returncode != 0:
            run(testbed.podman(["network", "create", "--subnet", subnet, name], user=user), check=True)
    a, b = node(url, testbed.HOST_IP4, testbed.USER), node(url, testbed.HOST_IP4_B, testbed.USER_B)
    yield a, b
    for d in (a, b):
        if d.proc.poll() is None:
            assert d.stop() == 0
        assert "Traceback" not in d.log(), d.log()[-3000:]


Served = collections.namedtuple("Served", "address host_port body key")


@contextlib.contextmanager
def served(testbed, d, host_port=None):
    """An HTTP server container of node `d` on its network, publishing its port 80 itself, or
    through the daemon's -p HOST_PORT:80 if `host_port` is given: Served(container address,
    host port, body, its etcd key); removed at the end."""
    name = "b4ns-mn-" + uuid.uuid4().hex[:8]
    body = "b4ns-" + uuid.uuid4().hex
    extra = ["-d"]
    if host_port is None:
        host_port = testbed.free_port()
        extra += ["--annotation", "bypass4netns.publish=%d:80" % host_port]
    run(testbed.run_container(
        ["sh", "-c", "echo %s > /tmp/index.txt && exec python3 -m http.server 80 --directory /tmp" % body],
        network=NETWORKS[d.user], name=name, seccomp=d.profile, user=d.user, extra=extra), check=True)
    try:
        address = run(testbed.podman(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                                      name], user=d.user), check=True).stdout.strip()
        testbed.wait_port("127.0.0.1", host_port)
        yield Served(address, host_port, body, "bypass4netns/multinode/%s:80" % address)
    finally:
        run(testbed.podman(["rm", "-f", "-t", "0", name], user=d.user), check=True)


def fetch(testbed, d, address, seccomp=True):
    """What a container of node `d` on its network gets from address:80 (without the
    daemon's profile if not `seccomp`)."""
    argv = testbed.run_container(["python3", "-c", textwrap.dedent(FETCH), address, "80"], user=d.user,
                                 network=NETWORKS[d.user], seccomp=d.profile if seccomp else None)
    return json.loads(run(argv, timeout=120, check=True).stdout)


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_container_reaches_another_nodes_container_by_its_address(testbed, etcd, nodes):
    url, _proc = etcd
    a, b = nodes
    with served(testbed, a) as server:
        address, host_port, body, key = server
        assert wait_for(lambda: keys(testbed, url).get(key) == "%s:%d" % (testbed.HOST_IP4, host_port))
        assert "error" in fetch(testbed, b, address, seccomp=False)  # without the tool: no way there
        # Node B reads the keys every 2 s: the first fetch may come before.
        assert wait_for(lambda: fetch(testbed, b, address) == {"body": body + "\n"}, timeout=30)
        assert ("%s:80" % address, "another node's published port, at %s:%d" % (testbed.HOST_IP4, host_port)) \
            in b.decisions()
        assert ("%s:%d" % (testbed.HOST_IP4, host_port), "bypassed") in b.decisions()
        for d, field in ((a, "registered"), (b, "nodes")):
            status = json.loads(run(testbed.as_user(["python3", d.script, "status", "--socket", d.socket, "--json"],
                                                    user=d.user), check=True).stdout)["routes"]
            assert status[field] >= 1 and status["etcd"] == url and status["agent"], status
        # While a connection is open, the host's socket table has it, to node A's host port.
        holder = subprocess.Popen(testbed.run_container(
            ["python3", "-c", "import socket, sys, time; s = socket.create_connection((sys.argv[1], 80)); "
             "print('open', flush=True); sys.stdin.readline()", address],
            user=b.user, network=NETWORKS[b.user], seccomp=b.profile, extra=["-i"]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)
        try:
            assert holder.stdout.readline().strip() == "open"
            table = run(testbed.in_netns(["cat", "/proc/net/tcp"]), check=True).stdout
            assert any(fields[2] == "%08X:%04X" % (int.from_bytes(bytes(map(int, testbed.HOST_IP4.split("."))),
                                                                  "little"), host_port) and fields[3] == "01"
                       for fields in (line.split() for line in table.splitlines()[1:])), table
        finally:
            holder.communicate("\n", timeout=60)
    assert wait_for(lambda: key not in keys(testbed, url))  # deleted when the container stops


def test_a_clean_stop_deletes_the_keys_and_a_killed_node_lets_them_expire(testbed, etcd, nodes):
    url, _proc = etcd
    a, b = nodes
    with served(testbed, a) as server:
        assert wait_for(lambda: server.key in keys(testbed, url))
        assert a.stop() == 0
        assert server.key not in keys(testbed, url)         # the lease was revoked
    with served(testbed, b) as server:
        assert wait_for(lambda: server.key in keys(testbed, url))
        os.kill(b.pid, signal.SIGKILL)                      # the keeper: the whole tree goes
        b.proc.wait(10)
        assert server.key in keys(testbed, url)
        assert wait_for(lambda: server.key not in keys(testbed, url), timeout=30)  # the 15 s lease ran out


def test_etcd_down_means_the_normal_way_and_one_warning(testbed, etcd, nodes, acceptor):
    url, proc = etcd
    a, b = nodes
    with served(testbed, a) as server:
        address = server.address
        assert wait_for(lambda: fetch(testbed, b, address) == {"body": server.body + "\n"}, timeout=30)
        testbed.stop_server(proc)
        warning = "WARNING etcd at %s" % url
        assert wait_for(lambda: warning in b.log())
        time.sleep(3)                                       # a few more failed reads
        assert b.log().count(warning) == 1, b.log()[-2000:]
        before = len(b.decisions())
        assert "error" in fetch(testbed, b, address)
        assert ("%s:80" % address, "container (ignored 10.0.0.0/8)") in b.decisions()[before:]
        # Other destinations are bypassed as ever.
        out = run(testbed.run_container(["python3", "-c", "import socket, sys; socket.create_connection("
                                         "(sys.argv[1], int(sys.argv[2])), timeout=5).close(); print('ok')",
                                         testbed.HOST_IP4, str(acceptor)], seccomp=b.profile, user=b.user),
                  check=True).stdout
        assert out.strip() == "ok"
        assert ("%s:%d" % (testbed.HOST_IP4, acceptor), "bypassed") in b.decisions()


def test_a_killed_daemon_s_keeper_puts_the_keys_again(testbed, etcd, nodes):
    """The keeper starts another daemon, whose agent puts the keys under a lease of its own
    before the dead one's runs out: they stay."""
    url, _proc = etcd
    a, b = nodes
    with served(testbed, a) as server:
        address, host_port, body, key = server
        assert wait_for(lambda: key in keys(testbed, url))
        daemon = a.daemon_pid()
        os.kill(daemon, signal.SIGKILL)
        assert wait_for(lambda: a.daemon_pid() not in (None, daemon))
        time.sleep(20)                                      # past the dead daemon's 15 s lease
        assert keys(testbed, url).get(key) == "%s:%d" % (testbed.HOST_IP4, host_port)
        assert wait_for(lambda: fetch(testbed, b, address) == {"body": body + "\n"}, timeout=30)


def test_the_daemons_own_publish_is_registered_when_a_container_binds_it(testbed, etcd, nodes):
    """The Go tool's flags: -p HOSTPORT:80 with --multinode.  The key is the binding container's
    address and port, put when it binds and deleted when it lets go; node B reaches it."""
    url, _proc = etcd
    _a, b = nodes
    host_port = testbed.free_port()
    a = node(url, testbed.HOST_IP4, testbed.USER, ["-p", "%d:80" % host_port])
    try:
        time.sleep(3)
        assert not [key for key, value in keys(testbed, url).items() if value.endswith(":%d" % host_port)]
        with served(testbed, a, host_port) as server:
            assert wait_for(lambda: keys(testbed, url).get(server.key) == "%s:%d" % (testbed.HOST_IP4, host_port))
            assert wait_for(lambda: fetch(testbed, b, server.address) == {"body": server.body + "\n"}, timeout=30)
        assert wait_for(lambda: server.key not in keys(testbed, url))
    finally:
        assert a.stop() == 0
