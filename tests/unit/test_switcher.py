"""The switcher's handlers against a real kernel: a child under a real seccomp filter.

No root and no container: the child (notify_target.Target) has a user and
network namespace of its own, the test's namespace plays the host's, and a
real Daemon answers the child's connect, bind and listen.  A loopback
destination is never bypassed, except the container's own published port:
so these tests reach "the host" through -p 127.0.0.1:HOSTPORT:CONTAINERPORT.
"""

import errno
import json
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from . import load, notify_target

b4ns = load("bypass4netns.py", "bypass4netns")

CONTAINER_PORT = 80


@pytest.fixture
def host_listener():
    """A TCP listener on the test namespace's loopback: the host side of a published port."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener


@pytest.fixture
def target(tmp_path, caplog):
    """start(publish) -> a Target whose notifications a fresh Daemon answers."""
    why = notify_target.can_run()
    if why:
        pytest.skip(why)
    made = []

    def start(publish=()):
        daemon = b4ns.Daemon(str(tmp_path / "unused.sock"), [], False, b4ns.build_publish_table(publish),
                             debug=True, reserve_ports=False)
        made.append(daemon)
        made.append(notify_target.Target(b4ns, daemon))
        return made[-1]
    caplog.set_level(logging.DEBUG, logger="bypass4netns")
    yield start
    for thing in reversed(made):
        thing.close()


def counters(target):
    (container,) = target.daemon.pool.server.containers.values()
    return dict(zip(b4ns.COUNTERS, container.counters))


def published(listener):
    return ["127.0.0.1:%d:%d" % (listener.getsockname()[1], CONTAINER_PORT)]


def test_a_published_port_on_loopback_is_reached_on_the_host_side(target, host_listener):
    t = target(published(host_listener))
    peer = t.run("""
s = socket.socket()
s.connect(("127.0.0.1", %d))
result = s.getpeername()
""" % CONTAINER_PORT)
    assert peer == ["127.0.0.1", host_listener.getsockname()[1]]
    host_listener.settimeout(5)
    host_listener.accept()[0].close()  # it is in this namespace: switched
    assert counters(t)["bypassed"] == 1


def test_other_loopback_destinations_stay_in_the_container(target, caplog):
    t = target()
    got = t.run("""
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
s = socket.socket()
s.connect(listener.getsockname())
conn, _ = listener.accept()
result = [conn.getpeername() == s.getsockname(), s.getsockname()[0]]
""")
    assert got == [True, "127.0.0.1"]
    assert counters(t)["container"] == 1 and counters(t)["bypassed"] == 0
    assert "bind 127.0.0.1:0: container" in caplog.text and ": container (loopback)" in caplog.text


def test_a_nonblocking_connect_seen_complete_is_answered_0_then_eisconn(target, host_listener):
    t = target(published(host_listener))
    got = t.run("""
s = socket.socket()
s.setblocking(False)
result = [s.connect_ex(("127.0.0.1", %d)), s.connect_ex(("127.0.0.1", %d)), s.getblocking()]
""" % (CONTAINER_PORT, CONTAINER_PORT))
    assert got == [0, errno.EISCONN, False]


def test_a_refused_connect_gets_the_kernels_errno_and_stays_in_the_container(target):
    with socket.socket() as closed:  # bound, not listening: a connect is refused at once
        closed.bind(("127.0.0.1", 0))
        t = target(["127.0.0.1:%d:%d" % (closed.getsockname()[1], CONTAINER_PORT)])
        got = t.run("""
s = socket.socket()
probe = socket.socket()
result = [s.connect_ex(("127.0.0.1", %d)),
          s.getsockopt(socket.SOL_SOCKET, 71, 8) == probe.getsockopt(socket.SOL_SOCKET, 71, 8)]
""" % CONTAINER_PORT)  # 71: SO_NETNS_COOKIE
    assert got == [errno.ECONNREFUSED, True], "errno, and whether the socket is still the container's"


def test_a_handler_that_answers_twice_is_caught_and_the_daemon_goes_on(target, host_listener, caplog):
    t = target(published(host_listener))
    switcher = t.daemon.pool.server.switcher
    bind_entry = next(key for key, (handler, _ptr) in switcher.dispatch.items() if handler.__name__ == "on_bind")

    def answers_twice(call):
        call.let_run()
        call.let_run()
    switcher.dispatch[bind_entry] = (answers_twice, 8)
    got = t.run("""
s = socket.socket()
s.bind(("127.0.0.1", 0))
c = socket.socket()
c.setblocking(False)
result = c.connect_ex(("127.0.0.1", %d))
""" % CONTAINER_PORT)
    assert got == 0, "the bind ran once and the daemon still answers"
    assert counters(t)["errors"] == 1 and "answered twice" in caplog.text


def test_continue_after_reading_memory_is_refused_by_the_call_itself(target, host_listener, caplog):
    t = target(published(host_listener))
    switcher = t.daemon.pool.server.switcher
    bind_entry = next(key for key, (handler, _ptr) in switcher.dispatch.items() if handler.__name__ == "on_bind")

    def reads_then_continues(call):
        switcher.targets.read(call, call.args[1], 16)
        call.let_run()
    switcher.dispatch[bind_entry] = (reads_then_continues, 8)
    got = t.run("""
s = socket.socket()
result = s.connect_ex(("127.0.0.1", 1)) if False else None
try:
    s.bind(("127.0.0.1", 0))
    result = "bound"
except OSError as e:
    result = errno.errorcode[e.errno]
""")
    assert got == "EIO", "after reading memory, a failed handler's call is failed, never continued"
    assert "CONTINUE asked after reading" in caplog.text


DRAIN = """
import socket, sys, time
listener = socket.socket(fileno=int(sys.argv[1]))
time.sleep(0.3)
filler = listener.accept()  # A's retransmitted SYN gets in
time.sleep(2.5)
a = listener.accept()       # after A's deadline: B's SYN gets in
time.sleep(2.5)
"""


def test_a_finished_blocking_connect_leaves_no_timer_behind(target, host_listener):
    """Regression: timers were (deadline, fd) pairs that outlived their connect.

    Connect A has SO_SNDTIMEO 2.5 s and ends at about 1 s; connect B, with no
    timeout, is still under way when A's deadline passes, on a host socket
    that reuses A's fd number in the daemon (A is closed first).  B must end as its
    handshake does (0), not "time out" with EINPROGRESS at A's deadline.  The
    host listener's accept queue (backlog 0, so one connection fills it) is
    what holds each handshake: a SYN to a full queue is dropped and
    retransmitted a second later.
    """
    host_listener.listen(0)
    filler = socket.create_connection(host_listener.getsockname())  # fills the queue
    t = target(published(host_listener))
    # The queue is drained by a process of its own: an accept here would take
    # an fd number in the daemon's process and shift the numbers this test lines up.
    drainer = subprocess.Popen([sys.executable, "-c", DRAIN, str(host_listener.fileno())],
                               pass_fds=[host_listener.fileno()])
    try:
        got = t.run("""
a = socket.socket()
a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("qq", 2, 500000))
ra = a.connect_ex(("127.0.0.1", %d))
a.close()  # B gets A's fd number, here and in the daemon
b = socket.socket()
rb = b.connect_ex(("127.0.0.1", %d))
result = [ra, rb]
""" % (CONTAINER_PORT, CONTAINER_PORT), timeout=60)
    finally:
        drainer.wait(30)
        filler.close()
    assert got == [0, 0], "connect B answered %s" % errno.errorcode.get(got[1], got[1])
    assert not t.daemon.pool.server.switcher.pending


def test_calls_on_what_is_not_an_ip_socket_get_the_kernels_answers_and_cost_no_fd(target):
    """A unix socket's connect is made by the container's NamespaceHelper, which answers it; the
    daemon keeps no fd of it."""
    import os
    t = target()
    # A first call: the daemon opens the thread's pidfd, which it keeps while the thread lives.
    t.run("""
try:
    socket.socket(socket.AF_UNIX).connect("/nonexistent")
except OSError:
    pass
""")
    fds_before = len(os.listdir("/proc/self/fd"))
    got = t.run("""
r, w = os.pipe()
unix = socket.socket(socket.AF_UNIX)
raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", 80, socket.inet_aton("198.18.0.1"))
result = []
for fd in (r, 999):
    libc.connect(fd, raw, len(raw))
    result.append(errno.errorcode[ctypes.get_errno()])
try:
    unix.connect("/nonexistent")
except OSError as e:
    result.append(errno.errorcode[e.errno])
""")
    assert got == ["ENOTSOCK", "EBADF", "ENOENT"], "the kernel's own answers"
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert counters(t)["notifications"] == 4 and counters(t)["errors"] == 0


def test_a_refused_addfd_leaves_the_socket_in_the_container(target, host_listener, caplog):
    """ADDFD fails with EBADF when the target's fd is past its RLIMIT_NOFILE: the switch fails,
    not the call, which then runs in the container's network, with no error logged."""
    t = target(published(host_listener))
    got = t.run("""
import resource
import select
import signal
s = socket.socket()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (s.fileno(), hard))  # s is now past the limit
result = [s.connect_ex(("127.0.0.1", %d))]
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
p = socket.socket()
result.append(s.getsockopt(socket.SOL_SOCKET, 71, 8) == p.getsockopt(socket.SOL_SOCKET, 71, 8))
""" % CONTAINER_PORT)
    # Nothing listens on the published port's host side inside the container: refused there.
    assert got == [errno.ECONNREFUSED, True], "errno, and whether the socket is still the container's"
    assert "container (ADDFD failed: Bad file descriptor)" in caplog.text
    assert counters(t)["errors"] == 0 and "Traceback" not in caplog.text


def test_out_of_fds_fails_the_call_with_one_log_line(target, host_listener, caplog):
    """The daemon with no fd left cannot take the target's socket: the connect fails with
    ENOBUFS (the kernel must not run it as made: it would look the fd number up again),
    counted and logged once."""
    t = target(published(host_listener))
    connect = """
s = socket.socket()
result = s.connect_ex(("127.0.0.1", %d))
""" % CONTAINER_PORT
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1, hard))
    try:
        while True:  # the free numbers below the limit
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as e:
                assert e.errno == errno.EMFILE
                break
        results = [t.run(connect) for _ in range(3)]
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert results == [errno.ENOBUFS] * 3
    assert counters(t)["out_of_fds"] == 3 and counters(t)["errors"] == 0 and counters(t)["bypassed"] == 0
    assert caplog.text.count("the daemon is out of file descriptors") == 1, caplog.text
    # With fds again, the same connect is switched to the published port's host side.
    assert t.run(connect) == 0
    host_listener.settimeout(5)
    host_listener.accept()[0].close()
    assert counters(t)["bypassed"] == 1


def test_log_limit_says_a_repeated_line_once_then_how_often_it_came():
    logger = logging.getLogger("bypass4netns")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        limit = b4ns.LogLimit()
        limit.INTERVAL = 0.3
        for _ in range(100):
            limit.log(logging.ERROR, "accept on %s: %s", "/run/x.sock", "Too many open files")
        limit.log(logging.ERROR, "another line")
        deadline = time.monotonic() + 0.35
        while time.monotonic() < deadline:
            time.sleep(0.05)
        limit.log(logging.ERROR, "accept on %s: %s", "/run/x.sock", "Too many open files")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "accept on /run/x.sock: Too many open files",
        "another line",
        "accept on /run/x.sock: Too many open files (99 more times in the last 0.3 s)"]


@pytest.fixture
def lingering():
    """A SharedSocket whose close would wait 600 s: SO_LINGER on, and a FIN that cannot go
    (the peer reads nothing and its window is full).  Its peer closes at the end, which
    resets the connection and ends any wait."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
        shared = b4ns.SharedSocket(fileno=os.dup(client.fileno()))
        client.close()  # the container let go: the daemon's reference is the last one
        shared.setblocking(False)
        try:
            while True:
                shared.send(bytes(1 << 16))
        except BlockingIOError:
            pass
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b4ns._LINGER.pack(1, 600))
        try:
            yield shared
        finally:
            peer.close()


def close_on_a_thread(sock):
    """Close `sock` from a thread of the test's; False if that close was still waiting after 20 s."""
    closing = threading.Thread(target=sock.close)
    closing.start()
    closing.join(20)
    return not closing.is_alive()


def test_the_daemons_close_of_a_lingering_socket_never_waits(lingering):
    """As in the daemon, whose loop has a SIGALRM handler: a CLOSE_GUARD timer ends the wait."""
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    try:
        before = set(os.listdir("/proc/self/task"))
        signal.setitimer(signal.ITIMER_REAL, 0)
        lingering.close()  # from the main thread, as the daemon does: signals come here
        assert lingering.fileno() == -1
        assert set(os.listdir("/proc/self/task")) == before  # no thread needed
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_without_a_sigalrm_handler_a_lingering_socket_is_closed_on_a_thread(lingering):
    before = set(threading.enumerate())
    assert close_on_a_thread(lingering), "the daemon's close waited for the peer"
    assert lingering.fileno() == -1
    assert len(set(threading.enumerate()) - before) == 1  # SharedSocket's, still closing


def test_a_notification_taken_by_a_worker_killed_as_recv_returns_is_answered(target):
    """A worker killed right after RECV, before it could note what it took: the kernel wrote the
    notification into the worker's InflightTable row itself, and the daemon answers it from there
    (before, nobody did: the container's thread waited in its connect for ever)."""
    t = target()
    daemon = t.daemon
    (notify_fd, seccomp_filter), = daemon.pool.server.filters.items()
    # libc's connect: Python's own waits for a connect interrupted by EINTR to go on.
    t.channel.sendall(b"s = socket.socket()\n"
                      b"raw = struct.pack('=H', socket.AF_INET) + struct.pack('!H4s8x', 9, bytes([127, 0, 0, 1]))\n"
                      b"result = ctypes.get_errno() if libc.connect(s.fileno(), raw, len(raw)) else 0\n")
    select.select([notify_fd], [], [], 10)  # the child waits in its trapped connect
    worker = os.fork()
    if worker == 0:  # takes the notification, and dies before a Python line more
        try:
            daemon.inflight.writer(0).receive(seccomp_filter.key, notify_fd)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(worker, 0)
    answered, anew = b4ns.answer_orphans(daemon.inflight, 0, {seccomp_filter.key: notify_fd})
    assert answered == 0 and [key for key, _notif in anew] == [seccomp_filter.key]
    # Handled anew, as if just received: never run as made (CONTINUE).  Here its loopback
    # destination stays the child's, where nothing listens.
    daemon.pool.server.handle_anew(*anew[0])
    assert select.select([t.channel], [], [], 10)[0], "the child's connect was never answered"
    assert json.loads(t.channel.recv(1 << 16)) == {"result": errno.ECONNREFUSED}


def test_a_netlink_bind_without_groups_is_made_by_the_daemon_and_one_with_groups_by_the_helper(target, caplog):
    """glibc's getaddrinfo binds a netlink socket for each lookup: with no multicast group that
    bind depends on nobody's ids, and the daemon makes it; one that joins groups is checked
    against the caller's capabilities, so the container's helper makes it, as the caller."""
    t = target()
    got = t.run("""
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
s.bind((0, 0))
g = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
g.bind((0, 1))  # RTMGRP_LINK
result = [s.getsockname()[0] != 0, g.getsockname()[1]]
""")
    assert got == [True, 1]
    assert caplog.text.count("namespace helper pid") == 1, "only the bind with a group went to a helper"
    assert counters(t)["errors"] == 0
