"""Rootless Docker for the end-to-end tests: what Docker 20.10 (tests/e2e/test_docker.py, the
Debian 12 bed) and Docker 26 (tests/e2e/test_docker26.py, the Debian 13 bed) share.

A Dockerd subclass says where its dockerd lives; the rest is the same for both: the
dockerd's life as a fixture (run_dockerd), bypass4netns.py with the profiles the tests give
containers (b4ns_daemon), `docker run` of a command in the imported image (docker_run), and
the checks the two modules run against either Docker.
"""

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time

from e2e.daemon import Daemon, generate_profile

# Debian's CLI, whatever else is first on PATH (another docker CLI may be).
DOCKER = "/usr/bin/docker"
DOCKERD_ROOTLESS = "/usr/share/docker.io/contrib/dockerd-rootless.sh"

FETCH = """
    import json, socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
    s.sendall(b"GET /index.txt HTTP/1.0\\r\\n\\r\\n")
    data = s.makefile("rb").read()
    print(json.dumps({"sockname": s.getsockname()[0], "peername": list(s.getpeername()),
                      "body": data.split(b"\\r\\n\\r\\n", 1)[1].decode()}))
"""

# Syscalls Docker's default profile denies and the kernel would answer
# otherwise (x86_64 numbers); prints "name result" per line.
DENIAL_PROBE = """
    import ctypes, errno
    libc = ctypes.CDLL(None, use_errno=True)
    key_type, desc = ctypes.create_string_buffer(b"user"), ctypes.create_string_buffer(b"b4ns")
    calls = {
        "add_key": (248, ctypes.addressof(key_type), ctypes.addressof(desc), 0, 0, -2),
        "request_key": (249, ctypes.addressof(key_type), ctypes.addressof(desc), 0, 0),
        "userfaultfd": (323, 1),  # UFFD_USER_MODE_ONLY: allowed to unprivileged users
        "personality": (135, 0x0040000),  # ADDR_COMPAT_LAYOUT
    }
    for name, (nr, *args) in calls.items():
        ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
        print(name, "ok" if ret >= 0 else errno.errorcode[ctypes.get_errno()])
"""


def python(code, *args):
    return ["python3", "-c", textwrap.dedent(code)] + [str(a) for a in args]


class Dockerd:
    """A rootless dockerd of the test user in the test namespace: dockerd-rootless.sh execs
    rootlesskit (the pid we hold), which runs dockerd and its containerd in a user+mount+network
    namespace, with slirp4netns (dockerd-rootless.sh's default) and vfs storage.

    A subclass sets home (the data root and settings: ROOT + home on the host) and xdg (dockerd's
    runtime dir: sockets, pid file), makes both, lists in host_dirs what remove_dirs() removes,
    then calls start()."""

    ROOT = ""  # where the file system dockerd sees is on the host

    def start(self, testbed, as_user, log_path, args=()):
        """Start dockerd (as_user: testbed.as_user or its like) with args added; wait until it answers."""
        self.tb, self.as_user = testbed, as_user
        settings = self.home + "/daemon.json"
        with open(self.ROOT + settings, "w") as f:
            f.write("{}\n")  # not ~/.config/docker/daemon.json, which may say anything
        os.chown(self.ROOT + settings, testbed.user_uid(), testbed.user_gid())
        self.env = {"XDG_RUNTIME_DIR": self.xdg, "DOCKER_HOST": "unix://%s/docker.sock" % self.xdg,
                    "DOCKER_CONFIG": self.home + "/cli"}
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        env = dict(self.env, DOCKERD_ROOTLESS_ROOTLESSKIT_NET="slirp4netns",
                   DOCKERD_ROOTLESS_ROOTLESSKIT_MTU="65520",
                   DOCKERD_ROOTLESS_ROOTLESSKIT_FLAGS="--state-dir=%s/rootlesskit" % self.xdg)
        self.proc = testbed.start_server(
            as_user([DOCKERD_ROOTLESS, "--storage-driver", "vfs", "--data-root", self.home + "/data",
                     "--config-file", settings] + list(args), env=env),
            netns=False, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            res = self.docker(["info", "--format", "{{.ServerVersion}} {{.DockerRootDir}}"], timeout=30)
            if res.returncode == 0 and self.home in res.stdout:
                self.version = res.stdout.split()[0]
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("rootless dockerd did not start:\n" + self.log()[-4000:])
            time.sleep(0.2)

    def docker(self, args, timeout=120, **kwargs):
        argv = self.as_user([DOCKER] + list(args), env=self.env)
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                              timeout=timeout, **kwargs)

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        """SIGTERM rootlesskit by pid (dockerd stops its containers and
        containerd), then remove this run's directories."""
        status = self.tb.stop_server(self.proc, timeout=30)
        self.log_file.close()
        self.remove_dirs()
        return status

    def remove_dirs(self):
        for d in self.host_dirs:
            shutil.rmtree(d, ignore_errors=True)


def run_dockerd(make, rootfs, image):
    """A dockerd fixture's life: make() the Dockerd, import rootfs as its image (never pulled),
    yield it; then stop it, which must leave no container and no directory behind."""
    started = time.monotonic()
    daemon = make()
    print("rootless dockerd %s up in %.1fs" % (daemon.version, time.monotonic() - started))
    daemon.image = image
    tar = subprocess.Popen(["tar", "-C", rootfs, "--numeric-owner", "--owner=0", "--group=0",
                            "-c", "."], stdout=subprocess.PIPE)
    res = daemon.docker(["import", "-", daemon.image], stdin=tar.stdout)
    tar.stdout.close()
    assert tar.wait() == 0 and res.returncode == 0, res.stderr
    yield daemon
    leftover = daemon.docker(["ps", "-aq"]).stdout.split()
    status = daemon.stop()
    assert status in (0, -signal.SIGTERM), daemon.log()[-3000:]
    assert not [d for d in daemon.host_dirs if os.path.exists(d)]
    assert not leftover, "containers left behind: %s" % leftover


def b4ns_daemon(merged, base="podman"):
    """A b4ns fixture's life: bypass4netns.py ignoring Docker's networks, with two profiles in
    .profiles: merged (the trap merged into base's default profile) and "none" (allow-all);
    at the end it must stop cleanly with no error in its log."""
    d = Daemon(["--ignore", "10.0.0.0/8,172.16.0.0/12"], base=base)
    d.profiles = {merged: d.profile, "none": generate_profile(d.socket, base="none")}
    yield d
    assert d.stop() == 0
    assert "ERROR" not in d.log() and "Traceback" not in d.log(), d.log()[-3000:]
    os.unlink(d.profiles["none"])


def docker_run(dockerd, cmd, runtime=None, profile=None, extra=()):
    """docker run --rm of cmd in the imported image, dockerd's /usr mounted read-only."""
    args = ["run", "--rm", "--pull", "never", "-v", "/usr:/usr:ro"]
    if runtime:
        args += ["--runtime", runtime]
    if profile:
        args += ["--security-opt", "seccomp=" + profile]
    return dockerd.docker(args + list(extra) + [dockerd.image] + list(cmd))


# -- the checks --------------------------------------------------------------------

def assert_fetch_bypassed(testbed, b4ns, dockerd, http, profile, runtime=None):
    """A container with profile fetches http's file through a socket of the host's, not Docker's bridge."""
    port, body = http
    res = docker_run(dockerd, python(FETCH, testbed.HOST_IP4, port), runtime, profile)
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout)
    assert seen["body"] == body
    assert seen["peername"] == [testbed.HOST_IP4, port]
    assert seen["sockname"] == testbed.HOST_IP4, "not bypassed: the socket is on Docker's bridge"
    assert ("198.18.0.1:%d" % port, "bypassed") in b4ns.decisions()


def assert_fetch_left_alone(testbed, b4ns, dockerd, http, runtime=None):
    """Docker's own default profile traps nothing: the connection goes through Docker's bridge."""
    port, body = http
    res = docker_run(dockerd, python(FETCH, testbed.HOST_IP4, port), runtime)
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout)
    assert seen["body"] == body
    assert seen["sockname"].startswith("172.17."), seen
    assert not [d for d in b4ns.decisions() if d[0] == "198.18.0.1:%d" % port]


def exec_fetch(testbed, dockerd, port, profile, runtime=None):
    """docker exec of FETCH (from port) in a container of profile that sleeps meanwhile, then
    docker rm --force of it: (the exec's result, the rm's)."""
    name = "b4ns-exec-%d" % os.getpid()
    res = docker_run(dockerd, ["sleep", "60"], runtime, profile, extra=["-d", "--name", name])
    assert res.returncode == 0, res.stderr
    try:
        res = dockerd.docker(["exec", name] + python(FETCH, testbed.HOST_IP4, port))
    finally:
        removed = dockerd.docker(["rm", "--force", name])
    return res, removed


def probe_denials(dockerd, merged, allow_all, runtime=None):
    """DENIAL_PROBE's {syscall: "ok" or errno name} under Docker's default profile ("docker"),
    the profile merged into a default ("merged") and the allow-all one ("allow-all")."""
    results = {}
    for kind, profile in (("docker", None), ("merged", merged), ("allow-all", allow_all)):
        res = docker_run(dockerd, python(DENIAL_PROBE), runtime, profile)
        assert res.returncode == 0, res.stderr
        results[kind] = dict(line.split() for line in res.stdout.splitlines())
    return results
