"""Port publishing (-p), end to end: servers in rootless containers listen on the host.

Clients run in the test namespace (the "host"); each test starts its own
daemon with its own -p mappings, whose host ports are reserved at start.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import textwrap
import time
import uuid

import pytest

from e2e.daemon import Daemon, run

RUNTIMES = ["runc", "crun"]

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log stderr;
pid /tmp/nginx.pid;
events { worker_connections 64; }
http {
    access_log /logs/access.log;
    client_body_temp_path /tmp/body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    server {
        listen 80;
        location / { return 200 "%s\\n"; }
    }
}
"""

FETCH = textwrap.dedent("""
    import socket, sys
    host, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for attempt in range(100):  # the server in the container may not listen yet
        s = socket.socket(family)
        if source != "-":
            s.bind((source, 0))
        try:
            s.connect((host, port))
            break
        except ConnectionRefusedError:
            s.close()
            if attempt == 99:
                raise
            __import__("time").sleep(0.1)
    s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
    data = s.makefile("rb").read()
    print(data.decode().split("\\r\\n\\r\\n", 1)[1].strip())
""")


def fetch(testbed, host, port, source="-"):
    """GET / from host:port inside the test namespace (as root: the host's side)."""
    return run(testbed.in_netns(["python3", "-c", FETCH, host, str(port), source]), timeout=60)


def connect_errno(testbed, host, port):
    code = ("import socket, sys; s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET); "
            "print(s.connect_ex((sys.argv[1], int(sys.argv[2]))))")
    return int(run(testbed.in_netns(["python3", "-c", code, host, str(port)]), check=True).stdout)


class Container:
    """A detached rootless container; stop() removes it."""

    def __init__(self, testbed, cmd, daemon, runtime="runc", extra=()):
        self.testbed = testbed
        self.name = "b4ns-pub-" + uuid.uuid4().hex[:8]
        run(testbed.run_container(cmd, runtime=runtime, seccomp=daemon.profile, name=self.name,
                                  extra=["-d", *extra]), check=True)

    def logs(self):
        result = run(self.testbed.podman(["logs", self.name]))
        return result.stdout + result.stderr

    def stop(self):
        run(self.testbed.podman(["rm", "-f", "-t", "0", self.name]), timeout=120)


@pytest.fixture
def containers(testbed):
    started = []

    def start(*args, **kwargs):
        container = Container(testbed, *args, **kwargs)
        started.append(container)
        return container
    yield start
    for container in started:
        container.stop()


@pytest.fixture
def daemons(testbed):
    started = []

    def start(args):
        daemon = Daemon(args)
        started.append(daemon)
        return daemon
    yield start
    for daemon in started:
        assert daemon.stop() == 0
        assert "ERROR" not in daemon.log(), daemon.log()[-3000:]


@pytest.fixture
def user_dir(testbed):
    """A directory the test user owns, for files mounted into containers."""
    path = os.path.join(testbed.WORKDIR, "pub-" + uuid.uuid4().hex[:8])
    os.mkdir(path)
    os.chown(path, testbed.user_uid(), testbed.user_gid())
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_nginx_published_port_sees_real_client_address(testbed, daemons, containers, user_dir, runtime):
    port = testbed.free_port()
    daemon = daemons(["-p", "%d:80" % port])
    body = "nginx-" + uuid.uuid4().hex
    with open(os.path.join(user_dir, "nginx.conf"), "w") as f:
        f.write(NGINX_CONF % body)
    containers(["/usr/sbin/nginx", "-c", "/conf/nginx.conf", "-p", "/tmp", "-e", "stderr"], daemon,
               runtime=runtime, extra=["-v", "%s:/conf:ro" % user_dir, "-v", "%s:/logs" % user_dir])
    # From the namespace's second address: the access log must name it, not a proxy's.
    result = fetch(testbed, testbed.HOST_IP4, port, source=testbed.HOST_IP4_B)
    assert result.stdout.strip() == body, result.stderr
    with open(os.path.join(user_dir, "access.log")) as f:
        access_log = f.read()
    assert access_log.startswith(testbed.HOST_IP4_B + " "), access_log
    assert re.search(r"bind 0\.0\.0\.0:80: published as %d->80/tcp: ok" % port, daemon.log())


SERVE = textwrap.dedent("""
    import http.server, socket, sys, threading
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("%s %s" % (self.server.server_port_in_container, self.client_address[0])).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
    host = sys.argv[1]
    for port in map(int, sys.argv[2:]):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = type("S", (http.server.ThreadingHTTPServer,), {"address_family": family})((host, port), Handler)
        server.server_port_in_container = port
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("serving", flush=True)
    threading.Event().wait()
""")


def test_host_ip_limits_where_the_port_listens(testbed, daemons, containers):
    port = testbed.free_port("0.0.0.0")  # free on every address: none but 127.0.0.1 may answer
    daemon = daemons(["-p", "127.0.0.1:%d:80" % port])
    containers(["python3", "-c", SERVE, "0.0.0.0", "80"], daemon)
    result = fetch(testbed, "127.0.0.1", port)
    assert result.stdout.split() == ["80", "127.0.0.1"], result.stderr
    assert connect_errno(testbed, testbed.HOST_IP4, port) == errno.ECONNREFUSED


def test_port_range_served_by_one_container(testbed, daemons, containers):
    base = 20000 + os.getpid() % 12000  # below the ephemeral ports (32768-), which connections take
    daemon = daemons(["-p", "%d-%d:9000-9004" % (base, base + 4)])
    containers(["python3", "-c", SERVE, "0.0.0.0"] + [str(9000 + i) for i in range(5)], daemon)
    for i in range(5):
        result = fetch(testbed, testbed.HOST_IP4, base + i)
        assert result.stdout.split() == [str(9000 + i), testbed.HOST_IP4], result.stderr


def test_ipv6_server_behind_a_published_port(testbed, daemons, containers):
    port = testbed.free_port("::")
    daemon = daemons(["-p", "%d:8080" % port])
    containers(["python3", "-c", SERVE, "::", "8080"], daemon)
    result = fetch(testbed, testbed.HOST_IP6, port, source=testbed.HOST_IP6_B)
    assert result.stdout.split() == ["8080", testbed.HOST_IP6_B], result.stderr
    # The socket is dual-stack, as the server made it: IPv4 clients reach it too.
    assert fetch(testbed, testbed.HOST_IP4, port).stdout.split()[0] == "8080"


UDP_SERVER = textwrap.dedent("""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 53))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data + b" " + peer[0].encode(), peer)
""")

UDP_CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[3], 0))
    s.settimeout(0.2)
    for _ in range(100):  # the server may not be bound yet
        s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
        try:
            print(s.recv(2048).decode())
            break
        except OSError:
            pass
""")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_udp_published_port(testbed, daemons, containers, runtime):
    port = testbed.free_port()
    daemon = daemons(["-p", "%d:53/udp" % port])
    containers(["python3", "-c", UDP_SERVER], daemon, runtime=runtime)
    out = run(testbed.in_netns(["python3", "-c", UDP_CLIENT, testbed.HOST_IP4, str(port), testbed.HOST_IP4_B]),
              check=True, timeout=60).stdout
    assert out.split() == ["ping", testbed.HOST_IP4_B]


UDP_REACH = textwrap.dedent("""
    import socket, sys, time
    loopback_port = int(sys.argv[1])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 53))
    device = s.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\\0").decode()
    print("pinned to", device or "-", flush=True)
    s.sendto(b"from a published socket", ("127.0.0.1", loopback_port))
    while True:  # answer the clients, wherever they are
        data, peer = s.recvfrom(2048)
        s.sendto(data + b" " + peer[0].encode(), peer)
""")

LOOPBACK_UDP_LISTENER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.settimeout(float(sys.argv[2]))
    print("ready", flush=True)
    try:
        print(s.recv(100).decode(), flush=True)
    except socket.timeout:
        print("nothing", flush=True)
""")


@pytest.mark.parametrize("host_ip", ["", "198.18.0.1:"], ids=["all addresses", "one address"])
def test_what_a_published_udp_socket_can_reach(testbed, daemons, containers, server, host_ip):
    """README, "Publishing ports": no send is trapped and a published socket is not pinned (its
    clients come through any interface), so a published UDP socket can send to any address the
    host can, its loopback included, while its clients reach it at the published address."""
    port, loopback_port = testbed.free_port(), testbed.free_port("127.0.0.1")
    listener = server(["python3", "-c", LOOPBACK_UDP_LISTENER, str(loopback_port), "20"],
                      stdout=subprocess.PIPE, universal_newlines=True)
    assert listener.stdout.readline().strip() == "ready"
    daemon = daemons(["-p", "%s%d:53/udp" % (host_ip, port)])
    container = containers(["python3", "-c", UDP_REACH, str(loopback_port)], daemon)
    out = run(testbed.in_netns(["python3", "-c", UDP_CLIENT, testbed.HOST_IP4, str(port), testbed.HOST_IP4_B]),
              check=True, timeout=60).stdout
    assert out.split() == ["ping", testbed.HOST_IP4_B]
    assert listener.stdout.readline().strip() == "from a published socket"
    assert "pinned to -" in container.logs()


def test_reserved_port_is_held_until_the_container_binds_it(testbed, daemons, containers):
    port = testbed.free_port()
    daemon = daemons(["-p", "%d:80" % port])
    # Another host process cannot take the port before the container starts...
    code = ("import socket, sys\ns = socket.socket()\ntry:\n    s.bind(('0.0.0.0', int(sys.argv[1])))\n"
            "    print('bound')\nexcept OSError as e:\n    print(e.errno)")
    assert run(testbed.in_netns(["python3", "-c", code, str(port)]), check=True).stdout.strip() == \
        str(errno.EADDRINUSE)
    # ... and the container then gets it.
    containers(["python3", "-c", SERVE, "0.0.0.0", "80"], daemon)
    assert fetch(testbed, testbed.HOST_IP4, port).stdout.split()[0] == "80"


def test_second_binder_gets_eaddrinuse_and_the_port_comes_back(testbed, daemons, containers):
    port = testbed.free_port()
    daemon = daemons(["-p", "%d:80" % port])
    first = containers(["python3", "-c", SERVE, "0.0.0.0", "80"], daemon)
    assert fetch(testbed, testbed.HOST_IP4, port).stdout.split()[0] == "80"
    bind_errno = ("import socket\ns = socket.socket()\ntry:\n    s.bind(('0.0.0.0', 80))\n    print(0)\n"
                  "except OSError as e:\n    print(e.errno)")
    second = run(testbed.run_container(["python3", "-c", bind_errno], seccomp=daemon.profile), check=True)
    assert second.stdout.strip() == str(errno.EADDRINUSE)
    first.stop()
    third = containers(["python3", "-c", SERVE, "0.0.0.0", "80"], daemon)
    assert fetch(testbed, testbed.HOST_IP4, port).stdout.split()[0] == "80", third.logs()


@pytest.mark.parametrize("container_port,bind_outcome", [(80, "published as %d->80/tcp: ok"), (81, "container")])
def test_container_reaches_its_own_service_on_loopback(testbed, daemons, container_port, bind_outcome):
    """Published (80): the loopback connect goes to the host side; not published (81): all stays inside."""
    port = testbed.free_port()
    daemon = daemons(["-p", "%d:80" % port])
    code = SERVE.replace('print("serving", flush=True)\nthreading.Event().wait()', textwrap.dedent("""
        import urllib.request
        print(urllib.request.urlopen("http://127.0.0.1:%s/" % sys.argv[2], timeout=10).read().decode())
    """))
    out = run(testbed.run_container(["python3", "-c", code, "0.0.0.0", str(container_port)],
                                    seccomp=daemon.profile), check=True).stdout
    assert out.split() == [str(container_port), "127.0.0.1"]
    outcome = bind_outcome % port if "%d" in bind_outcome else bind_outcome
    assert ("0.0.0.0:%d" % container_port, outcome) in daemon.decisions("bind")


BIND_AND_SAY = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAITs of the last one
    try:
        s.bind(("0.0.0.0", int(sys.argv[1])))
        print("bound", flush=True)
    except OSError as e:
        print("errno", e.errno, flush=True)
    time.sleep(3600)
""")


def nginx(containers, daemon, user_dir, name, annotation):
    """An nginx container answering `name`, logging to user_dir/name/, with the annotation."""
    directory = os.path.join(user_dir, name)
    os.mkdir(directory)
    os.chown(directory, int(os.stat(user_dir).st_uid), int(os.stat(user_dir).st_gid))
    with open(os.path.join(directory, "nginx.conf"), "w") as f:
        f.write(NGINX_CONF % name)
    return containers(["/usr/sbin/nginx", "-c", "/conf/nginx.conf", "-p", "/tmp", "-e", "stderr"], daemon,
                      extra=["--annotation", annotation, "-v", "%s:/conf:ro" % directory,
                             "-v", "%s:/logs" % directory])


def test_containers_publish_their_own_ports_by_annotation(testbed, daemons, containers, user_dir):
    """One daemon without -p; each container publishes its own host port (bypass4netns.publish),
    reserved while it lives: a third container asking for a taken port gets EADDRINUSE at its
    bind, and once the first container is gone its port is free for the next."""
    daemon = daemons([])
    port1 = testbed.free_port()
    port2 = next(p for p in iter(testbed.free_port, None) if p != port1)
    first = nginx(containers, daemon, user_dir, "first", "bypass4netns.publish=%d:80" % port1)
    nginx(containers, daemon, user_dir, "second", "bypass4netns.publish=%d:80" % port2)
    for port, name in ((port1, "first"), (port2, "second")):
        result = fetch(testbed, testbed.HOST_IP4, port, source=testbed.HOST_IP4_B)
        assert result.stdout.strip() == name, result.stderr
        with open(os.path.join(user_dir, name, "access.log")) as f:
            assert f.read().startswith(testbed.HOST_IP4_B + " "), "not the client's own address"
    assert re.search(r"container \S+: publishing %d->80/tcp" % port1, daemon.log())

    third = containers(["python3", "-c", BIND_AND_SAY, "80"], daemon,
                       extra=["--annotation", "bypass4netns.publish=%d:80" % port1])
    assert wait_logs(third, "errno") == "errno %d" % errno.EADDRINUSE
    assert re.search(r"host port %d/tcp is published by container \S+: its bind of port 80 gets EADDRINUSE"
                     % port1, daemon.log())

    gone = daemon.log().count(": gone (")
    first.stop()
    deadline = time.monotonic() + 30
    while daemon.log().count(": gone (") == gone and time.monotonic() < deadline:
        time.sleep(0.1)
    assert connect_errno(testbed, testbed.HOST_IP4, port1) == errno.ECONNREFUSED, "released with its container"
    assert fetch(testbed, testbed.HOST_IP4, port2).stdout.strip() == "second"
    fourth = containers(["python3", "-c", BIND_AND_SAY, "80"], daemon,
                        extra=["--annotation", "bypass4netns.publish=%d:80" % port1])
    assert wait_logs(fourth, "bound") == "bound"
    published = re.findall(r"bind 0\.0\.0\.0:80: published as %d->80/tcp: ok" % port1, daemon.log())
    assert len(published) == 2, "the fourth container's bind was not published"


def wait_logs(container, word, timeout=60):
    """The first line of the container's output that starts with `word`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in container.logs().splitlines():
            if line.startswith(word):
                return line
        time.sleep(0.2)
    raise AssertionError("no %r in the logs of %s: %s" % (word, container.name, container.logs()))


LO_EXTRA = "198.18.0.222"   # an address the test adds to the namespace's `lo` (a service's, say)

ON_HOST_LO = """
import ctypes, errno, json, socket, struct, sys
extra, port = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
s = socket.socket()
s.bind(("0.0.0.0", 80))   # published: a host socket from now on, not pinned
raw = struct.pack("=H", socket.AF_UNSPEC) + bytes(14)
out = {"unspec": libc.connect(s.fileno(), raw, len(raw))}
s.settimeout(3)
try:
    s.connect((extra, port))
    out["connect"] = "CONNECTED"
except OSError as e:
    out["connect"] = errno.errorcode.get(e.errno, "timeout")
print(json.dumps(out))
"""


def test_a_published_socket_never_connects_to_an_address_of_the_hosts_lo(testbed, daemons, server):
    """An address added to the host's `lo` is as much the host's loopback as 127.0.0.1, though no
    policy names it: a published port's socket (unpinned: its clients come through any interface)
    pointed at one is refused, as a new switch there would be."""
    run(testbed.in_netns(["ip", "addr", "replace", LO_EXTRA + "/32", "dev", "lo"]), check=True)
    try:
        port = testbed.free_port(LO_EXTRA)
        server(["python3", "-c", "import socket, sys; s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); "
                                 "s.listen(8); print('ready', flush=True); [s.accept()[0].close() for _ in iter(int, 1)]",
                LO_EXTRA, str(port)], stdout=subprocess.PIPE, universal_newlines=True).stdout.readline()
        daemon = daemons(["-p", "%d:80" % testbed.free_port()])
        out = json.loads(run(testbed.run_container(["python3", "-c", ON_HOST_LO, LO_EXTRA, str(port)],
                                                   seccomp=daemon.profile), check=True, timeout=120).stdout)
        assert out == {"unspec": 0, "connect": "ENETUNREACH"}, out
        assert ("%s:%d" % (LO_EXTRA, port), "refused: switched (the host's loopback)") in daemon.decisions()
    finally:
        run(testbed.in_netns(["ip", "addr", "del", LO_EXTRA + "/32", "dev", "lo"]))
