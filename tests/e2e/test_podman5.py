"""The stack users run today: rootless podman 5 with pasta and crun 1.21 (Debian 13), end to end.

The containers run in the second test bed (tests/bed13.py): podman 5 inside a
Debian 13 root, in the test namespace, with pasta, podman 5's default
network.  pasta copies the host's b4ns0 addresses and routes into each
container (198.18.0.1/24, 2001:db8::1/64), answers DNS on 169.254.1.1
(forwarding to the host's nameserver: a dnsmasq on 198.18.1.53 here) and maps
169.254.1.2 (host.containers.internal) to the host.  The daemon runs as
tests/e2e/daemon.py starts it (host python3, test user, test namespace), with
the options a podman 5 user would give it: --ignore=127.0.0.0/8,10.0.0.0/8,auto
and the default (TCP) profile, merged into podman 5's own seccomp.json.

The core tests of the podman 4.3 bed run here too, on their own code (imported,
not copied): the fd-swap race (tests/fd_swap.py) and test_bypass.py's hostile
sequences never reach the test namespace's loopback, test_strict.py's unix-socket
behaviours hold, connected UDP sockets are switched and the daemon's -p publishes
UDP, the merged profile keeps podman 5's denials (test_profile.py's probe), and
`auto` keeps a podman bridge network's subnet (netavark) in the container.

Each test checks what a user expects, not what today's daemon does.
"""

import functools
import ipaddress
import json
import os
import random
import re
import socket
import struct
import subprocess
import textwrap
import time
import uuid

import pytest

import bed13
import fd_swap
from e2e.daemon import Daemon, generate_profile, run
from e2e.fileserver import serve_file
from e2e.test_bypass import (  # two fixtures among them: the loopback's counting servers, a UDP echo server
    HOLD_CONNECTION, HOSTILE, held_connection, host_loopback_servers, local_ports, udp_echo)
from e2e.test_profile import DENIAL_PROBE
from e2e.test_publish import UDP_CLIENT, UDP_SERVER
from e2e.test_strict import UNIX_SOCKETS

IGNORE = "--ignore=127.0.0.0/8,10.0.0.0/8,auto"
DNS_NAME = "peer.b4ns.test"
GUEST_DNS = "169.254.1.1"        # pasta's DNS forwarder (podman >= 5.0)
GUEST_HOST = "169.254.1.2"       # host.containers.internal (podman >= 5.3)


@pytest.fixture(scope="module")
def bed(testbed):
    """The podman 5 bed, brought up (idempotently)."""
    bed13.up()
    return bed13


@pytest.fixture(scope="module")
def published_port(testbed):
    return testbed.free_port()


@pytest.fixture(scope="module")
def published_udp_port(testbed):
    return testbed.free_port()


def serving(args):
    """A module fixture's Daemon of args with podman 5's profile merged in: stopped at the end, its log clean."""
    d = Daemon(args, base=bed13.default_profile_base())
    yield d
    assert d.stop() == 0
    assert "ERROR" not in d.log() and "Traceback" not in d.log(), d.log()[-3000:]


@pytest.fixture(scope="module")
def daemon(testbed, bed, published_port, published_udp_port):
    yield from serving([IGNORE, "-p", "%s:%d:80" % (testbed.HOST_IP4, published_port),
                        "-p", "%s:%d:53/udp" % (testbed.HOST_IP4, published_udp_port)])


@pytest.fixture(scope="module")
def dns_server(testbed, bed):
    """dnsmasq (the host's, Debian 12; tests/bed13.py installs it) in the test namespace on NAMESERVER:53,
    UDP and TCP: pasta's upstream."""
    proc = testbed.start_server(
        ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
         "--bind-interfaces", "--listen-address=" + bed.NAMESERVER, "--port=53", "--user=nobody",
         "--pid-file=", "--log-queries", "--log-facility=-",
         "--address=/%s/%s" % (DNS_NAME, testbed.HOST_IP4_B)])  # its log goes to pytest's captured output
    # Ours, not another server's: dnsmasq exits at once when it cannot bind.
    for _ in range(200):
        if "pid=%d," % proc.pid in run(testbed.in_netns(["ss", "-Htlnp", "sport = :53"])).stdout:
            break
        assert proc.poll() is None, "dnsmasq exited %d (its log is in the captured output)" % proc.returncode
        time.sleep(0.05)
    else:
        raise TimeoutError("dnsmasq did not listen on %s:53" % bed.NAMESERVER)
    yield proc
    testbed.stop_server(proc)


def container_python(bed, daemon, code, args=(), extra=(), timeout=120, runtime="crun", network="pasta",
                     profile=None):
    """Run python3 code in a podman 5 container (pasta, crun) with the daemon's profile (or `profile`: a
    path, or "" for podman's own); return its stdout.

    A failure raises with the container's stderr and the daemon's last decisions."""
    seccomp = daemon.profile if profile is None else profile or None
    argv = bed.run_container(["python3", "-c", textwrap.dedent(code), *map(str, args)], seccomp=seccomp,
                             extra=extra, runtime=runtime, network=network)
    result = run(argv, timeout=timeout)
    assert result.returncode == 0, "container exited %d: %s\ndaemon's last decisions: %s" % (
        result.returncode, result.stderr.strip()[-1500:], daemon.decisions()[-3:])
    return result.stdout


@pytest.fixture
def http(testbed, server, tmp_path):
    """serve(host) -> (port, body) of a file served by python3 -m http.server in the test namespace."""
    return functools.partial(serve_file, testbed, server, tmp_path)


FETCH = """
    import json, socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"GET /index.txt HTTP/1.0\\r\\n\\r\\n")
    data = s.makefile("rb").read().decode(errors="replace")
    print(json.dumps({"sockname": s.getsockname()[:2], "body": data.split("\\r\\n\\r\\n", 1)[-1]}))
"""


def where(host, port):
    return ("%s:%d" if ":" not in host else "[%s]:%d") % (host, port)


# -- TCP to the host's addresses ------------------------------------------------

@pytest.mark.parametrize("runtime", ["crun", "runc"])
@pytest.mark.parametrize("host_ip", ["198.18.1.1", "2001:db8:1::1"])
def test_connect_to_the_hosts_other_address_is_bypassed(testbed, bed, daemon, http, host_ip, runtime):
    """The namespace's second address, in no subnet pasta copied: the socket is switched to the host."""
    port, body = http(host_ip)
    seen = json.loads(container_python(bed, daemon, FETCH, [host_ip, port], runtime=runtime))
    assert seen["body"] == body
    assert seen["sockname"][0] == host_ip, "the socket should be the host's (pasta rewrites the source port only)"
    assert (where(host_ip, port), "bypassed") in daemon.decisions()


@pytest.mark.parametrize("peer", [bed13.LAN_PEER4, bed13.LAN_PEER6])
def test_connect_to_a_lan_peer_in_the_copied_subnet_is_bypassed(testbed, bed, daemon, http, peer):
    """A peer in the subnet pasta copied from the host (198.18.0.0/24, 2001:db8::/64) is another
    machine, not the container: only the container's own addresses must stay in it, not the whole
    copied subnet."""
    port, body = http(peer)
    seen = json.loads(container_python(bed, daemon, FETCH, [peer, port]))
    assert seen["body"] == body
    assert (where(peer, port), "bypassed") in daemon.decisions()


OWN_ADDRESS = """
    import socket, sys, threading
    host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(8)
    def serve():
        conn = srv.accept()[0]
        conn.sendall(token.encode())
        conn.close()
    threading.Thread(target=serve, daemon=True).start()
    c = socket.create_connection((host, port), timeout=10)
    print(c.makefile("rb").read().decode())
"""

# A server that answers each connection with argv[3] and closes it.
DECOY = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
while True:
    c = s.accept()[0]
    c.sendall(sys.argv[3].encode())
    c.close()
"""


@pytest.mark.parametrize("own_ip", ["198.18.0.1", "2001:db8::1"])
def test_the_containers_own_address_is_the_container(testbed, bed, daemon, server, own_ip):
    """pasta gives the container a copy of the host's address: a connect to it reaches the container's
    own server, not the host's server on the same address and port."""
    port = testbed.free_port(own_ip)
    server(["python3", "-c", DECOY, own_ip, str(port), "the host's decoy"])
    testbed.wait_port(own_ip, port)
    token = "container-" + uuid.uuid4().hex
    assert container_python(bed, daemon, OWN_ADDRESS, [own_ip, port, token]).strip() == token
    assert (where(own_ip, port), "bypassed") not in daemon.decisions()


def test_host_containers_internal_reaches_the_host(testbed, bed, daemon, http):
    """host.containers.internal (169.254.1.2, which pasta maps to the host's 198.18.0.1) reaches
    the host's server."""
    port, body = http(testbed.HOST_IP4)
    code = """
    import socket
    print(socket.gethostbyname("host.containers.internal"))
""" + FETCH
    out = container_python(bed, daemon, code, ["host.containers.internal", port], timeout=60)
    lines = out.splitlines()
    assert lines[:1] == [GUEST_HOST], out
    assert len(lines) == 2 and json.loads(lines[1])["body"] == body, (out, daemon.decisions()[-3:])


def test_tcp_connection_lives_in_the_host_namespace(testbed, bed, daemon, http):
    """A bypassed connection is in the host's socket table, not in the container's (pasta's)."""
    host_ip = testbed.HOST_IP4_B
    port, body = http(host_ip)
    argv = bed.run_container(["python3", "-c", textwrap.dedent(HOLD_CONNECTION), host_ip, str(port)],
                             seccomp=daemon.profile, extra=["-i"])
    seen, host_table = held_connection(testbed, argv)
    local_ip, local_port = seen["sockname"]
    assert local_ip == host_ip and seen["peername"] == [host_ip, port] and "200 OK" in seen["response"]
    assert local_port in local_ports(host_table), "not in the host namespace's socket table"
    assert local_port not in local_ports(seen["container_tables"]), "still in the container's socket table"


def test_iperf3_both_directions_is_bypassed(testbed, bed, daemon, server):
    """iperf3 (Debian 13's, in the container) to the host's second address: its control and data
    connections are the host's, both ways."""
    port = testbed.free_port(testbed.HOST_IP4_B)
    for reverse in ([], ["-R"]):
        iperf = server(["iperf3", "-s", "-1", "-B", testbed.HOST_IP4_B, "-p", str(port)], stdout=subprocess.DEVNULL)
        for _ in range(200):  # iperf3 -s -1 serves one client: look for its socket, do not connect
            if ":%d " % port in run(testbed.in_netns(["ss", "-Htln"])).stdout + " ":
                break
            time.sleep(0.05)
        argv = bed.run_container(["iperf3", "-c", testbed.HOST_IP4_B, "-p", str(port), "-t", "1", "-J"] + reverse,
                                 seccomp=daemon.profile)
        result = run(argv, timeout=60)
        assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-1000:]
        report = json.loads(result.stdout)
        assert report["start"]["connected"][0]["local_host"] == testbed.HOST_IP4_B, "not bypassed (pasta)"
        assert report["end"]["sum_received"]["bytes"] > 0 and report["end"]["sum_sent"]["bytes"] > 0
        iperf.wait(30)


# -- DNS through pasta's forwarder ---------------------------------------------------

def dns_query(name, qid=0x4242):
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + labels + struct.pack("!HH", 1, 1)


# A query (hex) to server:port and its answer, over a connected UDP socket or TCP (with DNS's length
# prefix); prints {"answer": hex, "sockname": the socket's address}.
DNS_PROBE = """
    import json, socket, struct, sys
    server, port, proto, query = sys.argv[1], int(sys.argv[2]), sys.argv[3], bytes.fromhex(sys.argv[4])
    if proto == "udp":
        # As glibc's resolver does: connect, then send.
        s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.connect((server, port))
        s.send(query)
        answer = s.recv(4096)
    else:
        s = socket.create_connection((server, port), timeout=5)
        s.sendall(struct.pack("!H", len(query)) + query)
        f = s.makefile("rb")
        answer = f.read(struct.unpack("!H", f.read(2))[0])
    print(json.dumps({"answer": answer.hex(), "sockname": s.getsockname()[0]}))
"""


def answer_address(answer):
    """The last 4 bytes of a one-A-record answer, as a dotted quad, if it answers the query."""
    qid, flags, _qd, ancount = struct.unpack("!HHHH", answer[:8])
    assert qid == 0x4242 and flags & 0x8000 and flags & 0xF == 0 and ancount == 1, answer.hex()
    return socket.inet_ntoa(answer[-4:])


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dns_through_pastas_forwarder(testbed, bed, daemon, dns_server, proto):
    """A query to 169.254.1.1:53 is answered (pasta forwards it to the host's nameserver): the
    link-local address is never bypassed, over UDP (whose connected sockets are switched
    elsewhere) and TCP."""
    out = json.loads(container_python(bed, daemon, DNS_PROBE, [GUEST_DNS, 53, proto, dns_query(DNS_NAME).hex()],
                                      timeout=60))
    assert answer_address(bytes.fromhex(out["answer"])) == testbed.HOST_IP4_B
    assert out["sockname"] == testbed.HOST_IP4, "the socket left the container (pasta's copy of the host's address)"


def test_getaddrinfo_resolves_through_resolv_conf(testbed, bed, daemon, dns_server):
    """What applications do: glibc's resolver with podman's resolv.conf (169.254.1.1 first)."""
    code = """
        import socket, sys
        print(socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    """
    out = container_python(bed, daemon, code, [DNS_NAME], timeout=60)
    assert out.strip() == testbed.HOST_IP4_B


# -- publishing ---------------------------------------------------------------------

SERVE_ONCE = """
    import socket, sys
    token = sys.argv[1]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 80))
    s.listen(8)
    print("listening", flush=True)
    c = s.accept()[0]
    c.sendall(token.encode())
    c.close()
"""

GET_TOKEN = """
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
for attempt in range(100):
    try:
        s = socket.create_connection((host, port), timeout=5)
        print(s.makefile("rb").read().decode())
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
"""


def serve_in_container(testbed, bed, daemon, extra=()):
    """A container serving one connection on its port 80; returns (Popen, token)."""
    token = "published-" + uuid.uuid4().hex
    argv = bed.run_container(["python3", "-c", textwrap.dedent(SERVE_ONCE), token], seccomp=daemon.profile,
                             extra=extra)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    return proc, token


def assert_published(testbed, daemon, host_port, container):
    """The daemon published the container's bind of 0.0.0.0:PORT as 198.18.0.1:host_port (container: "PORT/PROTO")."""
    published = "published as %s:%d->%s" % (testbed.HOST_IP4, host_port, container)
    assert any(dest == "0.0.0.0:" + container.split("/")[0] and outcome.startswith(published)
               for dest, outcome in daemon.decisions("bind")), daemon.decisions("bind")


def test_published_bind_is_reachable_from_the_host(testbed, bed, daemon, published_port):
    """The daemon's -p 198.18.0.1:PORT:80: a server binding port 80 in the container listens on the host."""
    proc, token = serve_in_container(testbed, bed, daemon)
    try:
        assert proc.stdout.readline().strip() == "listening", proc.stderr.read() if proc.poll() is not None else ""
        got = run(testbed.in_netns(["python3", "-c", GET_TOKEN, testbed.HOST_IP4, str(published_port)]),
                  timeout=60).stdout.strip()
    finally:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert got == token
    assert_published(testbed, daemon, published_port, "80/tcp")



BIND_80 = """
    import errno, socket
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", 80))
        print("bound")
    except OSError as e:
        print(errno.errorcode[e.errno])
"""


def test_podmans_own_publish_and_the_daemons_collide_and_the_daemon_says_what_to_do(testbed, bed):
    """podman's -p P:80 (pasta binds P) and the daemon's -p P:80 for the same port: with the port
    reserved (the default) pasta cannot bind it and podman does not start the container; with
    --no-reserve-ports pasta takes it, the container's bind gets EADDRINUSE, and the daemon logs
    which port and that it should be published one way only."""
    port = testbed.free_port()
    reserved = Daemon([IGNORE, "-p", "%d:80" % port], base=bed.default_profile_base())
    try:
        argv = bed.run_container(["python3", "-c", textwrap.dedent(BIND_80)], seccomp=reserved.profile,
                                 extra=["-p", "%d:80" % port])
        result = run(argv, timeout=120)
        assert result.returncode != 0 and "Address already in use" in result.stderr, result.stderr[-1000:]
    finally:
        assert reserved.stop() == 0
    shared = Daemon([IGNORE, "--no-reserve-ports", "-p", "%d:80" % port], base=bed.default_profile_base())
    try:
        out = container_python(bed, shared, BIND_80, extra=["-p", "%d:80" % port])
        assert out.strip() == "EADDRINUSE"
        assert re.search(r"WARNING container \S+: %d->80/tcp: host port %d/tcp is taken by another process, so the "
                         r"container's bind of port 80 fails \(EADDRINUSE\); if that is the runtime's own -p"
                         % (port, port), shared.log()), shared.log()[-2000:]
    finally:
        assert shared.stop() == 0


@pytest.fixture
def detached(bed):
    """start(cmd, **run_container's keywords) -> the name of a detached podman 5 container, removed at the end."""
    names = []

    def start(cmd, **kwargs):
        names.append("b4ns-p5-" + uuid.uuid4().hex[:8])
        run(bed.run_container(cmd, extra=["-d"], name=names[-1], **kwargs), check=True)
        return names[-1]
    yield start
    for name in names:
        run(bed.podman(["rm", "-f", "-t", "0", name]))


def test_published_udp_port_answers_from_the_host(testbed, bed, daemon, detached, published_udp_port):
    """The daemon's -p 198.18.0.1:PORT:53/udp (test_publish.py's UDP server and client): a UDP server
    binding port 53 in the container is the host's socket: a client on the host's other address gets
    its answer, and the server sees that client's own address."""
    detached(["python3", "-c", UDP_SERVER], seccomp=daemon.profile)
    out = run(testbed.in_netns(["python3", "-c", UDP_CLIENT, testbed.HOST_IP4, str(published_udp_port),
                                testbed.HOST_IP4_B]), check=True, timeout=60).stdout
    assert out.split() == ["ping", testbed.HOST_IP4_B], daemon.decisions("bind")
    assert_published(testbed, daemon, published_udp_port, "53/udp")


# -- UDP ------------------------------------------------------------------------------

@pytest.mark.parametrize("host_ip", ["198.18.1.1", "2001:db8:1::1"])
def test_connected_udp_socket_is_switched(testbed, bed, daemon, udp_echo, host_ip):
    """A connected IPv6 UDP socket to the host's other address (test_bypass.py's echo server) is
    switched at its connect: its address is the host's, not pasta's copy (2001:db8::1), and the echo
    comes back to it.  An IPv4 one stays in the container (pasta's socket), where the echo comes
    back too: IP_PKTINFO would take its datagrams past a pin."""
    port = udp_echo(host_ip)
    out = json.loads(container_python(bed, daemon, DNS_PROBE, [host_ip, port, "udp", b"ping".hex()]))
    assert bytes.fromhex(out["answer"]) == b"echo:ping"
    if ":" in host_ip:
        assert out["sockname"] == host_ip, "not switched: pasta's socket"
        assert (where(host_ip, port), "bypassed") in daemon.decisions()
    else:
        assert out["sockname"] != host_ip, "switched"
        assert (where(host_ip, port), "container (IPv4 UDP: its datagrams' IP_PKTINFO would pass the pin)") \
            in daemon.decisions()


# -- race and safety ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def race_daemon(testbed, bed):
    """The fd-swap race's daemon (as test_strict.py's): a published port, for the bind vector's host
    socket.  Without `auto`: the connect vector's bypassed connection goes to 198.18.0.1 (fd_swap.py),
    which `auto` keeps in the container on pasta (the container's copy of the host's address)."""
    yield from serving(["--ignore=127.0.0.0/8,10.0.0.0/8", "-p", "%d:80" % testbed.free_port()])


@pytest.fixture
def loopback_server(testbed, server):
    """tests/fd_swap.py's LOOPBACK_SERVER, listening: (its port on 127.0.0.1, its silent port on
    198.18.0.1, printed()): printed() stops it and returns what it printed (each loopback connection)."""
    ports = testbed.free_port(host="127.0.0.1"), testbed.free_port()
    proc = server(["python3", "-c", fd_swap.LOOPBACK_SERVER, *map(str, ports)], stdout=subprocess.PIPE,
                  universal_newlines=True)
    assert proc.stdout.readline().strip() == "listening"

    def printed():
        testbed.stop_server(proc)
        return proc.stdout.read()
    return ports + (printed,)


@pytest.mark.parametrize("vector", ["bind", "connect"])
def test_the_fd_swap_race_never_reaches_the_hosts_loopback(testbed, bed, race_daemon, loopback_server, vector):
    """tests/fd_swap.py's race, 8 s, under podman 5 and crun 1.21 (README, "Swapping the fd"): a
    thread keeps putting a host socket (a published port's bound one; a bypassed connection,
    disconnected before each attempt) and a unix socket in turn at one fd number while another
    connects that fd to a server on 127.0.0.1 of the test namespace: it never gets in."""
    secret, bypassed, printed = loopback_server
    out = container_python(bed, race_daemon, fd_swap.SWAPPER, [secret, 8, vector, bypassed], timeout=180)
    accepted = printed()
    assert "never connected" in out and not accepted, (out, accepted)
    assert int(out.split()[0]) > 1000, out     # the race was run, many times
    # with a host socket in it: the published port's, or the bypassed connection's
    call, dest, outcome = {"bind": ("bind", "0.0.0.0:80", "published as "),
                           "connect": ("connect", where(testbed.HOST_IP4, bypassed), "bypassed")}[vector]
    assert any(d == dest and o.startswith(outcome) for d, o in race_daemon.decisions(call)), race_daemon.decisions(call)


def test_hostile_sequences_never_reach_the_hosts_loopback(testbed, bed, daemon, http, host_loopback_servers):
    """test_bypass.py's hostile sequences, with the user's flags (`auto`), against the namespace's
    other addresses (its first ones are the container's own on pasta): a bypassed TCP connection
    disconnected (AF_UNSPEC) and reconnected to the loopback (v4, v6, v4-mapped), a failed
    non-blocking connect retried there, a connected UDP socket sending there (also with IP_PKTINFO
    or IPV6_PKTINFO naming the loopback interface), disconnected and sending again, and connected
    there.  Each host socket is pinned to its interface (the container cannot unpin it), each
    trapped call to the loopback is refused, IPv4 UDP stays in the container (pasta's), and nothing
    reaches the loopback's servers."""
    loopback_port, reached = host_loopback_servers
    port, _body = http("::")
    four, six = testbed.HOST_IP4_B, testbed.HOST_IP6_B
    out = json.loads(container_python(bed, daemon, HOSTILE, [four, six, port, loopback_port]))
    # What the kernel made of the plain UDP sends to the loopback: reached() says where they went.
    sent = {key: [out[key].pop(9), out[key].pop(3)] for key in ("udp 127.0.0.1", "udp ::1")}
    v4 = out.pop("udp 127.0.0.1")
    assert v4[0] != four and v4[1:3] == ["", "UNPINNED"] and v4[4:7] == ["-", 0, ""], (v4, sent)
    pinned, refused = [testbed.VETH_B, "EPERM"], "ENETUNREACH"
    assert out == {
        "tcp 127.0.0.1": [four, *pinned, 0, refused],
        "tcp ::1": [six, *pinned, 0, refused],
        "tcp ::ffff:127.0.0.1": ["::ffff:" + four, *pinned, 0, refused],
        "failed": ["EINPROGRESS", "EHOSTUNREACH", four, refused],  # nobody answers ARP for .77
        "udp ::1": [six, *pinned, "EINVAL", refused, 0, *pinned, refused],
    }, (out, sent)
    time.sleep(0.5)  # what was sent had time to arrive, had it been able to
    assert reached() == []


def test_unix_socket_calls_are_made_as_the_calling_thread(testbed, bed, daemon):
    """test_strict.py's unix-socket program under podman 5 and crun 1.21: the helper makes each call
    with the caller's ids, umask, working directory and namespaces."""
    out = json.loads(container_python(bed, daemon, UNIX_SOCKETS, timeout=180))
    assert out == {
        "root_bind": ["0o750", 0, 0],                   # the caller's umask and ids
        "sockname": "root.sock",                        # the name as the program gave it (relative)
        "user_bind": ["0o755", 1000, 1000],             # a non-root caller owns its socket
        "user_connect": ["connected", [1000, 1000]],    # the server reads the caller's ids
        "user_denied": "EACCES",                        # and the file's permissions hold for it
        "root_connect": ["connected", [0, 0]],
        "abstract": "b4ns-strict",                      # in the container's network namespace
        "fastopen": "EOPNOTSUPP",
    }
    assert "namespace helper pid" in daemon.log()


# -- the profile ----------------------------------------------------------------------------

def denials(bed, daemon, profile):
    """test_profile.py's DENIAL_PROBE in a podman 5 container under profile ("": podman's own)."""
    return dict(line.split() for line in container_python(bed, daemon, DENIAL_PROBE, profile=profile).splitlines())


def test_merged_profile_keeps_podman5s_denials(testbed, bed, daemon):
    """The daemon's profile, merged into podman 5's own seccomp.json, denies what podman 5 denies,
    with the same answers; the allow-all profile (--base none) gives the kernel's answers but for
    io_uring, which it denies too (seccomp never sees io_uring's socket calls)."""
    allow_all = generate_profile(daemon.socket, base="none")
    try:
        podman, merged, given_away = (denials(bed, daemon, profile) for profile in ("", daemon.profile, allow_all))
    finally:
        os.unlink(allow_all)
    assert merged == podman
    assert podman == {"add_key": "ENOSYS", "request_key": "ENOSYS", "userfaultfd": "EPERM",
                      "io_uring_setup": "ENOSYS", "personality": "ENOSYS"}
    assert {name for name in podman if given_away[name] == podman[name]} == {"io_uring_setup"}, given_away


def test_a_container_without_the_profile_is_left_alone(testbed, bed, daemon, http):
    """podman 5's own profile traps nothing: the connection goes through pasta (its socket has the
    container's address, pasta's copy of the host's) and the daemon sees none of it."""
    host_ip = testbed.HOST_IP4_B
    port, body = http(host_ip)
    seen = json.loads(container_python(bed, daemon, FETCH, [host_ip, port], profile=""))
    assert seen["body"] == body
    assert seen["sockname"][0] == testbed.HOST_IP4
    assert not [outcome for dest, outcome in daemon.decisions() if dest == where(host_ip, port)]


# -- a podman bridge network ------------------------------------------------------------------

@pytest.fixture
def bridge(bed):
    """A podman bridge network (netavark, rootless) on a /24 of the test range outside the daemon's
    --ignore CIDRs, 198.19.N.0/24: only `auto` can keep it in the container.  (name, subnet)."""
    name = "b4ns-p5-" + uuid.uuid4().hex[:8]
    for third in random.sample(range(64, 250), 8):  # another run may hold one
        subnet = "198.19.%d.0/24" % third
        created = run(bed.podman(["network", "create", "--subnet", subnet, name]), timeout=60)
        if created.returncode == 0:
            break
    else:
        raise AssertionError("podman network create: %s" % created.stderr)
    yield name, subnet
    run(bed.podman(["network", "rm", "-f", name]), timeout=120)


GET_TOKEN_BY_NAME = """
import socket, sys
print(socket.gethostbyname(sys.argv[1]))
""" + GET_TOKEN


def test_auto_keeps_a_bridge_networks_subnet_in_the_container(testbed, bed, daemon, bridge, detached):
    """On a podman bridge network the subnet is the container's own (no copy of a host address):
    `auto` keeps it whole, so a connect to another container on the bridge, found by its name
    (aardvark-dns), stays on the bridge and reaches it."""
    network, subnet = bridge
    token = "bridge-" + uuid.uuid4().hex
    peer = detached(["python3", "-c", DECOY, "0.0.0.0", "8080", token], network=network)
    out = container_python(bed, daemon, GET_TOKEN_BY_NAME, [peer, 8080], network=network, timeout=60)
    address, got = out.split()
    assert got == token, out
    assert ipaddress.ip_address(address) in ipaddress.ip_network(subnet), (address, subnet)
    assert (where(address, 8080), "container (auto-ignored %s)" % subnet) in daemon.decisions()
