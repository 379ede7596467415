"""Rootless Docker 26 (Debian 13's docker.io 26.1.5, rootlesskit 2.0.2), end to end, in the podman 5 bed.

Docker 26 keeps listenerPath and listenerMetadata from --security-opt
seccomp=FILE, so no runtime wrapper is needed (Docker 20.10 dropped them:
tests/e2e/test_docker.py).  dockerd runs as the test user inside the Debian
13 root (tests/bed13.py) and the test namespace, behind rootlesskit with
slirp4netns (dockerd-rootless.sh's default); docker.io, rootlesskit and
slirp4netns are installed into the root on first use.  The image is the
bed's skeleton root filesystem, imported (nothing is ever pulled), with the
root's /usr mounted read-only.  bypass4netns.py runs as for every other test
(host python3, test user, test namespace); its socket under the host's
/run/user/UID is bound into the root at the same path.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

import bed13
from e2e.daemon import Daemon, generate_profile
from e2e.test_docker import DENIAL_PROBE, FETCH, python

DOCKER = "/usr/bin/docker"
DOCKERD_ROOTLESS = "/usr/share/docker.io/contrib/dockerd-rootless.sh"
PREFIX = "b4ns-docker26-"


class Dockerd26:
    """A rootless dockerd 26 of the test user inside the root, in the test namespace."""

    def __init__(self, testbed):
        self.tb = testbed
        name = PREFIX + str(os.getpid())
        self.home = "/home/%s/%s" % (testbed.USER, name)     # inside the root
        self.xdg = "%s/%s" % (bed13.runtime_dir(), name)     # on the root's own /run
        self.remove_dirs()
        os.mkdir(bed13.ROOT + self.home, 0o700)
        os.chown(bed13.ROOT + self.home, testbed.user_uid(), testbed.user_gid())
        subprocess.run(bed13.as_user(["mkdir", "-m", "700", self.xdg], netns=False), check=True)
        settings = self.home + "/daemon.json"
        with open(bed13.ROOT + settings, "w") as f:
            f.write("{}\n")
        os.chown(bed13.ROOT + settings, testbed.user_uid(), testbed.user_gid())
        self.env = {"XDG_RUNTIME_DIR": self.xdg, "DOCKER_HOST": "unix://%s/docker.sock" % self.xdg,
                    "DOCKER_CONFIG": self.home + "/cli"}
        self.log_path = bed13.ROOT + self.home + ".log"
        self.log_file = open(self.log_path, "w")
        env = dict(self.env, DOCKERD_ROOTLESS_ROOTLESSKIT_NET="slirp4netns",
                   DOCKERD_ROOTLESS_ROOTLESSKIT_MTU="65520",
                   DOCKERD_ROOTLESS_ROOTLESSKIT_FLAGS="--state-dir=%s/rootlesskit" % self.xdg)
        # nsenter, setpriv and env exec, and dockerd-rootless.sh execs rootlesskit: the pid we hold.
        self.proc = testbed.start_server(
            bed13.as_user([DOCKERD_ROOTLESS, "--storage-driver", "vfs", "--data-root", self.home + "/data",
                           "--config-file", settings], env=env),
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
        argv = bed13.as_user([DOCKER] + list(args), env=self.env)
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                              timeout=timeout, **kwargs)

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        """SIGTERM rootlesskit by pid (dockerd stops its containers and containerd), then remove
        this run's directories."""
        status = self.tb.stop_server(self.proc, timeout=30)
        self.log_file.close()
        self.remove_dirs()
        return status

    def remove_dirs(self):
        # vfs layers hold files owned by the user's subordinate ids: root removes them.
        shutil.rmtree(bed13.ROOT + self.home, ignore_errors=True)
        subprocess.run(bed13.in_bed(["rm", "-rf", self.xdg], netns=False), check=False)


def remove_stale_runs():
    """Directories of earlier runs whose pytest is gone."""
    home = "%s/home/%s" % (bed13.ROOT, bed13.tb.USER)
    for name in os.listdir(home):
        m = re.match(re.escape(PREFIX) + r"(\d+)(\.log)?$", name)
        if m and not os.path.exists("/proc/" + m.group(1)):
            path = os.path.join(home, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)


@pytest.fixture(scope="module")
def bed(testbed):
    bed13.up()
    bed13.ensure_docker()  # docker.io 26, rootlesskit and slirp4netns in the root, on first use
    return bed13


@pytest.fixture(scope="module")
def b4ns(testbed, bed):
    d = Daemon(["--ignore", "10.0.0.0/8,172.16.0.0/12"], base=bed.default_profile_base())
    d.profiles = {"podman5": d.profile, "none": generate_profile(d.socket, base="none")}
    yield d
    assert d.stop() == 0
    assert "ERROR" not in d.log() and "Traceback" not in d.log(), d.log()[-3000:]
    os.unlink(d.profiles["none"])


@pytest.fixture(scope="module")
def dockerd(testbed, bed, b4ns):
    remove_stale_runs()
    started = time.monotonic()
    daemon = Dockerd26(testbed)
    print("rootless dockerd %s up in %.1fs" % (daemon.version, time.monotonic() - started))
    daemon.image = "b4ns-skeleton:%d" % os.getpid()
    tar = subprocess.Popen(["tar", "-C", bed.ROOT + bed.SKELETON, "--numeric-owner", "--owner=0", "--group=0",
                            "-c", "."], stdout=subprocess.PIPE)
    res = daemon.docker(["import", "-", daemon.image], stdin=tar.stdout)
    tar.stdout.close()
    assert tar.wait() == 0 and res.returncode == 0, res.stderr
    yield daemon
    leftover = daemon.docker(["ps", "-aq"]).stdout.split()
    status = daemon.stop()
    assert status in (0, -signal.SIGTERM), daemon.log()[-3000:]
    assert not os.path.exists(bed.ROOT + daemon.home)
    assert not leftover, "containers left behind: %s" % leftover


@pytest.fixture
def http(testbed, server, tmp_path):
    """(port, body) of a file served by python3 -m http.server at 198.18.0.1."""
    body = "b4ns-docker26-" + os.urandom(8).hex()
    (tmp_path / "index.txt").write_text(body)
    port = testbed.free_port(testbed.HOST_IP4)
    server(["python3", "-m", "http.server", "--bind", testbed.HOST_IP4, "--directory", str(tmp_path), str(port)],
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    testbed.wait_port(testbed.HOST_IP4, port)
    return port, body


def docker_run(dockerd, cmd, profile=None, extra=()):
    """docker run --rm of cmd in the imported skeleton, the root's /usr mounted read-only (runc)."""
    args = ["run", "--rm", "--pull", "never", "-v", "/usr:/usr:ro"]
    if profile:
        args += ["--security-opt", "seccomp=" + profile]
    return dockerd.docker(args + list(extra) + [dockerd.image] + list(cmd))


@pytest.mark.parametrize("base", ["podman5", "none"])
def test_docker26_keeps_the_listener_and_the_bypass_works_without_a_wrapper(testbed, b4ns, dockerd, http, base):
    port, body = http
    res = docker_run(dockerd, python(FETCH, testbed.HOST_IP4, port), b4ns.profiles[base])
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout)
    assert seen["body"] == body
    assert seen["peername"] == [testbed.HOST_IP4, port]
    assert seen["sockname"] == testbed.HOST_IP4, "not bypassed: the socket is on Docker's bridge"
    assert ("198.18.0.1:%d" % port, "bypassed") in b4ns.decisions()


def test_docker26_exec_is_bypassed_too(testbed, b4ns, dockerd, http):
    port, body = http
    name = "b4ns-exec-%d" % os.getpid()
    res = docker_run(dockerd, ["sleep", "60"], b4ns.profiles["podman5"], extra=["-d", "--name", name])
    assert res.returncode == 0, res.stderr
    try:
        res = dockerd.docker(["exec", name] + python(FETCH, testbed.HOST_IP4, port))
    finally:
        removed = dockerd.docker(["rm", "--force", name])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["sockname"] == testbed.HOST_IP4
    assert removed.returncode == 0, removed.stderr


def test_docker26_without_the_profile_is_left_alone(testbed, b4ns, dockerd, http):
    """Docker's own default profile traps nothing: the connection goes through Docker's bridge."""
    port, body = http
    res = docker_run(dockerd, python(FETCH, testbed.HOST_IP4, port))
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout)
    assert seen["body"] == body
    assert seen["sockname"].startswith("172.17."), seen
    assert not [d for d in b4ns.decisions() if d[0] == "198.18.0.1:%d" % port]


def test_docker26_merged_profile_keeps_dockers_denials(testbed, b4ns, dockerd):
    """Merged into podman 5's default profile, the trap keeps what Docker's default denies (the
    errno may differ: each profile has its own defaultErrnoRet); allow-all gives them away."""
    results = {}
    for kind, profile in (("docker", None), ("merged", b4ns.profiles["podman5"]), ("allow-all", b4ns.profiles["none"])):
        res = docker_run(dockerd, python(DENIAL_PROBE), profile)
        assert res.returncode == 0, res.stderr
        results[kind] = dict(line.split() for line in res.stdout.splitlines())
    # Seen here: Docker's default EPERM for all four; merged into podman 5's profile ENOSYS for
    # three (podman's defaultErrnoRet) and EPERM for userfaultfd; allow-all: the kernel's answers.
    assert set(results["docker"].values()) == {"EPERM"}, results
    for name in results["docker"]:
        assert results["merged"][name] in ("EPERM", "ENOSYS"), (name, results)
        assert results["allow-all"][name] not in ("EPERM", "ENOSYS"), (name, results)
