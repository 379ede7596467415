"""Test bed for bypass4netns.py: real rootless containers on this machine.

As a CLI (as root): ``python3 tests/testbed.py up|down|status``.

``up`` (idempotent) installs the Debian packages the tests use, creates the
unprivileged user b4ns-test with subordinate ids and a runtime dir, fixes the
host settings rootless podman/crun need here, creates the network namespace
b4ns-test that carries every byte of test traffic (198.18.0.0/15 and
2001:db8::/32 only), and builds a registry-free busybox root filesystem.
``down`` (idempotent) removes the namespace and stops, by pid, what the test
bed and the tests started; it keeps packages, user, rootfs and host settings.

As a module it gives the tests argv builders (in_netns, as_user, podman,
run_container) and helpers to start servers and wait for their ports.
"""

import filecmp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

USER = "b4ns-test"
USER_B = "b4ns-test2"    # a second rootless user: another node for --multinode's tests
NETNS = "b4ns-test"
NETNS_PATH = "/run/netns/b4ns-test"
HOST_IP4 = "198.18.0.1"
HOST_IP4_B = "198.18.1.1"
HOST_IP6 = "2001:db8::1"
HOST_IP6_B = "2001:db8:1::1"
STATE_DIR = "/var/lib/b4ns-test"
ROOTFS = STATE_DIR + "/rootfs"
WORKDIR = STATE_DIR + "/work"
# Servers started through start_server are recorded here (pid -> start time)
# so that `down` can stop leftovers by pid without hitting a reused pid.
PIDS_DIR = "/run/b4ns-test/pids"

PACKAGES = [
    "runc", "crun", "slirp4netns", "uidmap", "podman", "passt", "iperf3",
    "busybox-static", "socat", "curl", "redis-server", "redis-tools",
    "nginx-light", "apache2-utils", "python3-pytest", "python3-venv",
    "iproute2", "procps", "util-linux",
    "strace",  # the benchmark's syscalls-per-connect count
    "dnsmasq-base", "bind9-dnsutils", "php-fpm",  # the benchmark's DNS and nginx + php-fpm workloads
    # static test clients, 64- and 32-bit (i386's socketcall path)
    "gcc", "libc6-dev", "gcc-multilib",
]
# Rootless Docker, for tests/e2e/test_docker.py only: installed on demand
# (ensure_docker), without recommends, so that the bed gains neither
# apparmor nor needrestart (an apt hook that would run on every later install).
DOCKER_PACKAGES = ["docker.io", "rootlesskit"]

# Both ends of the veth pair live inside the namespace, so nothing sent there
# can leave it. The gateways exist only to give the namespace a default route.
VETH_A, VETH_B = "b4ns0", "b4ns1"
GATEWAY4, GATEWAY6 = "198.18.0.254", "2001:db8::ff"

# Rootless podman 4.3 here: no systemd user session, so no systemd cgroup
# manager and no journald events.
PODMAN_FLAGS = ["--cgroup-manager=cgroupfs", "--events-backend=file"]
USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


def _log(msg):
    print("testbed: " + msg, file=sys.stderr, flush=True)


def _run(argv, **kwargs):
    return subprocess.run(argv, check=True, **kwargs)


def _read(path):
    with open(path) as f:
        return f.read()


def _output(argv):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE,
                          universal_newlines=True).stdout


# ---------------------------------------------------------------- identities

def user_uid(user=USER):
    return pwd.getpwnam(user).pw_uid


def user_gid(user=USER):
    return pwd.getpwnam(user).pw_gid


def user_home(user=USER):
    return pwd.getpwnam(user).pw_dir


def runtime_dir(user=USER):
    return "/run/user/%d" % user_uid(user)


# ------------------------------------------------------------ argv builders

def in_netns(argv):
    """argv run as root inside the test namespace.

    nsenter rather than `ip netns exec`: the latter remounts /sys, which
    hides the cgroup mounts podman needs. nsenter execs, so the pid is argv's.
    """
    return ["nsenter", "--net=" + NETNS_PATH] + list(argv)


def as_user(argv, netns=True, env=None, user=USER):
    """argv run as the test user (or `user`), with a clean environment, from its home.

    setpriv execs (runuser would fork), so a Popen's pid is argv's own.
    """
    user_env = {
        "HOME": user_home(user),
        "USER": user,
        "LOGNAME": user,
        "PATH": USER_PATH,
        "XDG_RUNTIME_DIR": runtime_dir(user),
    }
    user_env.update(env or {})
    cmd = ["setpriv", "--reuid=%d" % user_uid(user), "--regid=%d" % user_gid(user),
           "--init-groups", "env", "-i", "--chdir=" + user_home(user)]
    cmd += ["%s=%s" % kv for kv in sorted(user_env.items())] + list(argv)
    return in_netns(cmd) if netns else cmd


def podman(args, runtime="runc", user=USER):
    """A rootless podman command of the test user (or `user`) inside the namespace."""
    return as_user(["podman", "--runtime", runtime] + PODMAN_FLAGS + list(args), user=user)


def host_bind_dirs():
    """Host dirs bind-mounted read-only into every container.

    On a merged-/usr host /lib and /lib64 are symlinks into /usr: the rootfs
    carries the same symlinks instead of mounts.
    """
    return [d for d in ("/usr", "/lib", "/lib64")
            if os.path.isdir(d) and not os.path.islink(d)]


def run_container(cmd, runtime="runc", seccomp=None, network="slirp4netns",
                  extra=(), name=None, user=USER):
    """argv of `podman run --rm` of cmd in the busybox rootfs."""
    args = ["run", "--rm", "--network", network]
    for d in host_bind_dirs():
        args += ["-v", "%s:%s:ro" % (d, d)]
    if seccomp:
        args += ["--security-opt", "seccomp=" + seccomp]
    if name:
        args += ["--name", name]
    # ":O": a private overlay per container over the shared rootfs, so a
    # container can write anywhere and mount at any new path (its writes are
    # discarded). podman takes everything after --rootfs DIR as the command.
    args += list(extra) + ["--rootfs", rootfs(user) + ":O"] + list(cmd)
    return podman(args, runtime, user)


# ---------------------------------------------------------- files and servers

def copy_to_workdir(path):
    """Copy a file into WORKDIR, readable by the test user; return the copy."""
    dest = os.path.join(WORKDIR, os.path.basename(path))
    shutil.copy(path, dest)
    os.chmod(dest, 0o755 if os.access(path, os.X_OK) else 0o644)
    os.chown(dest, user_uid(), user_gid())
    return dest


def _start_time(pid):
    """The kernel's start time of pid, or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            # comm may contain spaces: fields count from after its ")".
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def start_server(argv, netns=True, user=False, env=None, **popen_kwargs):
    """Start a long-running argv; stop it with stop_server(proc).

    Runs as root inside the namespace by default, as the test user with
    user=True (or as the user named), outside the namespace with netns=False;
    env adds variables.
    popen_kwargs go to Popen (stdout/stderr default to ours, which pytest
    captures).
    """
    if user:
        argv = as_user(argv, netns=netns, env=env, user=USER if user is True else user)
    else:
        if env:
            popen_kwargs["env"] = dict(os.environ, **env)
        if netns:
            argv = in_netns(argv)
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.Popen(argv, **popen_kwargs)
    os.makedirs(PIDS_DIR, exist_ok=True)
    with open(os.path.join(PIDS_DIR, str(proc.pid)), "w") as f:
        f.write(_start_time(proc.pid) or "")
    return proc


def stop_server(proc, timeout=5.0):
    """SIGTERM proc by pid, SIGKILL after timeout; return its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.unlink(os.path.join(PIDS_DIR, str(proc.pid)))
    except FileNotFoundError:
        pass
    return proc.returncode


_WAIT_PORT = """
import socket, sys, time
host, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while True:
    try:
        socket.create_connection((host, port), 1).close()
        sys.exit(0)
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.05)
"""


def free_port(host=HOST_IP4, netns=True):
    """A TCP port the kernel reports free on host (inside the namespace)."""
    code = ("import socket, sys; s = socket.socket(socket.AF_INET6 if ':' in "
            "sys.argv[1] else socket.AF_INET); s.bind((sys.argv[1], 0)); "
            "print(s.getsockname()[1])")
    argv = [sys.executable, "-c", code, host]
    return int(_output(in_netns(argv) if netns else argv))


def wait_port(host, port, timeout=10.0, netns=True):
    """Wait until host:port accepts TCP (inside the namespace by default).

    Raises TimeoutError. The probe runs in a child so that this process
    never has to enter the namespace itself.
    """
    argv = [sys.executable, "-c", _WAIT_PORT, host, str(port), str(timeout)]
    if netns:
        argv = in_netns(argv)
    if subprocess.run(argv, timeout=timeout + 10).returncode != 0:
        raise TimeoutError("%s port %d not accepting after %.1fs"
                           % (host, port, timeout))


# ----------------------------------------------------------------------- up

def missing_packages(packages=None):
    packages = PACKAGES if packages is None else packages
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n"] + packages,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        universal_newlines=True).stdout
    installed = {line.split()[0] for line in out.splitlines()
                 if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def ensure_packages(packages=None, recommends=True):
    missing = missing_packages(packages)
    if not missing:
        return
    _log("installing " + " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Installing redis-server, nginx or docker.io must not start them on the
    # host.
    policy = "/usr/sbin/policy-rc.d"
    own_policy = not os.path.exists(policy)
    if own_policy:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        # Wait for another apt (another test run, say) instead of failing.
        apt = ["apt-get", "-qq", "-o", "DPkg::Lock::Timeout=600"]
        _run(apt + ["update"], env=env)
        options = ["-o", "Dpkg::Options::=--force-confold"]
        if not recommends:
            options.append("--no-install-recommends")
        _run(apt + ["install", "-y"] + options + missing, env=env,
             stdin=subprocess.DEVNULL)
    finally:
        if own_policy:
            os.unlink(policy)


def ensure_docker():
    """Install rootless Docker's packages (see DOCKER_PACKAGES) if missing."""
    if os.geteuid() != 0:
        raise PermissionError("installing Docker needs root")
    ensure_packages(DOCKER_PACKAGES, recommends=False)


def ensure_etcd():
    """Install Debian's etcd-server (for --multinode's tests) if missing."""
    if os.geteuid() != 0:
        raise PermissionError("installing etcd needs root")
    ensure_packages(["etcd-server"], recommends=False)


def start_etcd():
    """etcd in the test namespace, on HOST_IP4: (its client URL, Popen, data dir); stop_etcd ends it."""
    ensure_etcd()
    data = tempfile.mkdtemp(prefix="b4ns-etcd-")
    client, peer = free_port(), free_port("127.0.0.1")
    url = "http://%s:%d" % (HOST_IP4, client)
    peer_url = "http://127.0.0.1:%d" % peer
    proc = start_server(["etcd", "--name", "b4ns", "--data-dir", data, "--listen-client-urls", url,
                         "--advertise-client-urls", url, "--listen-peer-urls", peer_url,
                         "--initial-advertise-peer-urls", peer_url, "--initial-cluster", "b4ns=" + peer_url],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(HOST_IP4, client, timeout=30)
    except BaseException:
        stop_etcd(proc, data)
        raise
    return url, proc, data


def stop_etcd(proc, data):
    stop_server(proc)
    shutil.rmtree(data, ignore_errors=True)


def ensure_second_user():
    """USER_B, with its runtime dir and root filesystem: a second node for --multinode's tests."""
    ensure_user(USER_B)
    ensure_rootfs(USER_B)


def _subid_ranges(path):
    ranges = []
    with open(path) as f:
        for line in f:
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                ranges.append((parts[0], int(parts[1]), int(parts[2])))
    return ranges


def ensure_user(user=USER):
    try:
        pwd.getpwnam(user)
    except KeyError:
        _log("creating user " + user)
        _run(["useradd", "-m", "-s", "/bin/bash", user])
    # Debian 12's useradd adds subordinate ranges itself; a second, overlapping
    # range breaks newuidmap, so add one only when there is none, after all.
    for path, flag in (("/etc/subuid", "--add-subuids"),
                       ("/etc/subgid", "--add-subgids")):
        ranges = _subid_ranges(path) if os.path.exists(path) else []
        if any(owner in (user, str(user_uid(user))) for owner, _, _ in ranges):
            continue
        start = max([100000] + [s + n for _, s, n in ranges])
        _run(["usermod", flag, "%d-%d" % (start, start + 65535), user])
    rdir = runtime_dir(user)
    os.makedirs(rdir, exist_ok=True)
    os.chown(rdir, user_uid(user), user_gid(user))
    os.chmod(rdir, 0o700)
    if user != USER:
        return
    os.makedirs(WORKDIR, exist_ok=True)
    os.chown(WORKDIR, user_uid(), user_gid())
    os.chmod(WORKDIR, 0o755)


def _root_is_shared():
    return _output(["findmnt", "-n", "-o", "PROPAGATION", "/"]).strip() == "shared"


def ensure_host_settings():
    # slirp4netns (as the user) opens /dev/net/tun, which is 0600 here.
    os.chmod("/dev/net/tun", 0o666)
    # Rootless podman warns that "/" is not a shared mount otherwise.
    if not _root_is_shared():
        _run(["mount", "--make-rshared", "/"])


def _cgroup2_controllers():
    """Controllers on the cgroup2 hierarchy of a v1/v2 hybrid ([] if none)."""
    path = "/sys/fs/cgroup/unified/cgroup.controllers"
    return _read(path).split() if os.path.exists(path) else []


def ensure_cgroups():
    """Empty the cgroup2 hierarchy of this v1/v2 hybrid of controllers.

    crun refuses to run ("cgroups in hybrid mode not supported, drop all
    controllers from cgroupv2") while the unified hierarchy holds any
    controller (hugetlb here); mounting a v1 hierarchy for a controller takes
    it away from v2.
    """
    for controller in _cgroup2_controllers():
        target = "/sys/fs/cgroup/" + controller
        if not os.path.isdir(target):
            try:
                os.mkdir(target)
            except OSError:
                # Some boots mount the cgroup tmpfs read-only.
                _run(["mount", "-o", "remount,rw", "/sys/fs/cgroup"])
                os.mkdir(target)
        _log("mounting a cgroup v1 hierarchy for " + controller)
        _run(["mount", "-t", "cgroup", "-o", controller, "none", target])


def ensure_netns():
    if os.path.exists(NETNS_PATH) and subprocess.run(
            ["mountpoint", "-q", NETNS_PATH]).returncode != 0:
        os.unlink(NETNS_PATH)  # a leftover file without a namespace behind it
    if not os.path.exists(NETNS_PATH):
        _log("creating network namespace " + NETNS)
        _run(["ip", "netns", "add", NETNS])

    def ns(*argv):
        _run(in_netns(list(argv)))

    if subprocess.run(in_netns(["ip", "link", "show", VETH_A]),
                      stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode != 0:
        ns("ip", "link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B)
    # Per-namespace sysctls: unprivileged ping and low ports for the test
    # user (servers and bypass4netns bind there as that user).
    ns("sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647",
       "net.ipv4.ip_unprivileged_port_start=0")
    for dev, ip4, ip6 in ((VETH_A, HOST_IP4, HOST_IP6),
                          (VETH_B, HOST_IP4_B, HOST_IP6_B)):
        ns("ip", "addr", "replace", ip4 + "/24", "dev", dev)
        ns("ip", "-6", "addr", "replace", ip6 + "/64", "dev", dev, "nodad")
        ns("ip", "link", "set", dev, "up")
    ns("ip", "link", "set", "lo", "up")
    ns("ip", "route", "replace", "default", "via", GATEWAY4, "dev", VETH_A,
       "onlink")
    ns("ip", "-6", "route", "replace", "default", "via", GATEWAY6, "dev",
       VETH_A, "onlink")
    # Any other address fails at once (EHOSTUNREACH) instead of timing out
    # into the veth: e.g. the host's DNS server, asked by http.server's
    # getfqdn(), would cost 5 s a lookup. The default route stays for tools
    # that look it up (pasta picks its interface from it).
    for half in ("0.0.0.0/1", "128.0.0.0/1"):
        ns("ip", "route", "replace", "unreachable", half)
    for half in ("::/1", "8000::/1"):
        ns("ip", "-6", "route", "replace", "unreachable", half)


def rootfs(user=USER):
    """The container root filesystem of `user`'s containers (each user owns its own)."""
    return ROOTFS if user == USER else "%s-%s" % (ROOTFS, user)


def ensure_rootfs(user=USER):
    """busybox, a passwd, and mount points for the host's /usr, /lib, /lib64.

    Owned by the test user (or `user`), who is root in the containers: through
    the overlay (":O") podman puts over it for each container, a container
    can then create mount points and files anywhere; they land in the overlay.
    """
    ROOTFS = rootfs(user)  # noqa: N806 (the module's, or the user's)
    for d in ("bin", "usr", "proc", "sys", "dev", "etc", "run", "root",
              "home", "var", "tmp"):
        os.makedirs(os.path.join(ROOTFS, d), exist_ok=True)
    os.chmod(os.path.join(ROOTFS, "tmp"), 0o1777)
    for d in ("/lib", "/lib64"):
        dest = ROOTFS + d
        if os.path.islink(d):
            if not os.path.lexists(dest):
                os.symlink(os.readlink(d), dest)
        elif os.path.isdir(d):
            os.makedirs(dest, exist_ok=True)
    busybox = os.path.join(ROOTFS, "bin", "busybox")
    # Rewriting a binary a running container executes fails (ETXTBSY).
    if not (os.path.exists(busybox)
            and filecmp.cmp("/bin/busybox", busybox, shallow=False)):
        shutil.copy("/bin/busybox", busybox)
    for applet in _output([busybox, "--list"]).split():
        link = os.path.join(ROOTFS, "bin", applet)
        if not os.path.lexists(link):
            os.symlink("busybox", link)
    # podman adds hosts, hostname and resolv.conf itself.
    files = {
        "passwd": "root:x:0:0:root:/root:/bin/sh\n"
                  "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "group": "root:x:0:\nnogroup:x:65534:\n",
    }
    for name, text in files.items():
        path = os.path.join(ROOTFS, "etc", name)
        if not os.path.exists(path) or _read(path) != text:
            with open(path, "w") as f:
                f.write(text)
    uid, gid = user_uid(user), user_gid(user)
    for top, dirs, names in os.walk(ROOTFS):
        for name in [top] + [os.path.join(top, n) for n in dirs + names]:
            os.lchown(name, uid, gid)


def up():
    if os.geteuid() != 0:
        raise PermissionError("testbed up must run as root")
    ensure_packages()
    ensure_user()
    ensure_host_settings()
    ensure_cgroups()
    ensure_netns()
    ensure_rootfs()


# --------------------------------------------------------------------- down

def _kill_pid(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def down():
    if os.geteuid() != 0:
        raise PermissionError("testbed down must run as root")
    if os.path.isdir(PIDS_DIR):
        for name in os.listdir(PIDS_DIR):
            path = os.path.join(PIDS_DIR, name)
            recorded = _read(path).strip()
            if recorded and _start_time(int(name)) == recorded:
                _log("killing leftover server pid " + name)
                _kill_pid(int(name))
            os.unlink(path)
    for user in (USER, USER_B):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        if os.path.exists(NETNS_PATH) and shutil.which("podman"):
            subprocess.run(podman(["rm", "--all", "--force", "--time", "0"], user=user),
                           stdout=subprocess.DEVNULL, timeout=120)
        # podman 4.3 leaves a --rm container's overlay (":O") behind, with
        # whatever the container wrote; no container is left to need one.
        shutil.rmtree(os.path.join(runtime_dir(user), "containers",
                                   "overlay-containers"), ignore_errors=True)
        # Rootless podman keeps a "pause" process holding its user namespace.
        pause = os.path.join(runtime_dir(user), "libpod", "tmp", "pause.pid")
        if os.path.exists(pause):
            pid = _read(pause).strip()
            if pid.isdigit():
                _kill_pid(int(pid))
            os.unlink(pause)
    # podman 5's containers and pause process in the Debian 13 bed (tests/bed13.py), if it is up.
    import bed13
    bed13.down()
    if os.path.exists(NETNS_PATH):
        _log("deleting network namespace " + NETNS)
        _run(["ip", "netns", "delete", NETNS])


# ------------------------------------------------------------------- status

def status():
    """Print the state of each piece; return True when the bed is up."""
    checks = []
    missing = missing_packages()
    checks.append(("packages", not missing, "missing: " + " ".join(missing)))
    try:
        pwd.getpwnam(USER)
        have_user = True
    except KeyError:
        have_user = False
    checks.append(("user " + USER, have_user, "absent"))
    if have_user:
        checks.append(("runtime dir", os.path.isdir(runtime_dir()), "absent"))
    checks.append(("/dev/net/tun 0666",
                   os.stat("/dev/net/tun").st_mode & 0o777 == 0o666, "not 0666"))
    checks.append(("/ shared", _root_is_shared(), "not shared"))
    leftover = _cgroup2_controllers()
    checks.append(("cgroup2 controllers", not leftover,
                   "crun refuses: " + " ".join(leftover)))
    checks.append(("netns " + NETNS, subprocess.run(
        ["mountpoint", "-q", NETNS_PATH]).returncode == 0, "absent"))
    checks.append(("rootfs", os.path.exists(ROOTFS + "/bin/busybox"), "absent"))
    ok = print_checks(checks, 20)
    if os.path.isdir(PIDS_DIR):
        for name in sorted(os.listdir(PIDS_DIR)):
            print("%-20s pid %s" % ("server", name))
    return ok


def print_checks(checks, width):
    """Print each (name, good, why) of checks on a line of its own; True when all are good."""
    for name, good, why in checks:
        print("%-*s %s" % (width, name, "ok" if good else why))
    return all(good for _, good, _ in checks)


def cli(argv, prog, up, down, status, log=None):
    """`prog up|down|status` of a test bed (this one, tests/bed13.py): the exit status.
    With log, how long up or down took goes to it."""
    if len(argv) != 1 or argv[0] not in ("up", "down", "status"):
        print("usage: %s up|down|status" % prog, file=sys.stderr)
        return 2
    if argv[0] == "status":
        return 0 if status() else 1
    started = time.monotonic()
    up() if argv[0] == "up" else down()
    if log:
        log("%s done in %.1fs" % (argv[0], time.monotonic() - started))
    return 0


def main(argv):
    return cli(argv, "testbed.py", up, down, status, _log)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
