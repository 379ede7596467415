"""The bypass4netnsd API, driven as nerdctl's OCI hooks drive it, against real podman containers.

nerdctl itself is not installable on this machine (it is not in Debian 12): the calls follow
its source (pkg/bypass4netnsutil: at createRuntime a POST of a BypassSpec whose socketPath is
$XDG_RUNTIME_DIR/bypass4netns/<first 15 characters of the id>.sock, the container's seccomp
listenerPath; at postStop a DELETE), made here with Python's http.client over the unix socket.
"""

import errno
import http.client
import json
import os
import shutil
import signal
import socket
import uuid

import pytest

from e2e.daemon import Daemon, generate_profile, run
from e2e.test_daemon_life import wait_for
from e2e.test_publish import SERVE, connect_errno, fetch


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("bypass4netnsd", timeout=30)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.unix_path)


def api(d, method, path, body=None):
    """(status, JSON answer or raw body) of one request, as nerdctl's Go client makes it."""
    conn = UnixHTTPConnection(d.api_socket)
    try:
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data


@pytest.fixture
def api_daemon(testbed):
    socket_dir = os.path.join(testbed.runtime_dir(), "bypass4netns-api-" + uuid.uuid4().hex[:8])
    os.mkdir(socket_dir, 0o700)
    os.chown(socket_dir, testbed.user_uid(), testbed.user_gid())
    api_socket = os.path.join(testbed.runtime_dir(), "b4ns-api-%s.sock" % uuid.uuid4().hex[:8])
    d = Daemon(["--ignore", "10.0.0.0/8", "--api-socket", api_socket])
    d.api_socket, d.socket_dir = api_socket, socket_dir
    yield d
    assert d.stop() == 0
    assert not os.path.exists(api_socket)
    assert "Traceback" not in d.log(), d.log()[-3000:]
    shutil.rmtree(socket_dir, ignore_errors=True)


def nerdctl_spec(d, cid, port):
    """The BypassSpec nerdctl posts for a container `cid` publishing host `port` -> 80."""
    base = os.path.join(d.socket_dir, cid[:15])
    return {"id": cid, "socketPath": base + ".sock", "pidFilePath": base + ".pid",
            "logFilePath": base + ".log",
            "portMapping": [{"protos": ["tcp"], "parentIP": "", "parentPort": port, "childIP": "", "childPort": 80}],
            "ignoreSubnets": ["127.0.0.0/8", "10.0.2.0/24", "auto"], "ignoreBind": False}


def test_nerdctl_hooks_start_and_stop_a_bypass(testbed, api_daemon):
    d = api_daemon
    cid = uuid.uuid4().hex * 2
    port = testbed.free_port()
    spec = nerdctl_spec(d, cid, port)
    assert api(d, "GET", "/v1/bypass") == (200, [])
    status, answer = api(d, "POST", "/v1/bypass", spec)
    assert status == 201 and answer == {"id": cid, "pid": d.pid, "spec": spec}, answer
    assert os.path.exists(spec["socketPath"]), "listening before the answer: the runtime connects next"
    assert open(spec["pidFilePath"]).read().strip() == str(d.pid)
    assert api(d, "GET", "/v1/bypass") == (200, [answer])

    # The container, with a profile whose listenerPath is the spec's socket.
    name = "b4ns-api-" + uuid.uuid4().hex[:8]
    run(testbed.run_container(["python3", "-c", SERVE, "0.0.0.0", "80"], seccomp=generate_profile(spec["socketPath"]),
                              name=name, extra=["-d"]), check=True)
    try:
        result = fetch(testbed, testbed.HOST_IP4, port, source=testbed.HOST_IP4_B)
        assert result.stdout.split() == ["80", testbed.HOST_IP4_B], result.stderr
        assert "bind 0.0.0.0:80: published as %d->80/tcp: ok" % port in d.log()
    finally:
        run(testbed.podman(["rm", "-f", "-t", "0", name]), timeout=120)

    # postStop: DELETE.  The socket, the pid file and the port are free again.
    assert api(d, "DELETE", "/v1/bypass/" + cid) == (200, b"")
    assert not os.path.exists(spec["socketPath"]) and not os.path.exists(spec["pidFilePath"])
    assert api(d, "GET", "/v1/bypass") == (200, [])
    assert connect_errno(testbed, testbed.HOST_IP4, port) == errno.ECONNREFUSED
    # SO_REUSEADDR: past the fetch's TIME_WAIT; not past a socket bound without it, as the daemon's are
    bind = ("import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            "s.bind(('0.0.0.0', int(sys.argv[1]))); print('free')")
    assert run(testbed.in_netns(["python3", "-c", bind, str(port)]), timeout=60).stdout.strip() == "free", \
        "the daemon still holds the port"


def test_bad_api_input_gets_its_status_and_the_daemon_serves_on(testbed, api_daemon):
    d = api_daemon
    good = nerdctl_spec(d, uuid.uuid4().hex, testbed.free_port())
    assert api(d, "POST", "/v1/bypass", good)[0] == 201
    missing_dir = dict(good, id="other", socketPath="/nonexistent-%s/x.sock" % uuid.uuid4().hex, portMapping=[])
    cases = [
        (("POST", "/v1/bypass", b"{not json"), 400, "malformed JSON"),
        (("POST", "/v1/bypass", dict(good, id="x2", unknown=1)), 400, "unknown field"),
        (("POST", "/v1/bypass", {k: v for k, v in good.items() if k != "id"}), 400, "id:"),
        (("POST", "/v1/bypass", missing_dir), 400, "no directory"),
        (("POST", "/v1/bypass", good), 400, "exists"),
        (("POST", "/v1/bypass", dict(good, id="taken", socketPath=good["socketPath"] + "2", pidFilePath="")),
         400, "published already"),
        (("DELETE", "/v1/bypass/unknown", None), 400, "no bypass"),
        (("GET", "/v2/other", None), 404, "no such path"),
        (("PUT", "/v1/bypass", None), 405, "GET or POST"),
    ]
    for request, status, needle in cases:
        got, answer = api(d, *request)
        assert got == status and needle in answer["message"], (request[:2], got, answer)

    # A 10 MiB body: refused from its headers, the rest unread.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(30)
        raw.connect(d.api_socket)
        raw.sendall(b"POST /v1/bypass HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (10 << 20))
        try:
            raw.sendall(b"x" * (10 << 20))
        except OSError:
            pass  # closed by the daemon: what it answered is still there to read
        assert raw.recv(100).startswith(b"HTTP/1.1 413 ")
    # A client that connects and says nothing, one that closes at once.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(d.api_socket)
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(d.api_socket)
    try:
        status, answer = api(d, "GET", "/v1/bypass")
        assert status == 200 and [b["id"] for b in answer] == [good["id"]]
        assert api(d, "DELETE", "/v1/bypass/" + good["id"]) == (200, b"")
    finally:
        silent.close()
    assert d.proc.poll() is None


def test_a_bypass_survives_a_take_over(testbed, api_daemon):
    """--take-over hands the API's socket and every bypass over: the new daemon lists it, and
    its DELETE frees the socket and the pid file."""
    d = api_daemon
    spec = nerdctl_spec(d, uuid.uuid4().hex, testbed.free_port())
    assert api(d, "POST", "/v1/bypass", spec)[0] == 201
    new = Daemon(["--ignore", "10.0.0.0/8", "--api-socket", d.api_socket], take_over=d)
    new.api_socket = d.api_socket
    try:
        assert d.proc.wait(30) == 0
        assert os.path.exists(spec["socketPath"]) and os.path.exists(d.api_socket)
        status, answer = api(new, "GET", "/v1/bypass")
        assert status == 200 and [b["spec"] for b in answer] == [spec]
        assert api(new, "DELETE", "/v1/bypass/" + spec["id"]) == (200, b"")
        assert not os.path.exists(spec["socketPath"]) and not os.path.exists(spec["pidFilePath"])
    finally:
        assert new.stop() == 0


def test_a_bypass_and_its_container_survive_a_killed_daemon(testbed, api_daemon):
    """The keeper holds the API's socket and each bypass's with the daemon's other fds: a daemon
    killed (SIGKILL) is followed by one that lists the bypass, serves its container's published
    port, and answers the API."""
    d = api_daemon
    port = testbed.free_port()
    spec = nerdctl_spec(d, uuid.uuid4().hex * 2, port)
    assert api(d, "POST", "/v1/bypass", spec)[0] == 201
    name = "b4ns-api-" + uuid.uuid4().hex[:8]
    run(testbed.run_container(["python3", "-c", SERVE, "0.0.0.0", "80"], seccomp=generate_profile(spec["socketPath"]),
                              name=name, extra=["-d"]), check=True)
    try:
        assert fetch(testbed, testbed.HOST_IP4, port, source=testbed.HOST_IP4_B).stdout.split()[0] == "80"
        victim = d.daemon_pid()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: "the daemon (pid %d) was killed by signal 9: starting another with its 1 containers"
                 % victim in d.log(), "the keeper to start another daemon")
        wait_for(lambda: " listening on " in d.log().split("killed by signal 9")[-1], "the new daemon")
        status, answer = api(d, "GET", "/v1/bypass")
        assert status == 200 and [b["spec"] for b in answer] == [spec] and answer[0]["pid"] == d.pid, answer
        result = fetch(testbed, testbed.HOST_IP4, port, source=testbed.HOST_IP4_B)
        assert result.stdout.split() == ["80", testbed.HOST_IP4_B], result.stderr
    finally:
        run(testbed.podman(["rm", "-f", "-t", "0", name]), timeout=120)
    assert api(d, "DELETE", "/v1/bypass/" + spec["id"]) == (200, b"")
    assert not os.path.exists(spec["socketPath"]) and not os.path.exists(spec["pidFilePath"])
