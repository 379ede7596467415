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
import subprocess

import pytest

pytest.register_assert_rewrite("e2e.rootless_docker")  # its checks report as this module's do

import bed13  # noqa: E402
from e2e import rootless_docker  # noqa: E402
from e2e.fileserver import serve_file  # noqa: E402
from e2e.rootless_docker import (  # noqa: E402
    assert_fetch_bypassed, assert_fetch_left_alone, exec_fetch, probe_denials)

PREFIX = "b4ns-docker26-"


class Dockerd26(rootless_docker.Dockerd):
    """A rootless dockerd 26 of the test user inside the root, in the test namespace."""

    ROOT = bed13.ROOT

    def __init__(self, testbed):
        name = PREFIX + str(os.getpid())
        self.home = "/home/%s/%s" % (testbed.USER, name)     # inside the root
        self.xdg = "%s/%s" % (bed13.runtime_dir(), name)     # on the root's own /run
        self.host_dirs = [bed13.ROOT + self.home]
        self.remove_dirs()
        os.mkdir(bed13.ROOT + self.home, 0o700)
        os.chown(bed13.ROOT + self.home, testbed.user_uid(), testbed.user_gid())
        subprocess.run(bed13.as_user(["mkdir", "-m", "700", self.xdg], netns=False), check=True)
        # nsenter, setpriv and env exec, and dockerd-rootless.sh execs rootlesskit: the pid we hold.
        self.start(testbed, bed13.as_user, bed13.ROOT + self.home + ".log")

    def remove_dirs(self):
        # vfs layers hold files owned by the user's subordinate ids: root removes them.
        super().remove_dirs()
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
    yield from rootless_docker.b4ns_daemon("podman5", base=bed.default_profile_base())


@pytest.fixture(scope="module")
def dockerd(testbed, bed, b4ns):
    remove_stale_runs()
    yield from rootless_docker.run_dockerd(lambda: Dockerd26(testbed), bed.ROOT + bed.SKELETON,
                                           "b4ns-skeleton:%d" % os.getpid())


@pytest.fixture
def http(testbed, server, tmp_path):
    """(port, body) of a file served by python3 -m http.server at 198.18.0.1."""
    return serve_file(testbed, server, tmp_path, testbed.HOST_IP4, "b4ns-docker26-")


@pytest.mark.parametrize("base", ["podman5", "none"])
def test_docker26_keeps_the_listener_and_the_bypass_works_without_a_wrapper(testbed, b4ns, dockerd, http, base):
    assert_fetch_bypassed(testbed, b4ns, dockerd, http, b4ns.profiles[base])


def test_docker26_exec_is_bypassed_too(testbed, b4ns, dockerd, http):
    port, body = http
    res, removed = exec_fetch(testbed, dockerd, port, b4ns.profiles["podman5"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["sockname"] == testbed.HOST_IP4
    assert removed.returncode == 0, removed.stderr


def test_docker26_without_the_profile_is_left_alone(testbed, b4ns, dockerd, http):
    """Docker's own default profile traps nothing: the connection goes through Docker's bridge."""
    assert_fetch_left_alone(testbed, b4ns, dockerd, http)


def test_docker26_merged_profile_keeps_dockers_denials(testbed, b4ns, dockerd):
    """Merged into podman 5's default profile, the trap keeps what Docker's default denies (the
    errno may differ: each profile has its own defaultErrnoRet); allow-all gives them away."""
    results = probe_denials(dockerd, b4ns.profiles["podman5"], b4ns.profiles["none"])
    # Seen here: Docker's default EPERM for all four; merged into podman 5's profile ENOSYS for
    # three (podman's defaultErrnoRet) and EPERM for userfaultfd; allow-all: the kernel's answers.
    assert set(results["docker"].values()) == {"EPERM"}, results
    for name in results["docker"]:
        assert results["merged"][name] in ("EPERM", "ENOSYS"), (name, results)
        assert results["allow-all"][name] not in ("EPERM", "ENOSYS"), (name, results)
