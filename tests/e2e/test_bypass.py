"""The socket-switching engine, end to end: rootless podman (runc and crun), real clients.

Every server listens inside the test namespace (198.18.0.0/15, 2001:db8::/32)
or on loopback; bypass4netns.py runs as the unprivileged test user there too.
"""

import errno
import functools
import json
import os
import re
import subprocess
import time
import textwrap
import uuid

import pytest

from e2e.daemon import Daemon, run
from e2e.fileserver import serve_file

RUNTIMES = ["runc", "crun"]
SLIRP_ADDRESS = "10.0.2.100"  # the container's address on slirp4netns


@pytest.fixture(scope="module", params=["default workers", "--workers 1"])
def daemon(testbed, request):
    """The daemon of this module's tests, run with the default worker processes and with one process."""
    workers = ["--workers", "1"] if request.param == "--workers 1" else []
    d = Daemon(["--ignore", "10.0.0.0/8,198.18.1.0/24"] + workers)
    yield d
    assert d.stop() == 0
    assert "ERROR" not in d.log() and "Traceback" not in d.log(), d.log()[-3000:]


@pytest.fixture
def http(testbed, server, tmp_path):
    """serve(host) -> (port, body) of a file served by python3 -m http.server."""
    return functools.partial(serve_file, testbed, server, tmp_path)


def container_python(testbed, daemon, code, runtime="runc", args=(), extra=(), check=True, timeout=180):
    """Run python3 code in a rootless container with the daemon's profile; return its stdout."""
    argv = testbed.run_container(["python3", "-c", textwrap.dedent(code), *map(str, args)], runtime=runtime,
                                 seccomp=daemon.profile, extra=extra)
    return run(argv, timeout=timeout, check=check).stdout


def netns_tcp_table(testbed, path="/proc/net/tcp"):
    return run(testbed.in_netns(["cat", path, path + "6"]), check=True).stdout


def local_ports(table, state=None):
    """Local ports of a /proc/net/tcp{,6} text (optionally only in one state, hex like '01')."""
    ports = set()
    for line in table.splitlines():
        fields = line.split()
        if len(fields) > 3 and ":" in fields[1] and fields[0] != "sl" and (state is None or fields[3] == state):
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# -- TCP ---------------------------------------------------------------------

HOLD_CONNECTION = """
    import json, socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    s = socket.create_connection((host, port))
    s.sendall(b"GET /index.txt HTTP/1.0\\r\\n\\r\\n")
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        data += s.recv(65536)
    tables = open("/proc/net/tcp").read() + open("/proc/net/tcp6").read()
    print(json.dumps({"sockname": s.getsockname()[:2], "peername": s.getpeername()[:2],
                      "response": data.decode(errors="replace"), "container_tables": tables}), flush=True)
    sys.stdin.read()  # hold the connection until the test has looked at the host's table
"""


def held_connection(testbed, argv):
    """Run argv, a container (-i) of HOLD_CONNECTION, and read the test namespace's TCP table while
    it holds its connection: (what the container printed, that table)."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        return json.loads(line), netns_tcp_table(testbed)
    finally:
        proc.stdin.close()
        proc.wait(60)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("host_ip", ["198.18.0.1", "2001:db8::1"])
def test_tcp_connection_lives_in_the_host_namespace(testbed, daemon, http, runtime, host_ip):
    port, body = http(host_ip)
    argv = testbed.run_container(["python3", "-c", textwrap.dedent(HOLD_CONNECTION), host_ip, str(port)],
                                 runtime=runtime, seccomp=daemon.profile, extra=["-i"])
    seen, host_table = held_connection(testbed, argv)
    local_ip, local_port = seen["sockname"]
    assert local_ip == host_ip, "the socket should have the host's address, not slirp4netns' %s" % SLIRP_ADDRESS
    assert seen["peername"] == [host_ip, port]
    assert "200 OK" in seen["response"]
    assert local_port in local_ports(host_table), "not in the host namespace's socket table"
    assert local_port not in local_ports(seen["container_tables"]), "still in the container's socket table"
    where = ("%s:%d" if "." in host_ip else "[%s]:%d") % (host_ip, port)
    assert (where, "bypassed") in daemon.decisions()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_static_busybox_wget_is_bypassed(testbed, daemon, http, runtime):
    port, body = http(testbed.HOST_IP4)
    argv = testbed.run_container(["/bin/wget", "-q", "-O", "-", "http://198.18.0.1:%d/index.txt" % port],
                                 runtime=runtime, seccomp=daemon.profile)
    assert run(argv, check=True).stdout == body
    assert ("198.18.0.1:%d" % port, "bypassed") in daemon.decisions()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_iperf3_both_directions(testbed, daemon, server, runtime):
    port = testbed.free_port()
    for reverse in ([], ["-R"]):
        iperf = server(["iperf3", "-s", "-1", "-B", testbed.HOST_IP4, "-p", str(port)],
                       stdout=subprocess.DEVNULL)
        _wait_iperf(testbed, port)
        argv = testbed.run_container(["iperf3", "-c", testbed.HOST_IP4, "-p", str(port), "-t", "1", "-J"]
                                     + reverse, runtime=runtime, seccomp=daemon.profile)
        report = json.loads(run(argv, check=True).stdout)
        assert report["start"]["connected"][0]["local_host"] == testbed.HOST_IP4
        assert report["end"]["sum_received"]["bytes"] > 0 and report["end"]["sum_sent"]["bytes"] > 0
        iperf.wait(30)


def _wait_iperf(testbed, port):
    """iperf3 -s -1 serves exactly one client, so probe its port with ss instead of a connection."""
    for _ in range(200):
        if ":%d " % port in run(testbed.in_netns(["ss", "-Htln"])).stdout + " ":
            return
        subprocess.run(["sleep", "0.05"])
    raise TimeoutError("iperf3 did not listen on %d" % port)


CONNECT_CLIENT = r"""
#include <arpa/inet.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
static struct sockaddr_in dest;
static void *run(void *arg) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in me; socklen_t len = sizeof me;
    if (connect(s, (struct sockaddr *)&dest, sizeof dest) || getsockname(s, (struct sockaddr *)&me, &len))
        { perror("connect"); exit(1); }
    printf("%s\n", inet_ntoa(me.sin_addr));
    close(s);
    return arg;
}
int main(int argc, char **argv) {
    pthread_t thread;
    dest.sin_family = AF_INET; dest.sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &dest.sin_addr);
    run(NULL);
    pthread_create(&thread, NULL, run, NULL);
    pthread_join(thread, NULL);
    return 0;
}
"""


@pytest.mark.parametrize("abi", ["64", "32"])
def test_static_c_client_and_threads(testbed, daemon, server, tmp_path, abi):
    """A statically linked C client, connecting from its main thread and from a second one.

    The 32-bit build runs as i386, whose glibc connects through socketcall(2).
    """
    source = tmp_path / "connect.c"
    source.write_text(CONNECT_CLIENT)
    binary = os.path.join(testbed.WORKDIR, "connect-static-%s" % abi)
    subprocess.run(["gcc", "-m" + abi, "-O2", "-static", "-pthread", "-o", binary, str(source)], check=True)
    port = testbed.free_port()
    server(["socat", "TCP-LISTEN:%d,bind=%s,fork,reuseaddr" % (port, testbed.HOST_IP4), "/dev/null"])
    testbed.wait_port(testbed.HOST_IP4, port)
    argv = testbed.run_container(["/home/" + os.path.basename(binary), testbed.HOST_IP4, str(port)],
                                 seccomp=daemon.profile, extra=["-v", "%s:/home:ro" % testbed.WORKDIR])
    assert run(argv, check=True).stdout.split() == [testbed.HOST_IP4, testbed.HOST_IP4]


SOCKETCALL_SEND = r"""
#include <errno.h>
#include <linux/net.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>
int main(int argc, char **argv) {
    /* sendto through socketcall(2) itself, whatever the libc does: its arguments are in memory. */
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(9)};
    inet_pton(AF_INET, argv[1], &to.sin_addr);
    long args[6] = {socket(AF_INET, SOCK_DGRAM, 0), (long)"x", 1, 0, (long)&to, sizeof to};
    long sent = syscall(SYS_socketcall, SYS_SENDTO, args);
    printf("%ld %s\n", sent, sent < 0 ? strerror(errno) : "-");
    return 0;
}
"""


def test_an_i386_socketcall_send_is_refused(testbed, daemon, tmp_path):
    """socketcall(SYS_SENDTO) from an i386 program: trapped (the profile cannot see a socketcall's
    arguments), and never continued, since the kernel would read its flags from memory again
    (MSG_FASTOPEN put there since would connect a host socket anywhere): ENOSYS.  Without the
    profile it sends."""
    source = tmp_path / "socketcall.c"
    source.write_text(SOCKETCALL_SEND)
    binary = os.path.join(testbed.WORKDIR, "socketcall-send-32")
    subprocess.run(["gcc", "-m32", "-O2", "-static", "-o", binary, str(source)], check=True)
    for profile, expected in ((None, "1 -"), (daemon.profile, "-1 Function not implemented")):
        argv = testbed.run_container(["/home/" + os.path.basename(binary), testbed.HOST_IP4], seccomp=profile,
                                     extra=["-v", "%s:/home:ro" % testbed.WORKDIR])
        assert run(argv, check=True).stdout.strip() == expected, profile
    assert "refusing socketcall(2) sends (ENOSYS)" in daemon.log()


CROWD = """
    i=0
    while [ $i -lt 20 ]; do
        python3 -c '
import socket, sys
seen = set()
for _ in range(25):
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    seen.add(s.getsockname()[0])
    s.close()
print(" ".join(sorted(seen)))
' "$1" "$2" &
        i=$((i + 1))
    done
    wait
"""


def test_twenty_processes_of_one_container_connecting_at_once_are_all_bypassed(testbed, daemon, http):
    port, _body = http(testbed.HOST_IP4)
    before = daemon.decisions().count(("198.18.0.1:%d" % port, "bypassed"))
    argv = testbed.run_container(["/bin/sh", "-c", textwrap.dedent(CROWD), "crowd", testbed.HOST_IP4, str(port)],
                                 seccomp=daemon.profile)
    lines = run(argv, check=True, timeout=300).stdout.split("\n")
    assert [line for line in lines if line] == [testbed.HOST_IP4] * 20
    assert daemon.decisions().count(("198.18.0.1:%d" % port, "bypassed")) - before == 500


BUSY = """
    import socket, sys
    from multiprocessing import Process
    def connect_loop():
        for _ in range(500):
            socket.create_connection((sys.argv[1], int(sys.argv[2]))).close()
    procs = [Process(target=connect_loop) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    connect_loop()  # one process alone again: calm
    print(sum(p.exitcode == 0 for p in procs))
"""


def test_a_busy_container_is_served_by_every_worker(testbed, daemon, acceptor):
    """Four processes of one container connecting in turn: the worker that is the container's home
    finds it busy and every worker receives its notifications from then on, each counting in its
    own row: the counters the daemon logs are the sum, exact.  Crowded, the filter's answers wake
    the threads where they last ran; once one process connects alone, on the server's CPU again."""
    port = acceptor
    dest = "198.18.0.1:%d" % port
    gone_before = daemon.log().count(": gone (")
    log_before = len(daemon.log())
    before = daemon.decisions().count((dest, "bypassed"))
    assert container_python(testbed, daemon, BUSY, args=(testbed.HOST_IP4, port)).strip() == "4"
    assert daemon.decisions().count((dest, "bypassed")) - before == 2500
    counters = gone_counters(daemon, gone_before)
    assert counters["bypassed"] == 2500 and counters["errors"] == 0, counters
    turns = re.findall(r"filter \d+ (crowded|calm): answers wake", daemon.log()[log_before:])
    assert turns[:1] == ["crowded"] and turns[-1:] == ["calm"], daemon.log()[-2000:]
    shared = re.findall(r"container \S+: busy, now served by (\d+) workers", daemon.log())
    if daemon.worker_pids():
        assert shared and int(shared[-1]) == len(daemon.worker_pids()), daemon.log()[-2000:]
    else:
        assert not shared, "one process has no one to share with"


def test_ab_double_connect_is_answered_once(testbed, daemon, http):
    """ab (APR) connects a non-blocking socket, and again once it is writable: the first connect,
    seen complete by the daemon, is answered 0, so the second is never made."""
    port, _body = http(testbed.HOST_IP4)
    dest = "198.18.0.1:%d" % port
    before = daemon.decisions()
    argv = testbed.run_container(["ab", "-q", "-n", "50", "-c", "1", "http://%s/index.txt" % dest],
                                 seccomp=daemon.profile)
    out = run(argv, check=True).stdout
    assert "Complete requests:      50" in out and "Failed requests:        0" in out, out
    new = daemon.decisions()[len(before):]
    assert new.count((dest, "bypassed")) == 50
    assert (dest, "switched already") not in new, "a second connect reached the daemon"


def test_an_application_that_lingers_is_bypassed_and_keeps_its_linger(testbed, daemon, http):
    """SO_LINGER with a timeout, set before connect: carried to the host socket, whose close by
    the daemon (before its answer) runs under a timer; the application's own close ends the
    connection, 100 times in a row."""
    port, body = http(testbed.HOST_IP4)
    code = """
        import socket, struct, sys
        linger, bodies = set(), 0
        for _ in range(100):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))
            s.connect((sys.argv[1], int(sys.argv[2])))
            linger.add(struct.unpack("ii", s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)))
            s.sendall(b"GET /index.txt HTTP/1.0\\r\\n\\r\\n")
            reply = b"".join(iter(lambda: s.recv(65536), b""))  # till the server's close
            bodies += reply.endswith(sys.argv[3].encode())
            s.close()
        print(sorted(linger), bodies)
    """
    before = daemon.decisions()
    out = container_python(testbed, daemon, code, args=(testbed.HOST_IP4, port, body))
    assert out.split() == ["[(1,", "5)]", "100"], out
    assert daemon.decisions()[len(before):].count(("%s:%d" % (testbed.HOST_IP4, port), "bypassed")) == 100


# -- UDP -----------------------------------------------------------------------

UDP_ECHO = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(65536)
    s.sendto(b"echo:" + data, peer)
"""


@pytest.fixture
def udp_echo(testbed, server):
    def start(host):
        port = testbed.free_port(host)
        server(["python3", "-c", UDP_ECHO, host, str(port)])
        # Bound before any client sends: a connected UDP socket would get the
        # ICMP port unreachable as ECONNREFUSED.
        for _ in range(200):
            if ":%d " % port in run(testbed.in_netns(["ss", "-Huln"])).stdout + " ":
                return port
            subprocess.run(["sleep", "0.05"])
        raise TimeoutError("the UDP echo server did not bind %d" % port)
    return start


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("host_ip", ["198.18.0.1", "2001:db8::1"])
def test_connected_udp_client(testbed, daemon, udp_echo, runtime, host_ip):
    port = udp_echo(host_ip)
    out = container_python(testbed, daemon, """
        import socket, sys
        host, port = sys.argv[1], int(sys.argv[2])
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        s.connect((host, port))
        for _ in range(40):  # the echo server may not be bound yet
            s.send(b"ping")
            try:
                print(s.recv(100).decode(), s.getsockname()[0])
                break
            except socket.timeout:
                pass
    """, runtime=runtime, args=(host_ip, port))
    reply, local = out.split()
    # IPv4 UDP stays in the container (IP_PKTINFO would take its datagrams past a pin).
    assert reply == "echo:ping" and local == (host_ip if ":" in host_ip else SLIRP_ADDRESS)


# -- what the socket keeps -------------------------------------------------------

OPTIONS_CHECK = """
    import fcntl, json, os, select, socket, struct, sys
    host, port, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    stream = kind == "tcp"
    s = socket.socket(family, socket.SOCK_STREAM if stream else socket.SOCK_DGRAM)
    SOL, TCP, IP, IP6 = socket.SOL_SOCKET, socket.IPPROTO_TCP, socket.IPPROTO_IP, socket.IPPROTO_IPV6
    options = [
        (SOL, socket.SO_REUSEADDR, 1), (SOL, socket.SO_REUSEPORT, 1), (SOL, socket.SO_KEEPALIVE, 1),
        (SOL, socket.SO_RCVTIMEO, struct.pack("qq", 3, 0)), (SOL, socket.SO_SNDTIMEO, struct.pack("qq", 4, 0)),
        (SOL, socket.SO_RCVBUF, 65536), (SOL, socket.SO_SNDBUF, 32768),
        (SOL, socket.SO_LINGER, struct.pack("ii", 1, 5)), (SOL, socket.SO_PRIORITY, 3),
        (IP, socket.IP_TOS, 0x10), (IP, 24, 1),  # IP_BIND_ADDRESS_NO_PORT
    ]
    if stream:
        options += [(TCP, socket.TCP_NODELAY, 1), (TCP, socket.TCP_KEEPIDLE, 77), (TCP, socket.TCP_KEEPINTVL, 11),
                    (TCP, socket.TCP_KEEPCNT, 4), (TCP, 18, 12345),  # TCP_USER_TIMEOUT
                    (TCP, socket.TCP_CONGESTION, b"reno")]
    else:
        options += [(SOL, socket.SO_BROADCAST, 1)]
    if family == socket.AF_INET6:
        options += [(IP6, socket.IPV6_V6ONLY, 1), (IP6, 67, 0x20)]  # IPV6_TCLASS
    for level, name, value in options:
        s.setsockopt(level, name, value)
    def read_all():
        return {"%d/%d" % (level, name): (s.getsockopt(level, name, len(value)).hex() if isinstance(value, bytes)
                                          else s.getsockopt(level, name))
                for level, name, value in options}
    before = read_all()
    os.set_inheritable(s.fileno(), False)
    s.setblocking(False)
    first = s.connect_ex((host, port))
    select.select([], [s], [], 10)
    so_error = s.getsockopt(SOL, socket.SO_ERROR)
    again = [s.connect_ex((host, port)) for _ in range(2)]
    print(json.dumps({"before": before, "after": read_all(), "first": first, "so_error": so_error,
                      "again": again, "nonblocking": not s.getblocking(),
                      "cloexec": bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
                      "local": s.getsockname()[0]}))
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("host_ip,kind", [("198.18.0.1", "tcp"), ("2001:db8::1", "tcp"), ("2001:db8::1", "udp")])
def test_switched_socket_keeps_options_and_flags(testbed, daemon, http, udp_echo, runtime, host_ip, kind):
    port = http(host_ip)[0] if kind == "tcp" else udp_echo(host_ip)
    args = (host_ip, port, kind)
    seen = json.loads(container_python(testbed, daemon, OPTIONS_CHECK, runtime=runtime, args=args))
    native = json.loads(run(testbed.run_container(["python3", "-c", textwrap.dedent(OPTIONS_CHECK), *map(str, args)],
                                                  runtime=runtime), check=True).stdout)
    assert seen["local"] == host_ip and native["local"] != host_ip, "not bypassed"
    assert seen["after"] == seen["before"] == native["after"]
    assert seen["nonblocking"] and seen["cloexec"]
    # Non-blocking connect, then the repeated ones, answer as they do without the tool; except
    # that a TCP connect the daemon saw complete is answered 0 (POSIX allows it, and it saves
    # the second trapped connect that APR and others make), after which the kernel answers
    # EISCONN, as after any connect that returned 0.
    if kind == "tcp" and seen["first"] == 0:
        assert native["first"] == errno.EINPROGRESS and native["again"] == [0, errno.EISCONN]
        assert seen["so_error"] == 0 and seen["again"] == [errno.EISCONN, errno.EISCONN]
    else:
        for key in ("first", "so_error", "again"):
            assert seen[key] == native[key], key
    if kind == "tcp":
        assert seen["again"][-1] == errno.EISCONN


def test_asyncio_client(testbed, daemon, http):
    port, body = http(testbed.HOST_IP4)
    out = container_python(testbed, daemon, """
        import asyncio, sys
        async def main():
            reader, writer = await asyncio.open_connection(sys.argv[1], int(sys.argv[2]))
            writer.write(b"GET /index.txt HTTP/1.0\\r\\n\\r\\n")
            data = await reader.read()
            print(data.decode().split("\\r\\n\\r\\n", 1)[1], writer.get_extra_info("sockname")[0])
        asyncio.run(main())
    """, args=(testbed.HOST_IP4, port))
    assert out.split() == [body, testbed.HOST_IP4]


def test_podman_exec_process_is_bypassed(testbed, daemon, http):
    port, body = http(testbed.HOST_IP4)
    name = "b4ns-exec-" + uuid.uuid4().hex[:8]
    run(testbed.run_container(["sleep", "60"], seccomp=daemon.profile, extra=["-d"], name=name), check=True)
    try:
        out = run(testbed.podman(["exec", name, "/bin/wget", "-q", "-O", "-",
                                  "http://198.18.0.1:%d/index.txt" % port]), check=True).stdout
    finally:
        run(testbed.podman(["rm", "-f", "-t", "0", name]))
    assert out == body
    assert ("198.18.0.1:%d" % port, "bypassed") in daemon.decisions()


# -- what stays in the container ----------------------------------------------------

def test_ignored_destination_goes_through_slirp4netns(testbed, daemon, http):
    port, body = http(testbed.HOST_IP4_B)  # 198.18.1.0/24 is in the daemon's --ignore
    out = container_python(testbed, daemon, """
        import socket, sys
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
        s.sendall(b"GET /index.txt HTTP/1.0\\r\\n\\r\\n")
        data = s.makefile("rb").read()
        print(data.decode().split("\\r\\n\\r\\n", 1)[1], s.getsockname()[0])
    """, args=(testbed.HOST_IP4_B, port))
    assert out.split() == [body, SLIRP_ADDRESS]
    assert ("198.18.1.1:%d" % port, "container (ignored 198.18.1.0/24)") in daemon.decisions()


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_a_socket_bound_to_a_container_device_stays_in_the_container(testbed, daemon, http, udp_echo, kind):
    """SO_BINDTODEVICE to the container's own interface (slirp4netns' tap0): the host has no such
    device, so the socket is not switched; it connects through slirp4netns, still bound to it.
    UDP over IPv6 (IPv4 UDP stays in the container anyway)."""
    host = testbed.HOST_IP4 if kind == "tcp" else testbed.HOST_IP6
    port = http(host)[0] if kind == "tcp" else udp_echo(host)
    out = container_python(testbed, daemon, """
        import socket, sys, time
        host, port, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        while ":" in host and "fd00" not in open("/proc/net/if_inet6").read():
            time.sleep(0.05)  # slirp4netns' IPv6 address comes by router advertisement
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                          socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"tap0")
        s.settimeout(10)
        s.connect((host, port))
        if kind == "udp":
            s.send(b"ping")
            assert s.recv(64) == b"echo:ping"
        print(s.getsockname()[0], s.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\\0").decode())
    """, args=(host, port, kind))
    local, device = out.split()
    assert device == "tap0" and (local == SLIRP_ADDRESS if kind == "tcp" else local.startswith("fd00:")), out
    where = "%s:%d" % (host, port) if kind == "tcp" else "[%s]:%d" % (host, port)
    assert (where, "container (bound to a container device)") in daemon.decisions()


SHUTDOWN_UNDER_WAY = """
    import errno, json, socket, threading, time
    # A listener in the container that answers no SYN: backlog 0 and one connection it never
    # accepts.  S's blocking connect to it waits in the daemon's loop (a connect in place).
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    filler = socket.create_connection(address)
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 127)   # retries for hours
    out = {}

    def connect():
        try:
            s.connect(address)
            out["connect"] = 0
        except OSError as e:
            out["connect"] = errno.errorcode[e.errno]

    thread = threading.Thread(target=connect)
    thread.start()
    time.sleep(1)
    s.shutdown(socket.SHUT_RDWR)   # untrapped: the handshake under way ends, the socket is new again
    thread.join(30)
    out["joined"] = not thread.is_alive()
    # The daemon serves this container's next call at once, as before.
    start = time.monotonic()
    other = socket.socket()
    other.settimeout(30)
    try:
        other.connect(("127.0.0.1", 1))   # nobody listens: ECONNREFUSED, from the daemon's loop
    except OSError as e:
        out["next"] = errno.errorcode[e.errno]
    out["next_seconds"] = round(time.monotonic() - start)
    print(json.dumps(out))
"""


def test_a_socket_shut_down_under_a_blocking_connect_never_holds_the_daemon(testbed, daemon):
    """A blocking connect in place waits in the daemon's loop; another thread's shutdown() (not
    trapped) makes the socket new again.  The daemon answers the connect as the kernel would
    (ECONNRESET: a handshake reset) and never connects it again itself, which on the shared,
    blocking file would wait for the hours of SYN retries the socket asked for, and hold every
    call of the daemon's loop meanwhile."""
    out = json.loads(container_python(testbed, daemon, SHUTDOWN_UNDER_WAY, timeout=120))
    assert out["joined"] and out["connect"] == "ECONNRESET", out
    assert out["next"] == "ECONNREFUSED" and out["next_seconds"] < 20, out


def test_a_socket_bound_to_a_service_port_stays_in_the_container(testbed, daemon, http):
    """A client socket bound to a port outside the host's ephemeral range before its connect: the
    host socket would hold that port on the host, so it stays in the container; one bound to an
    ephemeral port is switched with it."""
    port, body = http(testbed.HOST_IP4)
    ephemeral = testbed.free_port()   # one the host's kernel handed out, free again
    out = json.loads(container_python(testbed, daemon, """
        import json, socket, sys
        host, port = sys.argv[1], int(sys.argv[2])
        out = {}
        for name, local in (("service", 6379), ("ephemeral", int(sys.argv[3]))):
            s = socket.socket()
            s.bind(("0.0.0.0", local))
            s.connect((host, port))
            out[name] = s.getsockname()
        print(json.dumps(out))
    """, args=(testbed.HOST_IP4, port, ephemeral)))
    assert out == {"service": [SLIRP_ADDRESS, 6379], "ephemeral": [testbed.HOST_IP4, ephemeral]}, out
    assert ("198.18.0.1:%d" % port, "container (bound to port 6379, not one of the host's ephemeral ports)") \
        in daemon.decisions()


def test_container_loopback_and_unix_sockets_stay_in_the_container(testbed, daemon):
    out = container_python(testbed, daemon, """
        import os, socket, threading
        def serve(listener):
            conn, _ = listener.accept()
            conn.sendall(b"hello")
            conn.close()
        results = []
        for family, address in ((socket.AF_INET, ("127.0.0.1", 0)), (socket.AF_INET6, ("::1", 0)),
                                (socket.AF_UNIX, "/tmp/b4ns.sock"), (socket.AF_UNIX, "\\0b4ns-abstract")):
            listener = socket.socket(family)
            listener.bind(address)
            listener.listen()
            threading.Thread(target=serve, args=(listener,)).start()
            client = socket.socket(family)
            client.connect(listener.getsockname())
            results.append(client.recv(10).decode())
        print(" ".join(results))
    """)
    assert out.split() == ["hello"] * 4


# -- host loopback is out of reach ----------------------------------------------------

@pytest.fixture
def host_loopback_servers(testbed, server, tmp_path):
    """TCP and UDP servers on the test namespace's 127.0.0.1 and ::1 that count what reaches them."""
    port = testbed.free_port("127.0.0.1")
    counter = tmp_path / "reached"
    counter.write_text("")
    code = textwrap.dedent("""
        import selectors, socket, sys
        port, path = int(sys.argv[1]), sys.argv[2]
        sel = selectors.DefaultSelector()
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                s = socket.socket(family, kind)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
                if kind == socket.SOCK_STREAM:
                    s.listen(128)
                sel.register(s, selectors.EVENT_READ)
        with open(path, "a") as out:
            out.write("ready\\n"); out.flush()
            while True:
                for key, _ in sel.select():
                    s = key.fileobj
                    if s.type == socket.SOCK_STREAM:
                        conn, peer = s.accept(); conn.close()
                    else:
                        _, peer = s.recvfrom(65536)
                    out.write("%s\\n" % (peer,)); out.flush()
    """)
    server(["python3", "-c", code, str(port), str(counter)])
    for _ in range(200):
        if counter.read_text():
            break
        subprocess.run(["sleep", "0.05"])

    def reached():
        return [line for line in counter.read_text().splitlines() if line != "ready"]
    return port, reached


def test_host_loopback_is_never_reached(testbed, daemon, host_loopback_servers):
    port, reached = host_loopback_servers
    out = container_python(testbed, daemon, """
        import socket, sys
        port = int(sys.argv[1])
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"),
                             (socket.AF_INET6, "::ffff:127.0.0.1"), (socket.AF_INET, "0.0.0.0"),
                             (socket.AF_INET6, "::")):
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                s = socket.socket(family, kind)
                s.settimeout(2)
                try:
                    s.connect((host, port))
                    s.send(b"x")
                    s.recv(1)
                    print("REACHED", host, kind)
                except OSError:
                    print("refused", host, kind)
        # A connected IPv4 UDP socket asked to send to the loopback, also
        # through an AF_UNSPEC sockaddr, which IPv4 UDP sends to all the same:
        # no send is trapped, and the socket stays in the container (with
        # --no-udp-loopback-guard it is switched and pinned to the interface of
        # its source address, so what it sends leaves through that interface).
        import ctypes, struct
        libc = ctypes.CDLL(None, use_errno=True)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.connect(("198.18.0.1", 9))
        print("pinned", u.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\\0").decode())
        for family in (socket.AF_INET, socket.AF_UNSPEC):
            raw = struct.pack("=H", family) + struct.pack("!H4s8x", port, socket.inet_aton("127.0.0.1"))
            sent = libc.sendto(u.fileno(), b"x", 1, 0, raw, len(raw))
            print("sendto", family, sent, ctypes.get_errno())
    """, args=(port,))
    assert "REACHED" not in out and out.count("refused") == 10, out
    # Not pinned: IPv4 UDP stays in the container (test_hostile_sequences... says why), and
    # its sends to 127.0.0.1 reach the container's own loopback.
    assert "pinned \n" in out and out.count("sendto") == 2, out
    time.sleep(0.5)  # what was sent had time to arrive, had it been able to
    assert reached() == []


HOSTILE = """
    import ctypes, errno, json, socket, struct, sys, time
    host4, host6, port, loopback_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}

    def name(e):
        return errno.errorcode.get(e.errno, str(e)) if e.errno else "timeout"

    def attempt(s, address):
        s.settimeout(2)
        try:
            s.connect(address)
            return "CONNECTED"
        except OSError as e:
            return name(e)

    def disconnect(s):
        raw = struct.pack("=H", socket.AF_UNSPEC) + bytes(14)
        return libc.connect(s.fileno(), raw, len(raw))

    def pin(s):
        device = s.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\\0").decode()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"")
            return [device, "UNPINNED"]
        except OSError as e:
            return [device, name(e)]

    # A bypassed TCP connection, disconnected with AF_UNSPEC and pointed at the loopback.
    for family, peer, loopback in ((socket.AF_INET, host4, "127.0.0.1"), (socket.AF_INET6, host6, "::1"),
                                   (socket.AF_INET6, "::ffff:" + host4, "::ffff:127.0.0.1")):
        s = socket.socket(family)
        s.connect((peer, port))
        out["tcp " + loopback] = [s.getsockname()[0]] + pin(s) + [disconnect(s), attempt(s, (loopback, loopback_port))]
    # A non-blocking connect that fails once under way (nobody answers ARP for
    # that address), retried at the loopback.
    s = socket.socket()
    s.setblocking(False)
    first = s.connect_ex((host4[:-1] + "77", port))
    time.sleep(4)
    out["failed"] = [errno.errorcode.get(first, first), errno.errorcode.get(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), 0),
                     s.getsockname()[0], attempt(s, ("127.0.0.1", loopback_port))]
    # A connected UDP socket (switched, if the daemon switches it): sends to
    # the loopback, plainly, with an interface in IP_PKTINFO / IPV6_PKTINFO
    # (1: lo), and from an IPv6 socket to a v4-mapped loopback with
    # IP_PKTINFO; then disconnected with AF_UNSPEC (which unpins a UDP socket
    # in the kernel) and sent from again; then a connect to the loopback.
    def send(u, destination, ancillary=()):
        try:
            return u.sendmsg([b"x"], list(ancillary), 0, destination)
        except OSError as e:
            return name(e)

    ip_pktinfo = (socket.IPPROTO_IP, 8, struct.pack("=I4s4s", 1, bytes(4), bytes(4)))   # IP_PKTINFO: lo
    ipv6_pktinfo = (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, bytes(16) + struct.pack("=I", 1))
    for family, peer, loopback in ((socket.AF_INET, host4, "127.0.0.1"), (socket.AF_INET6, host6, "::1")):
        u = socket.socket(family, socket.SOCK_DGRAM)
        u.connect((peer, 9))
        to = (loopback, loopback_port)
        got = [u.getsockname()[0]] + pin(u)
        got += [send(u, to), send(u, to, [ip_pktinfo if family == socket.AF_INET else ipv6_pktinfo])]
        got.append(send(u, ("::ffff:127.0.0.1", loopback_port), [ip_pktinfo]) if family == socket.AF_INET6 else "-")
        got += [disconnect(u)] + pin(u) + [send(u, to), attempt(u, to)]
        out["udp " + loopback] = got
    print(json.dumps(out))
"""


def test_hostile_sequences_never_reach_the_hosts_loopback(testbed, daemon, http, host_loopback_servers):
    """What a container may try with the host sockets it holds, default flags: the daemon refuses
    every trapped call that points one at the loopback, and each client host socket is pinned to
    its interface (the container cannot unpin it), so what no trap sees cannot get there either."""
    loopback_port, reached = host_loopback_servers
    port, _body = http("::")
    out = json.loads(container_python(testbed, daemon, HOSTILE, args=(testbed.HOST_IP4, testbed.HOST_IP6, port,
                                                                      loopback_port)))
    for loopback, switched in (("127.0.0.1", testbed.HOST_IP4), ("::1", testbed.HOST_IP6),
                               ("::ffff:127.0.0.1", "::ffff:" + testbed.HOST_IP4)):
        assert out["tcp " + loopback] == [switched, testbed.VETH_A, "EPERM", 0, "ENETUNREACH"], out
    first, later, switched, retried = out["failed"]
    assert (first, later, switched) == ("EINPROGRESS", "EHOSTUNREACH", testbed.HOST_IP4), out
    assert retried == "ENETUNREACH", out
    # IPv6 UDP is switched, pinned (a send to ::1 leaves through the interface; IPV6_PKTINFO
    # naming another interface is refused) and IPV6_V6ONLY (a v4-mapped send with IP_PKTINFO
    # would pass the pin); still pinned after AF_UNSPEC (the daemon gives it a fresh pinned socket).
    v6 = testbed.VETH_A
    assert out["udp ::1"] == [testbed.HOST_IP6, v6, "EPERM", 1, "EINVAL", "ENETUNREACH",
                              0, v6, "EPERM", 1, "ENETUNREACH"], out
    # IPv4 UDP stays in the container (IP_PKTINFO names an interface past any pin): its sends
    # reach the container's own loopback, where nobody listens.
    got = out["udp 127.0.0.1"]
    assert got[0] == SLIRP_ADDRESS and got[1:3] == ["", "UNPINNED"] and got[5:8] == ["-", 0, ""], out
    time.sleep(0.5)
    assert reached() == []
    assert ("%s:9" % testbed.HOST_IP4, "container (IPv4 UDP: its datagrams' IP_PKTINFO would pass the pin)") \
        in daemon.decisions()


def test_without_the_udp_guard_ipv4_udp_is_switched_and_ip_pktinfo_reaches_the_loopback(
        testbed, http, host_loopback_servers):
    """--no-udp-loopback-guard: what it gives up, measured.  A switched IPv4 UDP socket is pinned
    as any other, but a datagram whose IP_PKTINFO names the loopback interface goes there (from
    127.0.0.1); the rest of the hostile sequence still does not (AF_UNSPEC keeps it pinned)."""
    d = Daemon(["--ignore", "10.0.0.0/8,198.18.1.0/24", "--no-udp-loopback-guard"])
    try:
        loopback_port, reached = host_loopback_servers
        port, _body = http("::")
        out = json.loads(container_python(testbed, d, HOSTILE, args=(testbed.HOST_IP4, testbed.HOST_IP6, port,
                                                                     loopback_port)))
        got = out["udp 127.0.0.1"]
        assert got == [testbed.HOST_IP4, testbed.VETH_A, "EPERM", 1, 1, "-", 0, testbed.VETH_A, "EPERM", 1,
                       "ENETUNREACH"], out
        # And an IPv6 socket, no longer IPV6_V6ONLY, sends to ::ffff:127.0.0.1 the same way.
        assert out["udp ::1"][5] == 1, out
        time.sleep(0.5)
        peers = reached()
        assert len(peers) == 2 and all(peer.startswith("('127.0.0.1', ") for peer in peers), peers
        assert "--no-udp-loopback-guard: containers' connected IPv4 UDP sockets are switched" in d.log()
    finally:
        assert d.stop() == 0


RACER = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* One thread flips the sockaddr between an allowed destination and the
   host's loopback while the other keeps connecting (TCP) or sending (UDP,
   over a switched socket) with it. */
static struct sockaddr_in6 addr;
static struct sockaddr_in6 allowed, loopback;
static atomic_int stop;

static void *flipper(void *arg) {
    (void)arg;
    while (!atomic_load(&stop)) {
        memcpy(&addr, &loopback, sizeof addr);
        memcpy(&addr, &allowed, sizeof addr);
    }
    return NULL;
}

static void set(struct sockaddr_in6 *a, const char *ip, int port) {
    memset(a, 0, sizeof *a);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(port);
    inet_pton(AF_INET6, ip, &a->sin6_addr);
}

int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    set(&allowed, argv[2], atoi(argv[3]));
    set(&loopback, argv[4], atoi(argv[5]));
    memcpy(&addr, &allowed, sizeof addr);
    pthread_t t;
    pthread_create(&t, NULL, flipper, NULL);
    int tcp_ok = 0, udp_sent = 0;
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET6, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&addr, sizeof addr) == 0) tcp_ok++;
        close(s);
    }
    /* A UDP socket switched by a connect to the allowed destination, then
       sends that name the flipping address. */
    int u = socket(AF_INET6, SOCK_DGRAM, 0);
    if (connect(u, (struct sockaddr *)&allowed, sizeof allowed)) { perror("udp connect"); return 1; }
    for (int i = 0; i < n; i++) {
        struct iovec iov = {"x", 1};
        struct msghdr msg = {.msg_name = &addr, .msg_namelen = sizeof addr, .msg_iov = &iov, .msg_iovlen = 1};
        if (sendto(u, "x", 1, 0, (struct sockaddr *)&addr, sizeof addr) == 1) udp_sent++;
        if (sendmsg(u, &msg, 0) == 1) udp_sent++;
    }
    atomic_store(&stop, 1);
    pthread_join(t, NULL);
    printf("%d %d\n", tcp_ok, udp_sent);
    return 0;
}
"""


@pytest.mark.parametrize("loopback", ["::ffff:127.0.0.1", "::1"])
def test_host_loopback_is_never_reached_under_a_racing_rewrite(testbed, daemon, server, host_loopback_servers,
                                                               tmp_path, loopback):
    port, reached = host_loopback_servers
    allowed_port = testbed.free_port()
    server(["socat", "TCP6-LISTEN:%d,bind=[::ffff:198.18.0.1],fork,reuseaddr" % allowed_port, "/dev/null"])
    testbed.wait_port(testbed.HOST_IP4, allowed_port)
    source = tmp_path / "racer.c"
    source.write_text(RACER)
    binary = os.path.join(testbed.WORKDIR, "racer-static")
    subprocess.run(["gcc", "-O2", "-static", "-pthread", "-o", binary, str(source)], check=True)
    attempts = 3000
    argv = testbed.run_container(["/home/racer-static", str(attempts), "::ffff:198.18.0.1", str(allowed_port),
                                  loopback, str(port)], seccomp=daemon.profile,
                                 extra=["-v", "%s:/home:ro" % testbed.WORKDIR])
    tcp_ok, udp_sent = map(int, run(argv, check=True, timeout=600).stdout.split())
    assert tcp_ok > 0 and udp_sent > 0, "the race never ran the allowed path"
    assert reached() == [], "the host's loopback was reached"


# -- the default profile: TCP only, no send waits for the daemon ----------------------

@pytest.fixture(scope="module")
def tcp_daemon(testbed):
    """A daemon with the default profile (seccomp-gen.py without --udp)."""
    d = Daemon(["--ignore", "10.0.0.0/8"])
    yield d
    assert d.stop() == 0
    assert "ERROR" not in d.log() and "Traceback" not in d.log(), d.log()[-3000:]


def gone_counters(daemon, seen_before):
    """The counters of the next container to go away, once the daemon has logged it."""
    for _ in range(100):
        lines = re.findall(r"container \S+: gone \((.*)\)$", daemon.log(), re.M)
        if len(lines) > seen_before:
            return {k: int(v) for k, v in (item.split("=") for item in lines[seen_before].split())}
        subprocess.run(["sleep", "0.1"])
    raise AssertionError("no new 'gone' line: %s" % daemon.log()[-2000:])


SENDS = """
    import json, os, socket, sys
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tcp = socket.create_connection((host, port))
    a, b = socket.socketpair()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(n):
        a.sendmsg([b"x"]); b.recv(1)
        tcp.sendmsg([b""])
        udp.sendto(b"x", (host, 9))
        udp.sendmsg([b"x"], [], 0, (host, 9))
    connected = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)  # IPv4 UDP stays in the container
    connected.connect((sys.argv[4], 9))
    print(json.dumps({"tcp": tcp.getsockname()[0], "udp": connected.getsockname()[0]}))
"""


def test_default_profile_switches_tcp_and_udp_and_traps_no_plain_send(testbed, tcp_daemon, http):
    port, _body = http(testbed.HOST_IP4)
    gone_before = tcp_daemon.log().count(": gone (")
    out = json.loads(container_python(testbed, tcp_daemon, SENDS, args=(testbed.HOST_IP4, port, 1000,
                                                                        testbed.HOST_IP6)))
    assert out["tcp"] == testbed.HOST_IP4, "the TCP connection was not bypassed"
    assert out["udp"] == testbed.HOST_IP6, "the connected UDP socket was not switched"
    assert ("[2001:db8::1]:9", "bypassed") in tcp_daemon.decisions()
    counters = gone_counters(tcp_daemon, gone_before)
    # 4000 sends on unix, TCP and UDP sockets: none reached the daemon.  What
    # did: the two connects, and what the runtime and python3 do at start.
    assert counters["notifications"] < 50, counters
    assert counters["bypassed"] == 2, counters


DISCONNECTED = """
    import ctypes, errno, json, socket, struct, sys
    host, port, loopback_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    libc = ctypes.CDLL(None, use_errno=True)
    s = socket.create_connection((host, port))
    switched = s.getsockname()[0]
    # Disconnect it (connect to AF_UNSPEC): a host socket, connected to nothing.
    unspec = struct.pack("=H", socket.AF_UNSPEC) + bytes(14)
    disconnected = libc.connect(s.fileno(), unspec, len(unspec))
    seen = {"switched": switched, "disconnect": disconnected}
    try:
        s.listen(5)
        seen["listen"] = "listening on %s" % (s.getsockname(),)
    except OSError as e:
        seen["listen"] = errno.errorcode[e.errno]
    for target in (("127.0.0.1", loopback_port), ("198.18.0.1", port)):
        try:
            s.sendto(b"x", 0x20000000, target)  # MSG_FASTOPEN: would connect the socket anew
            seen["fastopen " + target[0]] = "sent"
        except OSError as e:
            seen["fastopen " + target[0]] = errno.errorcode[e.errno]
    print(json.dumps(seen))
"""


def test_switched_socket_without_a_connection_cannot_listen_or_fast_open(testbed, tcp_daemon, http,
                                                                         host_loopback_servers):
    loopback_port, reached = host_loopback_servers
    port, _body = http(testbed.HOST_IP4)
    seen = json.loads(container_python(testbed, tcp_daemon, DISCONNECTED,
                                       args=(testbed.HOST_IP4, port, loopback_port)))
    assert seen["switched"] == testbed.HOST_IP4 and seen["disconnect"] == 0, seen
    refused = errno.errorcode[errno.EOPNOTSUPP]  # ENOTSUP: the same number on Linux
    assert seen["listen"] == refused, seen
    assert seen["fastopen 127.0.0.1"] == refused and seen["fastopen 198.18.0.1"] == refused, seen
    assert reached() == []


# A profile an older `seccomp-gen.py --base none --udp` wrote (listenerPath set per test): it traps
# every sendmsg and sendmmsg, and each sendto with a destination.
OLD_UDP_PROFILE = {
    "defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "listenerMetadata": "bypass4netns:udp",
    "syscalls": [{"names": ["connect", "bind", "listen", "sendmsg", "sendmmsg", "socketcall"],
                  "action": "SCMP_ACT_NOTIFY"},
                 {"names": ["sendto"], "action": "SCMP_ACT_NOTIFY", "args": [{"index": 4, "value": 0,
                                                                                "op": "SCMP_CMP_NE"}]},
                 {"names": ["io_uring_setup", "io_uring_enter", "io_uring_register"], "action": "SCMP_ACT_ERRNO",
                  "errnoRet": 38}]}

OLD_PROFILE_SENDS = """
    import errno, json, socket, sys
    host, udp_port, n, host6 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    a, b = socket.socketpair()
    unconnected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unconnected.settimeout(2)
    echoed = 0
    for _ in range(n):
        a.sendmsg([b"x"]); b.recv(1)
        unconnected.sendto(b"x", (host, udp_port))
        echoed += unconnected.recv(10) == b"echo:x"
    connected = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)  # IPv4 UDP stays in the container
    connected.settimeout(2)
    connected.connect((host6, udp_port))
    connected.sendmsg([b"y"])
    out = {"echoed": echoed, "connected": connected.getsockname()[0], "answer": connected.recv(10).decode()}
    try:
        socket.socket().sendto(b"x", 0x20000000, (host, udp_port))  # MSG_FASTOPEN
    except OSError as e:
        out["fastopen"] = errno.errorcode[e.errno]
    print(json.dumps(out))
"""


def test_a_profile_made_by_an_older_seccomp_gen_udp_keeps_working(testbed, tcp_daemon, udp_echo):
    """Its plain sends are trapped and run as made; a connected UDP
    socket is switched as under the one profile; a TCP Fast Open send is refused."""
    port = udp_echo("::")  # both families
    profile = os.path.join(testbed.WORKDIR, "old-udp-%s.json" % uuid.uuid4().hex[:8])
    with open(profile, "w") as f:
        json.dump(dict(OLD_UDP_PROFILE, listenerPath=tcp_daemon.socket), f)
    os.chmod(profile, 0o644)
    gone_before = tcp_daemon.log().count(": gone (")
    try:
        argv = testbed.run_container(["python3", "-c", textwrap.dedent(OLD_PROFILE_SENDS), testbed.HOST_IP4,
                                      str(port), "200", testbed.HOST_IP6], seccomp=profile)
        out = json.loads(run(argv, timeout=180, check=True).stdout)
    finally:
        os.unlink(profile)
    assert out == {"echoed": 200, "connected": testbed.HOST_IP6, "answer": "echo:y",
                   "fastopen": errno.errorcode[errno.EOPNOTSUPP]}  # ENOTSUP: the same number on Linux
    counters = gone_counters(tcp_daemon, gone_before)
    assert counters["notifications"] >= 400 and counters["bypassed"] == 1 and counters["errors"] == 0, counters
