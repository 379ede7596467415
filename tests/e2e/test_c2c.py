"""--handle-c2c-connections, end to end: containers on rootless podman bridge networks reach a
peer's published port at the peer's own address through the host, where their own network
reaches the peer (the policy check), and as without the tool where it does not.

The networks (10.89.71.0/24, 10.89.72.0/24) are the test user's podman networks, created
once and kept: creating them is idempotent.
"""

import json
import textwrap
import time
import uuid

import pytest

from e2e.daemon import Daemon, run

NETWORKS = {"b4ns-c2c-a": "10.89.71.0/24", "b4ns-c2c-b": "10.89.72.0/24"}

FETCH = """
    import errno, json, socket, sys
    ip, port = sys.argv[1], int(sys.argv[2])
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((ip, port))
    except OSError as e:
        print(json.dumps({"error": errno.errorcode.get(e.errno, str(e))}))
        sys.exit()
    s.sendall(b"GET /index.txt HTTP/1.0\\r\\n\\r\\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    print(json.dumps({"body": data.split(b"\\r\\n\\r\\n", 1)[-1].decode()}))
"""


@pytest.fixture(scope="module")
def networks(testbed):
    for name, subnet in NETWORKS.items():
        if run(testbed.podman(["network", "exists", name])).returncode != 0:
            run(testbed.podman(["network", "create", "--subnet", subnet, name]), check=True)
    return list(NETWORKS)


@pytest.fixture(scope="module")
def daemon(testbed, networks):
    d = Daemon(["--handle-c2c-connections", "--ignore", "10.0.0.0/8"])
    yield d
    assert d.stop() == 0
    assert "ERROR" not in d.log() and "Traceback" not in d.log(), d.log()[-3000:]


@pytest.fixture
def peer(testbed, daemon):
    """peer(daemon) -> (container id, address, host port, body) of an HTTP server container on
    the first network, publishing its port 80 itself (annotation)."""
    names = []

    def start(d=daemon):
        name = "b4ns-c2c-" + uuid.uuid4().hex[:8]
        body = "b4ns-" + uuid.uuid4().hex
        host_port = testbed.free_port()
        names.append(name)
        cid = run(testbed.run_container(
            ["sh", "-c", "echo %s > /tmp/index.txt && exec python3 -m http.server 80 --directory /tmp" % body],
            network=networks_first(), name=name, seccomp=d.profile,
            extra=["-d", "--annotation", "bypass4netns.publish=%d:80" % host_port]), check=True).stdout.strip()
        address = run(testbed.podman(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                                      name]), check=True).stdout.strip()
        testbed.wait_port("127.0.0.1", host_port)  # listening on the host: it was published
        return cid, address, host_port, body
    yield start
    for name in names:
        run(testbed.podman(["rm", "-f", "-t", "0", name]))


def networks_first():
    return next(iter(NETWORKS))


def fetch(testbed, d, network, address):
    argv = testbed.run_container(["python3", "-c", textwrap.dedent(FETCH), address, "80"], network=network,
                                 seccomp=d.profile)
    return json.loads(run(argv, timeout=120, check=True).stdout)


def outcomes(d, address):
    return [outcome for dest, outcome in d.decisions() if dest == "%s:80" % address]


@pytest.mark.parametrize("network", list(NETWORKS))
def test_a_peers_port_is_reached_through_the_host(testbed, daemon, peer, network):
    """Through the host: a peer on the same network, and one on another network (podman's
    rootless networks reach each other here, so the policy lets it through too)."""
    _cid, address, host_port, body = peer()
    assert fetch(testbed, daemon, network, address) == {"body": body + "\n"}
    assert outcomes(daemon, address) == ["a peer's published port, at 127.0.0.1:%d" % host_port]
    assert ("127.0.0.1:%d" % host_port, "bypassed") in daemon.decisions()


def test_a_container_whose_network_does_not_reach_the_peer_is_refused_as_without_the_tool(testbed, daemon, peer):
    _cid, address, _host_port, _body = peer()
    assert fetch(testbed, daemon, "none", address) == {"error": "ENETUNREACH"}
    assert outcomes(daemon, address) == ["container (a peer its network does not reach)"]


def test_no_policy_check_lets_every_container_through(testbed, networks, peer):
    d = Daemon(["--handle-c2c-connections", "--no-policy-check", "--ignore", "10.0.0.0/8"])
    try:
        _cid, address, host_port, body = peer(d)
        assert fetch(testbed, d, "none", address) == {"body": body + "\n"}
        assert outcomes(d, address) == ["a peer's published port, at 127.0.0.1:%d" % host_port]
    finally:
        assert d.stop() == 0


def test_a_peer_that_is_gone_is_not_reached(testbed, daemon, peer):
    cid, address, _host_port, _body = peer()
    run(testbed.podman(["rm", "-f", "-t", "0", cid]), check=True)
    deadline = time.monotonic() + 10
    while "container %s: gone" % cid[:12] not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    before = len(outcomes(daemon, address))
    assert "error" in fetch(testbed, daemon, networks_first(), address)
    assert outcomes(daemon, address)[before:] == ["container (ignored 10.0.0.0/8)"]


def test_an_address_a_peer_gains_is_routed_too(testbed, daemon, peer):
    """`podman network connect` gives a running peer a second address: the daemon reads the
    containers' addresses again every 10 s."""
    cid, _address, host_port, body = peer()
    other = list(NETWORKS)[1]
    run(testbed.podman(["network", "connect", other, cid]), check=True)
    inspect = run(testbed.podman(["inspect", "-f", "{{json .NetworkSettings.Networks}}", cid]), check=True).stdout
    address = json.loads(inspect)[other]["IPAddress"]
    routed = "a peer's published port, at 127.0.0.1:%d" % host_port
    deadline = time.monotonic() + 30
    result = None
    while routed not in outcomes(daemon, address) and time.monotonic() < deadline:
        result = fetch(testbed, daemon, other, address)   # through its network till then: refused
        time.sleep(1)
    assert result == {"body": body + "\n"}
