"""The daemon's life, end to end: concurrency, leaks, bad clients, signals, `auto`, a crash.

Rootless podman (runc and crun) against bypass4netns.py run as the test
user.  Every server listens inside the test namespace (198.18.0.0/15,
2001:db8::/32) or on loopback; containers started here are named and removed
by name, the daemon is ended by pid.  Nothing here asserts a duration: the
timeouts only keep a broken daemon from hanging the run.
"""

import array
import errno
import json
import os
import queue
import re
import resource
import signal
import socket
import subprocess
import textwrap
import threading
import time
import uuid

import pytest

from e2e.daemon import Daemon, run

RUNTIMES = ["runc", "crun"]
SLIRP_ADDRESS = "10.0.2.100"  # the container's address on slirp4netns


# -- helpers -------------------------------------------------------------------

@pytest.fixture
def daemon(testbed):
    """A daemon of this test alone (fd and memory figures must be its own); ended by pid."""
    daemons = []

    def start(args=(), debug=True, prefix=(), take_over=None, env=None):
        d = Daemon(args, debug=debug, prefix=prefix, take_over=take_over, env=env)
        daemons.append(d)
        if debug:
            # Logged once --ready-fd is closed: from then on its fd count is its own.
            wait_for(lambda: " listening on " in d.log(), "the daemon to listen")
        return d
    yield start
    for d in daemons:
        if d.proc.poll() is None:
            d.stop()
        else:
            testbed.stop_server(d.proc)  # forget its pid record
    for d in daemons:
        if os.path.exists(d.socket):  # left by a killed daemon
            os.unlink(d.socket)


def wait_for(predicate, what, timeout=60.0, interval=0.1):
    """Poll predicate() until it is true; fail with `what` (a str or a callable giving one) after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0fs waiting for %s"
                                 % (timeout, what() if callable(what) else what))
        time.sleep(interval)


def name_of(kind):
    return "b4ns-life-%s-%s" % (kind, uuid.uuid4().hex[:8])


def remove_container(testbed, name):
    run(testbed.podman(["rm", "-f", "-t", "0", name]), timeout=120)


def log_problems(d):
    """The daemon log's ERROR and Traceback lines."""
    return [line for line in d.log().splitlines() if " ERROR " in line or "Traceback" in line]


class Attached:
    """A foreground `podman run -i`: lines to its stdin, its stdout lines read by a thread."""

    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     universal_newlines=True)
        self.lines = queue.Queue()
        self.seen = []
        self.stderr = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _pump(stream, put):
        for line in stream:
            put(line.rstrip("\n"))
        put(None)

    def expect(self, timeout=120):
        """The next stdout line; fails on exit or timeout."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no output after %ds; so far %r; stderr %r"
                                 % (timeout, self.seen, self.stderr[-20:])) from None
        if line is None:
            self.lines.put(None)
            raise AssertionError("container exited (%s) after %r; stderr %r"
                                 % (self.proc.wait(30), self.seen, self.stderr[-20:]))
        self.seen.append(line)
        return line

    def unread(self):
        """Lines printed but not read yet (without waiting)."""
        lines = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return lines
            if line is None:
                self.lines.put(None)
                return lines
            lines.append(line)

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def attach_python(testbed, d, code, args=(), runtime="runc", name=None, extra=()):
    argv = testbed.run_container(["python3", "-c", textwrap.dedent(code), *map(str, args)], runtime=runtime,
                                 seccomp=d.profile, name=name, extra=["-i", *extra])
    return Attached(argv)


def netns_tcp_sockets(testbed):
    """[(local port, remote port, state hex)] of the test namespace's TCP sockets."""
    out = run(testbed.in_netns(["cat", "/proc/net/tcp", "/proc/net/tcp6"]), check=True).stdout
    sockets = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[0] != "sl" and ":" in fields[1]:
            sockets.append((int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16), fields[3]))
    return sockets


def syn_sent_to(testbed, port):
    return [s for s in netns_tcp_sockets(testbed) if s[1] == port and s[2] == "02"]  # 02: SYN_SENT


def decision_count(d, dest, outcome="bypassed"):
    return d.decisions().count((dest, outcome))


# -- servers in the test namespace ------------------------------------------------

BLACK_HOLE = """
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
listener = socket.socket()
listener.bind((host, port))
listener.listen(1)
# Connections that finish their handshake but are never accepted fill the
# accept queue; from then on the kernel drops every SYN: a connect hangs.
fillers = []
for _ in range(10):
    probe = socket.socket()
    probe.settimeout(1)
    try:
        probe.connect((host, port))
    except socket.timeout:
        probe.close()
        print("ready", flush=True)
        break
    fillers.append(probe)
else:
    sys.exit("the accept queue never filled")
while True:
    time.sleep(3600)
"""

SLOW_SERVER = """
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((host, port))
listener.listen(128)
print("ready", flush=True)
while True:
    time.sleep(0.2)  # accepts slowly: one client every 0.2 s
    conn, _ = listener.accept()
    conn.sendall(b"hello\\n")
    conn.close()
"""


def start_line_server(testbed, server, code):
    """A python server in the namespace that prints "ready"; returns its port."""
    port = testbed.free_port()
    proc = server(["python3", "-c", code, testbed.HOST_IP4, str(port)], stdout=subprocess.PIPE,
                  universal_newlines=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        assert lines.get(timeout=60) == "ready\n", "server did not start"
    except queue.Empty:
        raise AssertionError("server not ready after 60s") from None
    return port


@pytest.fixture
def black_hole(testbed, server):
    """A port of 198.18.0.1 where every connect hangs (full accept queue, SYNs dropped)."""
    return start_line_server(testbed, server, BLACK_HOLE)


@pytest.fixture
def slow_server(testbed, server):
    """A port of 198.18.0.1 whose server accepts one client every 0.2 s and says hello."""
    return start_line_server(testbed, server, SLOW_SERVER)


@pytest.fixture
def http(testbed, server, tmp_path):
    """(port, body) of a file served by python3 -m http.server at 198.18.0.1."""
    body = "b4ns-" + uuid.uuid4().hex
    (tmp_path / "index.txt").write_text(body)
    port = testbed.free_port()
    server(["python3", "-m", "http.server", "--bind", testbed.HOST_IP4, "--directory", str(tmp_path), str(port)],
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    testbed.wait_port(testbed.HOST_IP4, port)
    return port, body


# -- 1. a black hole stalls nothing ---------------------------------------------------

# Thread "hang" connects (blocking) to the black hole; the main thread, told
# to on stdin, makes another connect of the same container meanwhile.
BLACK_HOLE_CLIENT = """
    import socket, sys, threading
    host, hole, other = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    def hang():
        s = socket.socket()
        # Carried to the host socket: SYNs retried for hours, not the
        # default ~2 minutes, so the connect outlives any slow test run.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 30)
        try:
            s.connect((host, hole))
            print("black hole: connected", flush=True)
        except OSError as e:
            print("black hole: errno", e.errno, flush=True)
    threading.Thread(target=hang, daemon=True).start()
    print("connecting", flush=True)
    sys.stdin.readline()
    s = socket.create_connection((host, other))
    print("other:", s.makefile().readline().strip(), s.getsockname()[0], flush=True)
    sys.stdin.readline()  # hold on until removed
"""

HELLO_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print(s.makefile().readline().strip(), s.getsockname()[0])
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_black_hole_stalls_no_other_connect(testbed, daemon, black_hole, slow_server, runtime):
    """Issue 3: a blocking connect that never ends holds up no notification, and leaks nothing once killed."""
    d = daemon()
    fds_before = d.fd_count()
    hole_dest, slow_dest = "198.18.0.1:%d" % black_hole, "198.18.0.1:%d" % slow_server
    name = name_of("hole")
    hole = attach_python(testbed, d, BLACK_HOLE_CLIENT, (testbed.HOST_IP4, black_hole, slow_server),
                         runtime=runtime, name=name)
    names = [name_of("crowd") for _ in range(20)]
    crowd = []
    try:
        assert hole.expect() == "connecting"
        # The daemon switched the socket and holds the connect: its SYNs go
        # out of the host namespace, unanswered.
        wait_for(lambda: decision_count(d, hole_dest) == 1, lambda: "the black hole decision: %s" % d.log()[-2000:])
        wait_for(lambda: syn_sent_to(testbed, black_hole), "a SYN_SENT socket to the black hole")

        # 20 containers at once (runc and crun alternately) while it hangs.
        for i, cname in enumerate(names):
            argv = testbed.run_container(["python3", "-c", HELLO_CLIENT, testbed.HOST_IP4, str(slow_server)],
                                         runtime=RUNTIMES[i % 2], seccomp=d.profile, name=cname)
            crowd.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, universal_newlines=True))
        results = [proc.communicate(timeout=180) + (proc.returncode,) for proc in crowd]
        for out, err, code in results:
            assert code == 0, err[-2000:]
            assert out.split() == ["hello", testbed.HOST_IP4], (out, err[-2000:])
        assert decision_count(d, slow_dest) == 20

        # ... and another connect of the hanging container itself.
        hole.send("go")
        assert hole.expect() == "other: hello %s" % testbed.HOST_IP4
        assert decision_count(d, slow_dest) == 21

        # The black hole's connect never returned meanwhile.
        assert hole.proc.poll() is None, "the black-hole container exited"
        assert hole.unread() == [], "the black-hole connect returned"
        assert syn_sent_to(testbed, black_hole), "the black-hole handshake ended"
    finally:
        for cname, proc in zip(names, crowd):
            if proc.poll() is None:
                remove_container(testbed, cname)
        remove_container(testbed, name)
    hole.proc.wait(120)
    assert [line for line in hole.unread() if line.startswith("black hole")] == []

    # Nothing of the pending connect is left: the daemon's fds, the host socket.
    wait_for(lambda: d.fd_count() == fds_before,
             lambda: "fd count %d back to %d: %s" % (d.fd_count(), fds_before, open_fds(d)))
    wait_for(lambda: not syn_sent_to(testbed, black_hole), "the host socket to the black hole to close")
    assert log_problems(d) == []


HAMMER = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
/* Threads that make a trapped syscall (connect on a unix socket, which the
   daemon lets run) as fast as they can, until the container is killed. */
static void *hammer(void *arg) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    strcpy(addr.sun_path, "/nonexistent");
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    for (;;)
        connect(s, (struct sockaddr *)&addr, sizeof addr);
    return arg;
}
int main(int argc, char **argv) {
    pthread_t thread;
    for (int i = 0; i < atoi(argv[1]); i++)
        pthread_create(&thread, NULL, hammer, NULL);
    pause();
    return 0;
}
"""


@pytest.fixture(scope="module")
def hammer(testbed, tmp_path_factory):
    """Path (in WORKDIR, mounted at /home) of a static binary whose threads hammer a trapped syscall."""
    source = tmp_path_factory.mktemp("hammer") / "hammer.c"
    source.write_text(HAMMER)
    name = "hammer-static-%d" % os.getpid()
    binary = os.path.join(testbed.WORKDIR, name)
    subprocess.run(["gcc", "-O2", "-static", "-pthread", "-o", binary, str(source)], check=True)
    yield "/home/" + name
    os.unlink(binary)


def test_containers_killed_mid_notification_stall_nothing(testbed, daemon, hammer, http):
    """Containers killed while hundreds of their threads wait on trapped syscalls: the daemon must
    take the kernel's ENOENT (the target went away) in its stride, release every thread's pidfd,
    log no error and go on serving. Each round is a chance for the race, not a certainty."""
    d = daemon()
    port, body = http
    fds_before = d.fd_count()
    for round_ in range(10):
        names = [name_of("hammer") for _ in RUNTIMES]
        try:
            starts = [subprocess.Popen(testbed.run_container([hammer, "128"], runtime=runtime, seccomp=d.profile,
                                                             extra=["-d", "-v", "%s:/home:ro" % testbed.WORKDIR],
                                                             name=cname),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, universal_newlines=True)
                      for cname, runtime in zip(names, RUNTIMES)]
            for proc in starts:
                assert proc.wait(180) == 0, proc.stderr.read()
            time.sleep(0.5)  # let notifications pile up
        finally:
            run(testbed.podman(["rm", "-f", "-t", "0", *names]), timeout=180)

        def stuck():
            cpu = d.cpu_seconds()
            time.sleep(0.5)
            return ("round %d: fd count %d, not %d (pidfds of dead threads kept); daemon cpu %.2fs in 0.5s; "
                    "log tail %s" % (round_, d.fd_count(), fds_before, d.cpu_seconds() - cpu, d.log()[-1500:]))
        wait_for(lambda: d.fd_count() == fds_before, stuck, timeout=30)
    argv = testbed.run_container(["/bin/wget", "-q", "-O", "-", "http://198.18.0.1:%d/index.txt" % port],
                                 seccomp=d.profile)
    assert run(argv, check=True, timeout=60).stdout == body
    assert log_problems(d) == []


# -- 2. 100 containers in a row ---------------------------------------------------------

def test_hundred_containers_leave_no_trace(testbed, daemon, http):
    """fds and memory return to their level after 100 containers (each a bypassed wget), no error logged."""
    d = daemon()
    port, body = http
    dest = "198.18.0.1:%d" % port
    url = "http://%s/index.txt" % dest

    def one(i):
        argv = testbed.run_container(["/bin/wget", "-q", "-O", "-", url], runtime=RUNTIMES[i % 2],
                                     seccomp=d.profile, name=name_of("row"))
        assert run(argv, check=True, timeout=300).stdout == body

    def gone():
        return d.log().count(": gone (")

    warm_up = 4
    for i in range(warm_up):
        one(i)
    wait_for(lambda: gone() == warm_up, "the warm-up containers to be gone")
    time.sleep(0.5)
    fds_before, rss_before, cpu_before = d.fd_count(), d.rss_kib(), d.cpu_seconds()

    started = time.monotonic()
    for i in range(100):
        one(i)
    elapsed = time.monotonic() - started

    wait_for(lambda: gone() == warm_up + 100, lambda: "containers gone: %d of %d" % (gone(), warm_up + 100))
    wait_for(lambda: d.fd_count() == fds_before,
             lambda: "fd count %d back to %d: %s" % (d.fd_count(), fds_before, open_fds(d)))
    rss_after = d.rss_kib()
    print("100 containers in %.1fs (%.2fs each); daemon cpu %.2fs; rss %d -> %d KiB; fds %d"
          % (elapsed, elapsed / 100, d.cpu_seconds() - cpu_before, rss_before, rss_after, fds_before))
    assert rss_after <= rss_before + 4096, "RSS grew from %d to %d KiB" % (rss_before, rss_after)
    assert decision_count(d, dest) == warm_up + 100
    assert log_problems(d) == []
    # And the daemon tracks no container any more.
    os.kill(d.pid, signal.SIGUSR1)
    wait_for(lambda: " no containers" in d.log(), "the SIGUSR1 report")


# -- 3. malformed runtime messages ------------------------------------------------------

def unix_client(path):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    return c


def dropped(c, timeout=30):
    """Whether the daemon closed its end of c (it never writes to a runtime)."""
    c.settimeout(timeout)
    try:
        return c.recv(1) == b""
    except ConnectionResetError:
        return True  # closed with our data unread
    except socket.timeout:
        return False
    finally:
        c.close()


def send_message(path, data, fds=(), end=False):
    """One runtime-like message (data + SCM_RIGHTS fds); True once the daemon dropped the connection."""
    c = unix_client(path)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    c.sendmsg([data], ancillary)
    if end:
        c.shutdown(socket.SHUT_WR)
    return dropped(c)


def message(**fields):
    body = {"ociVersion": "1.0.2-dev", "pid": 4242, "metadata": "",
            "state": {"ociVersion": "1.0.2-dev", "id": "malformed-" + uuid.uuid4().hex, "status": "creating",
                      "pid": 4242, "bundle": "/nonexistent"}}
    body.update(fields)
    return json.dumps(body).encode()


def test_malformed_messages_are_dropped_and_the_daemon_serves_on(testbed, daemon, http):
    d = daemon()
    port, body = http
    fds_before = d.fd_count()
    r, w = os.pipe()
    try:
        # (what is sent, fds, whether EOF is needed to end it, what the log says)
        cases = [
            (b"garbage {{{", (), True, "Expecting value"),
            (b"\xc3\x28 invalid utf-8", (), True, "can't decode"),
            (b"", (), True, "Expecting value"),
            (b"[1, 2, 3]", (), False, "list indices"),
            (b"null", (), False, "NoneType"),
            (message(fds=[]), (), False, "'seccompFd' is not in list"),
            (message(fds=["somethingElse"]), (r,), False, "'seccompFd' is not in list"),
            (json.dumps({"fds": ["seccompFd"]}).encode() + b"\n", (), False, "0 fds for 1 names"),
            (message(fds=["seccompFd"]), (), False, "0 fds for 1 names"),
            (message(fds=["seccompFd"]), (r,), False, "not a seccomp notify fd"),
            (message(fds=["seccompFd"]), (r, w), False, "2 fds for 1 names"),
            (message(fds=["seccompFd"]), [r] * 20, False, "for 1 names"),  # more fds than it takes
            (message(fds="seccompFd"), (r,), False, "fds for 9 names"),
            (message(state="not an object", fds=["seccompFd"]), (r,), False, "has no attribute 'get'"),
        ]
        for data, fds, end, logged in cases:
            assert send_message(d.socket, data, fds, end), "not dropped: %r" % data
            # (a line identical to one of the last 10 s is not repeated: LogLimit)
            wait_for(lambda: logged in "\n".join(log_problems(d)), "%r logged for %r" % (logged, data))
    finally:
        os.close(r)
        os.close(w)

    # 2 MiB: cut off after 1 MiB.
    errors = len(log_problems(d))
    big = unix_client(d.socket)
    sender_error = []

    def send_big():
        try:
            big.sendall(message(fds=["seccompFd"], pad="x" * (2 << 20)))
        except OSError as e:
            sender_error.append(e)
    sender = threading.Thread(target=send_big, daemon=True)
    sender.start()
    sender.join(60)
    assert not sender.is_alive(), "the daemon stopped reading a 2 MiB message without closing it"
    assert dropped(big)
    assert sender_error and sender_error[0].errno in (errno.EPIPE, errno.ECONNRESET), sender_error
    wait_for(lambda: "longer than 1 MiB" in "\n".join(log_problems(d)[errors:]), "the 2 MiB message logged")

    # Containers are served.
    out = run(testbed.run_container(["/bin/wget", "-q", "-O", "-", "http://198.18.0.1:%d/index.txt" % port],
                                    seccomp=d.profile), check=True).stdout
    assert out == body
    assert decision_count(d, "198.18.0.1:%d" % port) == 1
    # Every fd the bad clients brought in is closed again.
    wait_for(lambda: d.fd_count() == fds_before,
             lambda: "fd count %d back to %d: %s" % (d.fd_count(), fds_before, open_fds(d)))
    assert "Traceback" not in d.log()
    assert d.proc.poll() is None
    assert d.stop() == 0


# -- fd limits and clients that say nothing (issue 12) ------------------------------------

THREADS_CLIENT = """
    import collections, json, socket, sys, threading
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    barrier = threading.Barrier(n)
    outcomes = collections.Counter()
    lock = threading.Lock()
    def connect():
        barrier.wait()
        try:
            s = socket.create_connection((host, port), timeout=120)
            outcome = s.getsockname()[0]
            s.close()
        except OSError as e:
            outcome = "errno %s" % e.errno
        with lock:
            outcomes[outcome] += 1
    threads = [threading.Thread(target=connect) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(outcomes))
"""


def threads_connect(testbed, d, port, threads):
    """{local address or 'errno N': count} of `threads` threads of one container connecting at once."""
    argv = testbed.run_container(["python3", "-c", textwrap.dedent(THREADS_CLIENT), testbed.HOST_IP4, str(port),
                                  str(threads)], seccomp=d.profile)
    return json.loads(run(argv, check=True, timeout=300).stdout)


def idle_clients(path, count, patience=3.0):
    """Up to `count` unix connections to `path` that send nothing: as many as get in (a backlog
    full for `patience` seconds ends it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    clients = []
    full_since = None
    while len(clients) < count:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(path)
        except BlockingIOError:  # the backlog is full
            c.close()
            full_since = full_since or time.monotonic()
            if time.monotonic() - full_since > patience:
                break
            time.sleep(0.01)
            continue
        full_since = None
        clients.append(c)
    return clients


def cpu_over(d, seconds):
    before = d.cpu_seconds()
    time.sleep(seconds)
    return d.cpu_seconds() - before


def test_fd_limit_is_raised_and_idle_clients_hold_up_no_container(testbed, daemon, acceptor):
    """Started with a soft limit of 1024, the daemon raises it to the hard one: 2000 clients that
    say nothing and a container of 700 threads connecting at once all fit; the silent clients
    are dropped after the time limit, with one log line for all of them."""
    d = daemon(prefix=["prlimit", "--nofile=1024:8192", "--"])
    assert "file descriptor limit 8192 (was 1024)" in d.log()
    clients = idle_clients(d.socket, 2000)
    try:
        assert len(clients) == 2000
        idle_cpu = cpu_over(d, 2)
        assert threads_connect(testbed, d, acceptor, 700) == {testbed.HOST_IP4: 700}
        wait_for(lambda: "no complete message in" in d.log(), "the silent clients dropped", timeout=30)
        assert all(dropped(c, timeout=5) for c in clients[:20])
        assert threads_connect(testbed, d, acceptor, 1) == {testbed.HOST_IP4: 1}, "a new container"
    finally:
        for c in clients:
            c.close()
    print("2000 silent clients: daemon CPU %.2f s in 2 s" % idle_cpu)
    assert idle_cpu < 1.0, "a busy loop"
    problems = log_problems(d)
    assert len(problems) == 1 and "dropping a runtime message: no complete message" in problems[0], problems


def test_out_of_fds_the_oldest_silent_clients_make_room(testbed, daemon, acceptor):
    """Soft and hard limit 1024: 2000 silent clients fill the daemon's fd table.  It drops the
    oldest of them to accept the next (a runtime dials without waiting: a full backlog fails the
    container), without spinning, logging it a few times; a container started then starts, and
    every one of its 700 threads connects (bypassed, or through slirp4netns where a worker had
    no fd left)."""
    d = daemon(prefix=["prlimit", "--nofile=1024:1024", "--"])
    clients = idle_clients(d.socket, 2000)
    try:
        assert len(clients) == 2000
        wait_for(lambda: "the oldest unfinished connections make room" in d.log(), "the eviction logged")
        busy_cpu = cpu_over(d, 2)
        outcomes = threads_connect(testbed, d, acceptor, 700)
        assert sum(outcomes.values()) == 700 and set(outcomes) <= {testbed.HOST_IP4, SLIRP_ADDRESS}, outcomes
    finally:
        for c in clients:
            c.close()
    print("out of fds: daemon CPU %.2f s in 2 s; 700 threads: %s" % (busy_cpu, outcomes))
    assert busy_cpu < 1.0, "a busy loop"
    os.kill(d.pid, signal.SIGUSR1)
    wait_for(lambda: "daemon: out of file descriptors" in d.log(), "the SIGUSR1 report")
    problems = log_problems(d)
    assert 1 <= len(problems) <= 8, problems
    assert "Traceback" not in d.log()
    assert d.stop() == 0


def test_slow_runtime_messages_cost_other_containers_little(testbed, daemon, acceptor):
    """20 clients sending 1 MiB each, 1 KiB at a time: a JSON string that never ends, every chunk
    ending like an object does.  Each parse scans all that came; the daemon parses a few times
    per client, not at every chunk; a container started meanwhile connects bypassed."""
    d = daemon()
    sent = [0] * 20

    def slow_sender(index):
        c = unix_client(d.socket)
        try:
            c.sendall(b'{"pad": "')
            for _ in range(1023):
                c.sendall(b"a" * 1023 + b"}")
                sent[index] += 1
                time.sleep(0.002)
        except OSError:
            pass  # dropped: the time limit
        finally:
            c.close()
    senders = [threading.Thread(target=slow_sender, args=(i,)) for i in range(20)]
    before = d.cpu_seconds()
    for sender in senders:
        sender.start()
    wait_for(lambda: min(sent) >= 200, "the senders under way")
    outcomes = threads_connect(testbed, d, acceptor, 50)
    for sender in senders:
        sender.join(300)
    used = d.cpu_seconds() - before
    print("20 slow senders (%d KiB sent): daemon CPU %.2f s" % (sum(sent), used))
    assert outcomes == {testbed.HOST_IP4: 50}
    assert sum(sent) > 20 * 900, "dropped early: %s" % sent
    assert used < 1.2, "parsed at every chunk (2.0 s measured so, 0.36 s not)"
    assert "Traceback" not in d.log()


def open_fds(d):
    """What each of the daemon's processes holds open, for a message."""
    listing = {}
    for pid in d.pids():
        try:
            listing[pid] = sorted(os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%d/fd" % pid))
        except FileNotFoundError:
            pass
    return listing


def test_deeply_nested_json_is_dropped_like_any_garbage(testbed, daemon, http):
    """JSON nested deeper than the parser's recursion limit (RecursionError, not ValueError) is
    malformed like any other: the daemon lives, drops it, closes the fds that came with it."""
    d = daemon()
    port, body = http
    fds_before = d.fd_count()
    depth = 100000
    r, w = os.pipe()
    try:
        # Left open: incomplete as far as the daemon can tell.
        hanging = unix_client(d.socket)
        hanging.sendall(b"[" * depth)
        # Complete, with an fd, then EOF.
        nested = b'{"fds": ["seccompFd"], "x": ' + b"[" * depth + b"]" * depth + b"}"
        assert send_message(d.socket, nested, (r,), end=True), "not dropped"
    finally:
        os.close(r)
        os.close(w)
    time.sleep(0.5)
    assert d.proc.poll() is None, "the daemon died (%s): %s" % (d.proc.returncode, d.log()[-3000:])
    out = run(testbed.run_container(["/bin/wget", "-q", "-O", "-", "http://198.18.0.1:%d/index.txt" % port],
                                    seccomp=d.profile), check=True).stdout
    assert out == body
    assert decision_count(d, "198.18.0.1:%d" % port) == 1
    hanging.close()
    wait_for(lambda: d.fd_count() == fds_before,
             lambda: "fd count %d back to %d: %s" % (d.fd_count(), fds_before, open_fds(d)),
             timeout=10)
    assert "Traceback" not in d.log(), d.log()[-3000:]
    assert d.stop() == 0


# -- 4. signals ---------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", RUNTIMES)
def test_sigusr1_counters_and_sigterm(testbed, daemon, http, runtime):
    """Quiet by default; SIGUSR1 logs per-container counters; SIGTERM exits 0 and cleans up."""
    pid_file = os.path.join(testbed.runtime_dir(), "b4ns-life-%s.pid" % uuid.uuid4().hex[:8])
    d = daemon(["--pid-file", pid_file], debug=False)
    port, body = http
    assert open(pid_file).read().strip() == str(d.pid)
    name = name_of("usr1")
    cid = run(testbed.run_container(["sleep", "30"], runtime=runtime, seccomp=d.profile, extra=["-d"], name=name),
              check=True).stdout.strip()
    try:
        out = run(testbed.podman(["exec", name, "/bin/wget", "-q", "-O", "-",
                                  "http://198.18.0.1:%d/index.txt" % port], runtime=runtime), check=True).stdout
        assert out == body
        os.kill(d.pid, signal.SIGUSR1)
        line = wait_for(lambda: re.search(r"container %s\S*: (bypassed=.*)$" % cid[:12], d.log(), re.M),
                        lambda: "a counters line for %s: %s" % (cid[:12], d.log()[-2000:]))
        counters = dict(item.split("=") for item in line.group(1).split())
        assert int(counters["bypassed"]) >= 1, line.group(0)
    finally:
        remove_container(testbed, name)
    assert d.decisions() == [], "decision lines without --debug"
    assert log_problems(d) == []
    assert d.stop() == 0
    assert not os.path.exists(d.socket)
    assert not os.path.exists(pid_file)


def status(testbed, d, *args):
    """`bypass4netns.py status --socket ... ARGS` as the test user: (exit code, stdout, stderr)."""
    result = run(testbed.as_user(["python3", d.script, "status", "--socket", d.socket, *args]), timeout=60)
    return result.returncode, result.stdout, result.stderr


def test_status_shows_containers_ports_and_counters(testbed, daemon, http):
    """`bypass4netns.py status` asks the running daemon over its socket: the table, and --json."""
    d = daemon()
    port, body = http
    code, out, _err = status(testbed, d)
    assert code == 0 and "pid %d" % d.pid in out and out.rstrip().endswith("no containers"), out
    name = name_of("status")
    cid = run(testbed.run_container(["sleep", "60"], seccomp=d.profile, name=name,
                                    extra=["-d", "--annotation", "bypass4netns.publish=%d:80" % testbed.free_port()]),
              check=True).stdout.strip()
    try:
        out = run(testbed.podman(["exec", name, "/bin/wget", "-q", "-O", "-",
                                  "http://198.18.0.1:%d/index.txt" % port]), check=True).stdout
        assert out == body
        code, out, _err = status(testbed, d, "--json")
        assert code == 0
        answer = json.loads(out)
        (container,) = answer["containers"]
        assert container["id"] == cid and len(container["processes"]) == 1  # podman exec's wget has exited
        assert container["counters"]["bypassed"] == 1 and re.fullmatch(r"\d+->80/tcp", container["published"][0])
        assert answer["pid"] == d.pid and answer["daemon"] == d.daemon_pid()
        assert sorted(answer["workers"]) == sorted(d.worker_pids())
        code, out, _err = status(testbed, d)
        row = next(line for line in out.splitlines() if line.startswith(cid[:12]))
        worker = "-" if container["worker"] is None else str(container["worker"])
        assert row.split()[1:4] == ["1", worker, "1"], row
    finally:
        remove_container(testbed, name)
    code, _out, err = status(testbed, d, "--socket", d.socket + ".nobody")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "no daemon answers" in err, err
    assert log_problems(d) == []


# -- 5. --ignore auto ---------------------------------------------------------------------

AUTO_CLIENT = """
    import json, socket, time
    deadline = time.monotonic() + 30
    while "fd00" not in open("/proc/net/if_inet6").read():  # slirp4netns' IPv6 comes by router advertisement
        if time.monotonic() > deadline:
            raise SystemExit("no fd00::/64 address")
        time.sleep(0.1)
    local = {}
    # Connected UDP sockets: connect sends nothing, only the decision matters.
    for host in ("10.0.2.3", "fd00::3", "198.18.0.1", "2001:db8::1"):
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((host, 53))
        local[host] = s.getsockname()[0]
    print(json.dumps(local))
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_ignore_auto_learns_the_container_subnets(testbed, daemon, runtime):
    # Connected UDP sockets are the probes: IPv4 ones are switched only without the UDP guard.
    d = daemon(["--ignore", "auto", "--no-udp-loopback-guard"])
    argv = testbed.run_container(["python3", "-c", textwrap.dedent(AUTO_CLIENT)], runtime=runtime,
                                 seccomp=d.profile)
    local = json.loads(run(argv, check=True).stdout)
    decisions = dict(d.decisions())
    assert decisions["10.0.2.3:53"] == "container (auto-ignored 10.0.2.0/24)"
    assert decisions["[fd00::3]:53"] == "container (auto-ignored fd00::/64)"
    assert decisions["198.18.0.1:53"] == "bypassed"
    assert decisions["[2001:db8::1]:53"] == "bypassed"
    assert local["10.0.2.3"] == SLIRP_ADDRESS and local["fd00::3"].startswith("fd00::")
    assert local["198.18.0.1"] == testbed.HOST_IP4 and local["2001:db8::1"] == testbed.HOST_IP6
    assert log_problems(d) == []


SUBNET_CHANGE_CLIENT = """
    import os, socket, sys
    def connect():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("198.18.0.1", 53))  # UDP: no packet is sent
        return s.getsockname()[0]
    print(connect(), flush=True)
    if os.system("ip addr add 198.18.0.200/24 dev tap0"):
        raise SystemExit("ip addr add failed")
    print("added", flush=True)
    sys.stdin.readline()
    print(connect(), flush=True)
"""


def test_ignore_auto_is_refreshed_on_sighup(testbed, daemon):
    """A subnet the container gains is auto-ignored once SIGHUP made the daemon read them again."""
    d = daemon(["--ignore", "auto", "--no-udp-loopback-guard"])  # its probe: a connected IPv4 UDP socket
    name = name_of("hup")
    client = attach_python(testbed, d, SUBNET_CHANGE_CLIENT, name=name, extra=["--cap-add", "NET_ADMIN"])
    try:
        assert client.expect() == testbed.HOST_IP4
        assert client.expect() == "added"
        reports = d.log().count(" bypassed=")
        os.kill(d.pid, signal.SIGHUP)
        os.kill(d.pid, signal.SIGUSR1)  # handled after SIGHUP: once it is logged, the refresh is due
        wait_for(lambda: d.log().count(" bypassed=") > reports, "the SIGUSR1 report")
        client.send("go")
        assert client.expect() == "198.18.0.200"
    finally:
        remove_container(testbed, name)
    assert d.decisions() == [("198.18.0.1:53", "bypassed"),
                             ("198.18.0.1:53", "container (auto-ignored 198.18.0.0/24)")]


# -- 6. the daemon killed ---------------------------------------------------------------

CRASH_CLIENT = """
    import errno, json, os, socket, sys, threading
    host, hole, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    def result(call):
        try:
            call()
            return "ok"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    pending = {}
    def hang():
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 30)
        pending["black hole"] = result(lambda: s.connect((host, hole)))
    thread = threading.Thread(target=hang)
    thread.start()
    print("connecting", flush=True)
    sys.stdin.readline()
    thread.join(60)
    out = {"black hole": pending.get("black hole", "still blocked")}
    out["tcp"] = result(lambda: socket.socket().connect((host, port)))
    out["udp"] = result(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect((host, port)))
    out["loopback"] = result(lambda: socket.socket().connect(("127.0.0.1", 1)))
    out["unix"] = result(lambda: socket.socket(socket.AF_UNIX).connect("/nonexistent"))
    out["bind"] = result(lambda: socket.socket().bind(("0.0.0.0", 0)))
    out["untrapped"] = result(lambda: os.close(os.open("/etc/passwd", os.O_RDONLY)))
    print(json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_daemon_killed_trapped_syscalls_fail_with_enosys(testbed, daemon, black_hole, http, runtime):
    """What users hit when the daemon dies: every trapped syscall of a running container fails
    with ENOSYS (the kernel's answer once the listener is gone), a blocking connect in flight
    included; other syscalls work. A daemon started again on the stale socket serves new containers."""
    d = daemon()
    port, body = http
    name = name_of("crash")
    client = attach_python(testbed, d, CRASH_CLIENT, (testbed.HOST_IP4, black_hole, port), runtime=runtime,
                           name=name)
    try:
        assert client.expect() == "connecting"
        wait_for(lambda: decision_count(d, "198.18.0.1:%d" % black_hole) == 1, "the black hole decision")
        os.kill(d.pid, signal.SIGKILL)
        assert d.proc.wait(30) == -signal.SIGKILL
        assert os.path.exists(d.socket), "a killed daemon cannot remove its socket"
        client.send("go")
        seen = json.loads(client.expect())
        assert seen == {"black hole": "ENOSYS", "tcp": "ENOSYS", "udp": "ENOSYS", "loopback": "ENOSYS",
                        "unix": "ENOSYS", "bind": "ENOSYS", "untrapped": "ok"}, seen

        # A new daemon on the same socket path takes over the stale socket;
        # containers started from now on are bypassed again.
        again = daemon(["--socket", d.socket])
        again.socket = d.socket
        argv = testbed.run_container(["/bin/wget", "-q", "-O", "-", "http://198.18.0.1:%d/index.txt" % port],
                                     runtime=runtime, seccomp=d.profile)
        assert run(argv, check=True).stdout == body
        assert decision_count(again, "198.18.0.1:%d" % port) == 1
        assert log_problems(again) == []
    finally:
        remove_container(testbed, name)
    client.proc.wait(60)


# -- 7. worker processes --------------------------------------------------------------

STORM = """
    import signal, socket, sys
    # A connect whose notification died with its worker waits until a signal
    # interrupts it; Python then makes the call again (PEP 475).
    signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
    host, port = sys.argv[1], int(sys.argv[2])
    print("ready", flush=True)
    for line in sys.stdin:
        seen = set()
        for _ in range(int(line)):
            try:
                s = socket.create_connection((host, port), timeout=10)
                seen.add(s.getsockname()[0])
                s.close()
            except OSError as e:
                seen.add(type(e).__name__)
        print(" ".join(sorted(seen)), flush=True)
"""


def serving_worker(d):
    """The pid of the worker process that holds a seccomp notify fd."""
    for pid in d.worker_pids():
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "anon_inode:seccomp notify":
                    return pid
            except FileNotFoundError:
                pass
    return None


def assert_only_the_kill_logged(d):
    """The daemon logged no problem but a worker's death, and stops cleanly."""
    assert [line for line in log_problems(d) if "replacing it" not in line] == []
    assert d.stop() == 0


LATE_SERVER = """
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], int(sys.argv[2])))
listener.listen(1)
print("ready", flush=True)
sys.stdin.readline()  # till then the backlog is full: SYNs are dropped, the clients' connects wait
while True:
    listener.accept()[0].close()
"""

BLOCKING_CONNECTS = """
    import collections, json, socket, sys, threading
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    outcomes = collections.Counter()
    def connect():
        s = socket.socket()  # blocking, no timeout: its connect waits in the daemon's loop
        try:
            s.connect((host, port))
            outcomes[s.getsockname()[0]] += 1
        except OSError as e:
            outcomes["errno %d" % e.errno] += 1
    threads = [threading.Thread(target=connect) for _ in range(n)]
    for t in threads:
        t.start()
    print("started", flush=True)
    for t in threads:
        t.join()
    print(json.dumps(outcomes), flush=True)
"""


def test_calls_a_killed_worker_left_are_answered(testbed, daemon, server):
    """Blocking connects wait in a worker's loop when it is killed: no signal will ever come to
    those threads.  The daemon answers what the worker left with EINTR; the connection goes on
    (POSIX), Python waits for it, and every connect ends connected, bypassed."""
    d = daemon(["--workers", "2"])
    port = testbed.free_port()
    late = server(["python3", "-c", LATE_SERVER, testbed.HOST_IP4, str(port)], stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, universal_newlines=True)
    assert late.stdout.readline() == "ready\n"
    dest = "198.18.0.1:%d" % port
    client = attach_python(testbed, d, BLOCKING_CONNECTS, (testbed.HOST_IP4, port, 10), name=name_of("orphans"))
    try:
        assert client.expect() == "started"
        wait_for(lambda: decision_count(d, dest) >= 10, "10 connects switched and waiting")
        victim = serving_worker(d)
        os.kill(victim, signal.SIGKILL)
        line = wait_for(lambda: re.search(r"worker \d+: (\d+) call\(s\) it left under way answered EINTR", d.log()),
                        "the orphans answered")
        assert int(line.group(1)) >= 1
        print("a worker killed under 10 blocking connects: %s answered EINTR" % line.group(1))
        late.stdin.write("go\n")
        late.stdin.flush()
        outcomes = json.loads(client.expect(timeout=120))
        assert outcomes == {testbed.HOST_IP4: 10}, outcomes
    finally:
        client.proc.stdin.close()
        client.proc.wait(60)
    assert_only_the_kill_logged(d)


ON_REQUEST = """
    import socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    print("ready", flush=True)
    for line in sys.stdin:
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect((host, port))
            print(s.getsockname()[0], flush=True)
        except OSError as e:
            print("errno", e.errno, flush=True)
        s.close()
"""


def test_what_a_container_sees_when_the_daemon_is_gone(testbed, daemon, http):
    """README "When the daemon is not there", as measured: SIGSTOP makes trapped calls wait
    (the application's own timeout does not run meanwhile); after SIGKILL every trapped call
    fails with ENOSYS, also once a new daemon listens on the same socket; a container started
    while no daemon listens does not start."""
    d = daemon()
    port, _body = http
    client = attach_python(testbed, d, ON_REQUEST, (testbed.HOST_IP4, port), name=name_of("gone"))
    try:
        assert client.expect() == "ready"
        client.send("")
        assert client.expect() == testbed.HOST_IP4
        stopped = d.pids()  # the daemon and its workers
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            client.send("")
            with pytest.raises(AssertionError, match="no output"):
                client.expect(timeout=8)  # longer than the client's own 5 s timeout
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        assert client.expect() == testbed.HOST_IP4, "answered once the daemon runs again"
        workers = d.pids()[1:]
        os.kill(d.pid, signal.SIGKILL)
        d.proc.wait(30)
        # Its workers die with it (PR_SET_PDEATHSIG): then no one holds the notify fd.
        wait_for(lambda: not any(os.path.exists("/proc/%d/fd" % pid) for pid in workers), "the workers gone")
        client.send("")
        assert client.expect() == "errno %d" % errno.ENOSYS
    finally:
        client.proc.stdin.close()
        client.proc.wait(60)
    result = run(testbed.run_container(["true"], seccomp=d.profile))
    assert result.returncode != 0 and "seccomp agent" in result.stderr, result.stderr[-500:]


CONNECT_LOOP = """
    import collections, json, socket, sys, time
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    outcomes = collections.Counter()
    longest = 0.0
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            s = socket.create_connection((host, port), timeout=10)
            outcomes[s.getsockname()[0]] += 1
            s.close()
        except OSError as e:
            outcomes["errno %s" % e.errno] += 1
        longest = max(longest, time.monotonic() - start)
    print(json.dumps([outcomes, longest]), flush=True)
"""

PUBLISHED_SERVER = """
    import socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 80))
    s.listen(64)
    print("listening", flush=True)
    while True:
        conn, peer = s.accept()
        conn.sendall(("%s\\n" % peer[0]).encode())
        conn.close()
"""


def published_says(testbed, port):
    code = "import socket, sys; print(socket.create_connection((sys.argv[1], int(sys.argv[2]))).makefile().readline())"
    return run(testbed.in_netns(["python3", "-c", code, testbed.HOST_IP4, str(port)]), check=True).stdout.strip()


def published_server_and_loop(testbed, d, acceptor, seconds):
    """A container serving its port 80 (published) and one connecting in a loop for `seconds`:
    (server, its name, client), both started."""
    server_name = name_of("published")
    server = attach_python(testbed, d, PUBLISHED_SERVER, (), name=server_name)
    client = attach_python(testbed, d, CONNECT_LOOP, (testbed.HOST_IP4, acceptor, seconds), name=name_of("loop"))
    assert server.expect() == "listening" and client.expect() == "ready"
    return server, server_name, client


def test_take_over_five_times_under_a_connect_loop(testbed, daemon, acceptor):
    """--take-over, five times in a row, while a container connects in a loop and another
    serves a published port: no connect fails or goes through slirp4netns, the published port
    answers throughout, each old daemon exits 0, and the counters carry over."""
    published = testbed.free_port()
    first = daemon(["-p", "%d:80" % published])
    server, server_name, client = published_server_and_loop(testbed, first, acceptor, 10)
    try:
        assert published_says(testbed, published) == testbed.HOST_IP4
        current = first
        for _ in range(5):
            time.sleep(1)
            new = daemon(["-p", "%d:80" % published], take_over=current)
            assert current.proc.wait(30) == 0, current.log()[-2000:]
            assert "handed over: 2 containers" in current.log() and os.path.exists(current.socket)
            assert published_says(testbed, published) == testbed.HOST_IP4
            current = new
        outcomes, longest = json.loads(client.expect(timeout=120))
        print("5 take-overs: %s connects, the longest %.1f ms" % (outcomes, longest * 1000))
        assert list(outcomes) == [testbed.HOST_IP4] and outcomes[testbed.HOST_IP4] > 500, outcomes
        os.kill(current.pid, signal.SIGUSR1)
        line = wait_for(lambda: re.findall(r"container \S+: (bypassed=\d+) .*published=1", current.log()),
                        "the counters of the published container")
        assert line
        counts = [int(n) for n in re.findall(r"bypassed=(\d+)", current.log().split("took over")[-1])]
        # Seen once in 44,031 connects: one bypass logged as decided but not counted (notifications
        # were exact); the cause is not found, so the counters are held to within one per hand-over.
        assert max(counts) >= outcomes[testbed.HOST_IP4] - 5, "the loop's counters did not carry over"
    finally:
        for attached in (client, server):
            attached.proc.stdin.close()
        remove_container(testbed, server_name)
    assert log_problems(current) == []


def test_a_killed_worker_is_replaced_and_the_container_served_on(testbed, daemon, http):
    d = daemon(["--workers", "2"])
    port, _body = http
    client = attach_python(testbed, d, STORM, (testbed.HOST_IP4, port), name=name_of("storm"))
    try:
        assert client.expect() == "ready"
        assert len(d.worker_pids()) == 2
        victim = wait_for(lambda: serving_worker(d), "the worker serving the container")
        client.send("400")
        wait_for(lambda: decision_count(d, "198.18.0.1:%d" % port) >= 20, "the storm to start")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: "(pid %d) was killed by signal 9: replacing it" % victim in d.log(), "the replacement")
        client.expect(timeout=120)  # the storm ends, whatever the killed worker left behind
        before = decision_count(d, "198.18.0.1:%d" % port)
        client.send("50")
        assert client.expect() == testbed.HOST_IP4, "connects after the replacement must be bypassed"
        assert decision_count(d, "198.18.0.1:%d" % port) - before == 50
        assert len(d.worker_pids()) == 2 and victim not in d.pids()
    finally:
        client.proc.stdin.close()
        client.proc.wait(60)
    assert_only_the_kill_logged(d)


# -- 8. the keeper: a dead daemon started again, the script reloaded in place -----------------

@pytest.mark.parametrize("workers", [[], ["--workers", "1"]], ids=["default-workers", "one-process"])
def test_a_killed_daemon_is_started_again_and_its_containers_served_on(testbed, daemon, acceptor, workers):
    """SIGKILL of the daemon (not of its keeper, the pid started) three times while a container
    connects in a loop and another serves a published port: the keeper starts another daemon with
    every notify fd each time; every connect of the loop is bypassed (none continued), the port stays served,
    the counters carry over.  The longest pause and what the killed daemon's calls got are printed."""
    published = testbed.free_port()
    d = daemon(["-p", "%d:80" % published, *workers])
    server, server_name, client = published_server_and_loop(testbed, d, acceptor, 8)
    try:
        killed = []
        for round_ in range(3):
            time.sleep(1)
            victim = d.daemon_pid()
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            wait_for(lambda: d.log().count("starting another with its 2 containers") == round_ + 1,
                     "the keeper to start another daemon")
            assert "the daemon (pid %d) was killed by signal 9" % victim in d.log()
            wait_for(lambda: d.daemon_pid() not in killed + [None], "the new daemon")
            assert published_says(testbed, published) == testbed.HOST_IP4
        outcomes, longest = json.loads(client.expect(timeout=120))
        print("3 daemons killed: %s connects, the longest %.1f ms" % (outcomes, longest * 1000))
        # The calls in flight are answered EINTR (a connect under way goes on) or handled anew by
        # the next daemon: none is continued, so none goes the container's way.
        assert set(outcomes) == {testbed.HOST_IP4}, outcomes
        assert outcomes[testbed.HOST_IP4] > 300, outcomes
        os.kill(d.pid, signal.SIGUSR1)  # the keeper passes it on
        wait_for(lambda: "published=1" in d.log().split("killed by signal 9")[-1], "the counters")
        counts = [int(n) for n in re.findall(r"bypassed=(\d+)", d.log().split("killed by signal 9")[-1])]
        # A daemon killed between its answer and its count loses that count.
        assert max(counts) >= outcomes[testbed.HOST_IP4] - len(killed), "the loop's counters did not carry over"
    finally:
        for attached in (client, server):
            attached.proc.stdin.close()
        remove_container(testbed, server_name)
    assert [line for line in log_problems(d) if "killed by signal 9" not in line] == []
    assert d.stop() == 0 and not os.path.exists(d.socket)


def notify_socket(testbed):
    """A datagram socket where the test user's daemon can send what systemd would receive."""
    path = os.path.join(testbed.runtime_dir(), "notify-%s.sock" % uuid.uuid4().hex[:8])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    os.chmod(path, 0o777)
    sock.settimeout(30)
    return sock, path


def test_sigusr2_runs_the_new_file_in_place(testbed, daemon, acceptor):
    """systemd's reload (ExecReload=kill -USR2 $MAINPID): the keeper runs the script file anew in
    its own process, which takes everything over; a connect loop never fails nor leaves the host,
    the pid stays, systemd is told RELOADING=1 then READY=1.  A file that does not run is refused."""
    notify, notify_path = notify_socket(testbed)
    try:
        d = daemon(env={"NOTIFY_SOCKET": notify_path})
        assert notify.recv(4096).decode().split("\n") == ["READY=1", "MAINPID=%d" % d.pid]
        client = attach_python(testbed, d, CONNECT_LOOP, (testbed.HOST_IP4, acceptor, 6), name=name_of("loop"))
        assert client.expect() == "ready"
        time.sleep(1)
        with open(d.script) as f:
            code = f.read()
        code = code.replace('__version__ = "', '__version__ = "reloaded-', 1)
        with open(d.script, "w") as f:
            f.write(code)
        old_daemon = d.daemon_pid()
        os.kill(d.pid, signal.SIGUSR2)
        assert notify.recv(4096).decode().startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert notify.recv(4096).decode().split("\n") == ["READY=1", "MAINPID=%d" % d.pid]
        _code, out, _err = status(testbed, d, "--json")
        answer = json.loads(out)
        assert answer["version"].startswith("reloaded-") and answer["pid"] == d.pid, answer
        assert answer["daemon"] != old_daemon and len(answer["containers"]) == 1
        outcomes, longest = json.loads(client.expect(timeout=120))
        print("reloaded: %s connects, the longest %.1f ms" % (outcomes, longest * 1000))
        assert list(outcomes) == [testbed.HOST_IP4] and outcomes[testbed.HOST_IP4] > 300, outcomes

        with open(d.script, "w") as f:
            f.write(code + "\ndef broken(:\n")
        os.kill(d.pid, signal.SIGUSR2)
        wait_for(lambda: "does not run (SyntaxError" in d.log(), "the broken file refused")
        with open(d.script, "w") as f:  # `status` runs it too
            f.write(code)
        assert json.loads(status(testbed, d, "--json")[1])["version"].startswith("reloaded-")
        assert d.stop() == 0
        assert notify.recv(4096) == b"STOPPING=1"
    finally:
        notify.close()
        os.unlink(notify_path)
    assert [line for line in log_problems(d) if "does not run" not in line] == []


def test_no_keeper_is_one_process_that_cannot_reload(testbed, daemon):
    d = daemon(["--no-keeper", "--workers", "1"])
    assert d.pids() == [d.pid] and d.daemon_pid() == d.pid
    os.kill(d.pid, signal.SIGUSR2)
    wait_for(lambda: "runs without a keeper (--no-keeper)" in d.log(), "SIGUSR2 refused")
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_a_daemon_that_keeps_dying_is_given_up(testbed, daemon):
    """More than 5 deaths within a minute: the keeper stops starting daemons, says so, exits 1."""
    d = daemon()
    killed = []
    for _ in range(6):
        victim = wait_for(lambda: d.daemon_pid() not in killed and d.daemon_pid(), "a daemon to kill")
        wait_for(lambda: " listening on " in d.log().split("daemon: pid %d" % victim)[-1], "it to listen")
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
    assert d.proc.wait(60) == 1
    assert "(pid %d) was killed by signal 9, the 6th time in 60 s: giving up" % killed[-1] in d.log()
    assert d.log().count("starting another") == 5
