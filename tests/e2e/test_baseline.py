"""Baseline: the test bed runs real rootless containers, without bypass4netns.

A server in the test namespace is reachable from a container on slirp4netns
(runc and crun, IPv4 and IPv6), unreachable with --network none, and the
containers run as the unprivileged test user.
"""

import pathlib
import subprocess
import uuid

import pytest

RUNTIMES = ["runc", "crun"]
# busybox 1.35's wget segfaults on IPv6 literals and, with -T, on a failed
# connect; python3 (from the host's /usr) fetches in those cases.
FETCH = ("import sys, urllib.request; "
         "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())")


def run(argv, timeout=120):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=timeout)


@pytest.fixture
def http_server(testbed, server, tmp_path):
    """serve(host) -> (url, body): a file served over HTTP in the namespace."""
    def serve(host):
        body = "b4ns-" + uuid.uuid4().hex
        (tmp_path / "index.txt").write_text(body + "\n")
        port = testbed.free_port(host)
        server(["python3", "-m", "http.server", "--bind", host,
                "--directory", str(tmp_path), str(port)],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        testbed.wait_port(host, port)
        url_host = "[%s]" % host if ":" in host else host
        return "http://%s:%d/index.txt" % (url_host, port), body
    return serve


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_slirp4netns_container_reaches_host_server(testbed, http_server, runtime):
    url, body = http_server(testbed.HOST_IP4)
    res = run(testbed.run_container(["/bin/wget", "-q", "-O", "-", url],
                                    runtime=runtime))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == body


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_slirp4netns_container_reaches_host_server_ipv6(testbed, http_server, runtime):
    url, body = http_server(testbed.HOST_IP6)
    res = run(testbed.run_container(["python3", "-c", FETCH, url], runtime=runtime))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == body


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_no_network_container_reaches_nothing(testbed, http_server, runtime):
    url, body = http_server(testbed.HOST_IP4)
    res = run(testbed.run_container(
        ["/bin/sh", "-c", 'ls /sys/class/net; exec python3 -c "$0" "$1"', FETCH, url],
        runtime=runtime, network="none"))
    assert res.returncode != 0
    assert res.stdout.split() == ["lo"]
    assert body not in res.stdout
    assert "Network is unreachable" in res.stderr


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_container_root_is_the_test_user(testbed, runtime):
    res = run(testbed.run_container(["/bin/cat", "/proc/self/uid_map"],
                                    runtime=runtime, network="none"))
    assert res.returncode == 0, res.stderr
    inside, outside, count = res.stdout.split()[:3]
    assert (inside, outside, count) == ("0", str(testbed.user_uid()), "1")


def test_container_writes_stay_in_its_overlay(testbed):
    """A container may mount and write anywhere; the shared rootfs is untouched."""
    probe = "b4ns-probe-" + uuid.uuid4().hex
    res = run(testbed.run_container(
        ["/bin/sh", "-c", "ls /mnt/work >/dev/null && touch /etc/%s && ls /etc" % probe],
        network="none", extra=["-v", testbed.WORKDIR + ":/mnt/work:ro"]))
    assert res.returncode == 0, res.stderr
    assert probe in res.stdout.split()
    assert not (pathlib.Path(testbed.ROOTFS) / "etc" / probe).exists()


def test_test_user_is_not_root(testbed):
    assert testbed.user_uid() != 0
    res = run(testbed.as_user(["sh", "-c", "id -u; touch /etc/b4ns-probe"]))
    assert res.stdout.strip() == str(testbed.user_uid())
    assert res.returncode != 0 and "Permission denied" in res.stderr


def test_netns_has_ipv6_locally(testbed, server):
    port = testbed.free_port(testbed.HOST_IP6)
    server(["socat", "TCP6-LISTEN:%d,bind=[%s],fork" % (port, testbed.HOST_IP6),
            "SYSTEM:echo pong"])
    testbed.wait_port(testbed.HOST_IP6, port)
    res = run(testbed.as_user(["socat", "-T", "5", "-",
                               "TCP6:[%s]:%d" % (testbed.HOST_IP6, port)]))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "pong"


def test_netns_is_closed(testbed):
    """Only lo and the veth pair: test traffic has no way off the machine."""
    # `ip`, not /sys/class/net: nsenter keeps the host's /sys mount.
    res = run(testbed.in_netns(["ip", "-o", "link", "show"]))
    names = {line.split(":")[1].strip().split("@")[0]
             for line in res.stdout.splitlines()}
    assert names == {"lo", testbed.VETH_A, testbed.VETH_B}
    # A route lookup only: no packet is sent.
    for outside in ("192.0.2.1", "2001:db9::1"):
        res = run(testbed.in_netns(["ip", "route", "get", outside]))
        assert res.returncode != 0 and "No route to host" in res.stderr
