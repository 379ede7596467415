"""The second test bed: podman 5 + pasta + crun 1.21 from Debian 13 (trixie).

As a CLI (as root): ``python3 tests/bed13.py up|down|status``; ``tests/testbed.py
up`` brings it up too (after the Debian 12 bed, whose user and network
namespace it shares).

The stack users run today does not exist in Debian 12, so this bed builds a
Debian 13 root (debootstrap --variant=minbase, cached in ROOT with a stamp
that records what was installed) and runs rootless podman 5 inside it.  A
plain chroot cannot create user namespaces (podman: "cannot clone: Operation
not permitted"), so podman runs in a saved mount namespace (MNTNS) that is
pivot_root'ed into the root.  Everything else is the Debian 12 bed's: the
user b4ns-test (same uid, same subordinate ids), the network namespace
b4ns-test (every byte of test traffic stays in 198.18.0.0/15 and
2001:db8::/32), the host settings (/dev/net/tun, cgroups).

The daemon runs from the host's python3 in the host's mount namespace (as
tests/e2e/daemon.py starts it), inside the test network namespace: WORKDIR is
bind-mounted into the root at the same path, so a listenerPath under it is
the same socket for crun inside the root and for the daemon outside.  Podman
5 gets a runtime dir of its own (/run/user/UID inside the root's tmpfs /run):
sharing podman 4's would make podman 5 join podman 4's pause process.

Containers: a skeleton root filesystem (SKELETON, inside the root) whose
/bin, /lib, ... are the merged-/usr symlinks, with the Debian 13 root's own
/usr bind-mounted read-only, so python3, iperf3, curl and socat of Debian 13
run in them.  podman 5's default network, pasta, is the default here.
"""

import os
import shutil
import subprocess
import sys
import time

import testbed as tb

ROOT = tb.STATE_DIR + "/trixie"
SUITE = "trixie"
STAMP = ROOT + "/.b4ns-bed13"
# The saved mount namespace (a bind mount of an nsfs file on a private mount).
NS_DIR = "/run/b4ns-test13"
MNTNS = NS_DIR + "/mnt"
# Paths inside the root.
SKELETON = "/var/lib/b4ns-rootfs"
RESOLV = "/etc/resolv.conf.b4ns"
# Podman 5's XDG_RUNTIME_DIR, on the namespace's own tmpfs /run: not
# /run/user/UID, which is the host's (podman 4's) bound in.
XDG_DIR = "/run/b4ns-xdg"
# Pasta's upstream DNS server: a server the tests run in the test namespace,
# on an address of its own (a /32 on b4ns1) so that no other DNS server the
# suite or the benchmark runs on 198.18.0.1:53 or 198.18.1.1:53 answers instead.
NAMESERVER = "198.18.1.53"
# "LAN peers": addresses in the subnets pasta copies into a container
# (198.18.0.0/24 and 2001:db8::/64 of b4ns0), held as host routes on b4ns1 so
# that pasta, which copies b4ns0's addresses only, does not copy them too.
LAN_PEER4, LAN_PEER6 = "198.18.0.2", "2001:db8::2"

PACKAGES = [
    "podman", "passt", "crun", "runc", "uidmap", "netavark", "aardvark-dns", "nftables",
    "conmon", "catatonit", "fuse-overlayfs", "python3", "iproute2", "iperf3",
    "socat", "curl", "procps", "util-linux", "ca-certificates",
]
# Rootless Docker 26 (tests/e2e/test_docker26.py): installed on first use,
# without recommends (as the Debian 12 bed's DOCKER_PACKAGES); rootlesskit
# runs dockerd behind slirp4netns, dockerd-rootless.sh's default.
DOCKER_PACKAGES = ["docker.io", "docker-cli", "rootlesskit", "slirp4netns"]
DOCKER_STAMP = ROOT + "/.b4ns-bed13-docker"
# On the host (Debian 12).
HOST_PACKAGES = ["debootstrap", "dnsmasq-base"]
# podman 5 has no systemd user session here either.
CONTAINERS_CONF = """\
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def _log(msg):
    print("bed13: " + msg, file=sys.stderr, flush=True)


def _run(argv, **kwargs):
    return subprocess.run(argv, check=True, **kwargs)


def mirror():
    """The Debian mirror URL the host's apt uses (deb822 URIs: or a one-line deb entry)."""
    paths = ["/etc/apt/sources.list"]
    d = "/etc/apt/sources.list.d"
    if os.path.isdir(d):
        paths += sorted(os.path.join(d, n) for n in os.listdir(d))
    for path in paths:
        try:
            text = open(path).read()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1 and words[1].rstrip("/").endswith("/debian"):
                return words[1]
            if words[:1] == ["deb"]:
                url = next((w for w in words[1:] if not w.startswith("[")), "")
                if url.rstrip("/").endswith("/debian"):
                    return url
    return "http://deb.debian.org/debian"


# --------------------------------------------------------------- the root

def _stamp_text():
    return "suite %s\npackages %s\n" % (SUITE, " ".join(sorted(PACKAGES)))


def _stamp_ok():
    try:
        return open(STAMP).read() == _stamp_text()
    except OSError:
        return False


def _in_chroot(argv, env=None):
    """argv as root in the root through chroot, in a throwaway mount namespace
    with /proc, /sys and /dev (apt and maintainer scripts need no user namespace),
    and the host's resolv.conf of today (the copy debootstrap made may be stale)."""
    script = ('set -e; mount --make-rprivate /; mount -t proc proc "$1/proc"; '
              'mount --rbind /sys "$1/sys"; mount --rbind /dev "$1/dev"; '
              'mount --bind /etc/resolv.conf "$1/etc/resolv.conf"; '
              'root=$1; shift; exec chroot "$root" "$@"')
    full_env = {"PATH": tb.USER_PATH, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"}
    full_env.update(env or {})
    return _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", ROOT]
                + list(argv), env=full_env, stdin=subprocess.DEVNULL)


def _install(packages, stamp, stamp_text):
    """apt-get install packages into the root (no recommends), then write stamp_text to stamp."""
    _log("installing into %s: %s" % (ROOT, " ".join(packages)))
    apt = ["apt-get", "-qq", "-o", "DPkg::Lock::Timeout=600"]
    _in_chroot(apt + ["update"])
    _in_chroot(apt + ["install", "-y", "--no-install-recommends", "-o", "Dpkg::Options::=--force-confold"]
               + packages)
    _in_chroot(["apt-get", "clean"])
    with open(stamp, "w") as f:
        f.write(stamp_text)


def ensure_root():
    """debootstrap the root (once), then install PACKAGES into it (when the stamp differs)."""
    if _stamp_ok():
        return False
    if not os.path.exists(ROOT + "/usr/bin/apt-get") or not os.path.exists(ROOT + "/.b4ns-debootstrapped"):
        tmp = ROOT + ".tmp"
        if os.path.exists(tmp):
            _unmount_under(tmp)
            shutil.rmtree(tmp)
        if os.path.exists(ROOT):  # a root that never finished: start again
            _unmount_under(ROOT)
            shutil.rmtree(ROOT)
        _log("debootstrap %s into %s" % (SUITE, ROOT))
        _run(["debootstrap", "--variant=minbase", SUITE, tmp, mirror()], stdout=subprocess.DEVNULL)
        open(tmp + "/.b4ns-debootstrapped", "w").close()
        os.rename(tmp, ROOT)
    # No service may start in the root (docker.io's postinst, say).
    policy = ROOT + "/usr/sbin/policy-rc.d"
    with open(policy, "w") as f:
        f.write("#!/bin/sh\nexit 101\n")
    os.chmod(policy, 0o755)
    _install(PACKAGES, STAMP, _stamp_text())
    return True


def ensure_docker():
    """DOCKER_PACKAGES in the root (once; recorded in DOCKER_STAMP)."""
    text = "packages %s\n" % " ".join(sorted(DOCKER_PACKAGES))
    try:
        if open(DOCKER_STAMP).read() == text:
            return False
    except OSError:
        pass
    if os.geteuid() != 0:
        raise PermissionError("installing Docker into the root needs root")
    _install(DOCKER_PACKAGES, DOCKER_STAMP, text)
    return True


def _write(path, text, mode=None):
    try:
        if open(path).read() == text:
            return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)
    if mode is not None:
        os.chmod(path, mode)


def ensure_root_config():
    """The test user (same uid and ids), containers.conf, pasta's resolv.conf, mount points."""
    pw = tb.pwd.getpwnam(tb.USER)
    for name, line in (("passwd", "%s:x:%d:%d::/home/%s:/bin/bash\n" % (tb.USER, pw.pw_uid, pw.pw_gid, tb.USER)),
                       ("group", "%s:x:%d:\n" % (tb.USER, pw.pw_gid))):
        path = ROOT + "/etc/" + name
        lines = [l for l in open(path).read().splitlines(True) if not l.startswith(tb.USER + ":")]
        _write(path, "".join(lines) + line)
    for name in ("subuid", "subgid"):
        _write(ROOT + "/etc/" + name, open("/etc/" + name).read())
    home = ROOT + "/home/" + tb.USER
    os.makedirs(home, exist_ok=True)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    os.makedirs(ROOT + "/etc/containers", exist_ok=True)
    _write(ROOT + "/etc/containers/containers.conf", CONTAINERS_CONF)
    # Bound over /etc/resolv.conf in the saved namespace only: apt (through
    # chroot) keeps the host's copy that debootstrap made.
    _write(ROOT + RESOLV, "nameserver %s\n" % NAMESERVER)
    for d in shared_dirs():
        os.makedirs(ROOT + d, exist_ok=True)


def ensure_skeleton():
    """SKELETON inside the root: merged-/usr symlinks, passwd, group, owned by the test user."""
    top = ROOT + SKELETON
    for d in ("usr", "proc", "sys", "dev", "etc", "run", "root", "home", "var", "tmp"):
        os.makedirs(os.path.join(top, d), exist_ok=True)
    os.chmod(os.path.join(top, "tmp"), 0o1777)
    for link in ("bin", "sbin", "lib", "lib64"):
        if not os.path.lexists(os.path.join(top, link)):
            os.symlink("usr/" + link, os.path.join(top, link))
    _write(os.path.join(top, "etc", "passwd"),
           "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    _write(os.path.join(top, "etc", "group"), "root:x:0:\nnogroup:x:65534:\n")
    # As on a Debian system: /etc/hosts (podman's host.containers.internal) before DNS; without
    # the file glibc asks DNS first.
    _write(os.path.join(top, "etc", "nsswitch.conf"), "hosts: files dns\n")
    uid, gid = tb.user_uid(), tb.user_gid()
    for dirpath, dirs, names in os.walk(top):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirs + names]:
            os.lchown(name, uid, gid)


def ensure_addresses():
    """LAN_PEER4, LAN_PEER6 and NAMESERVER on the test namespace's second interface (idempotent)."""
    _run(tb.in_netns(["ip", "addr", "replace", NAMESERVER + "/32", "dev", tb.VETH_B]))
    _run(tb.in_netns(["ip", "addr", "replace", LAN_PEER4 + "/32", "dev", tb.VETH_B]))
    _run(tb.in_netns(["ip", "-6", "addr", "replace", LAN_PEER6 + "/128", "dev", tb.VETH_B, "nodad"]))


# ------------------------------------------------------ the mount namespace

def _mountinfo_targets():
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def _unmount_under(path):
    """Lazily unmount whatever the host's namespace has mounted at or under path."""
    for target in sorted((t for t in _mountinfo_targets() if t == path or t.startswith(path + "/")),
                         key=len, reverse=True):
        subprocess.run(["umount", "-l", target], stderr=subprocess.DEVNULL)


def _mntns_bound():
    return MNTNS in _mountinfo_targets()


def _mntns_alive():
    """The saved namespace exists and is pivoted into the root (its / holds the stamp)."""
    return _mntns_bound() and subprocess.run(
        ["nsenter", "--mount=" + MNTNS, "test", "-e", "/" + os.path.basename(STAMP)],
        stderr=subprocess.DEVNULL).returncode == 0


NS_SCRIPT = r"""
set -e
root=$1; resolv=$2; uid=$3; gid=$4; xdg=$5; shift 5
mount --bind "$root" "$root"
mount --make-private "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"; mount --make-rslave "$root/sys"
mount --rbind /dev "$root/dev"; mount --make-rslave "$root/dev"
mount -t tmpfs -o mode=755 tmpfs "$root/run"
mount --bind "$root$resolv" "$root/etc/resolv.conf"
for d in "$@"; do mkdir -p "$root$d"; mount --bind "$d" "$root$d"; done
mkdir -p "$root$xdg" "$root/tmp"
chown "$uid:$gid" "$root$xdg"; chmod 700 "$root$xdg"
cd "$root"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
mount --make-rshared /
"""


def ensure_mntns():
    """The saved mount namespace, pivot_root'ed into ROOT (made once per boot)."""
    if _mntns_alive():
        return False
    if _mntns_bound():  # a namespace whose setup failed half-way
        _run(["umount", MNTNS])
    os.makedirs(NS_DIR, exist_ok=True)
    # nsfs files can be bound only on a private mount (as /run/netns is).
    if NS_DIR not in _mountinfo_targets():
        _run(["mount", "--bind", NS_DIR, NS_DIR])
    _run(["mount", "--make-private", NS_DIR])
    if not os.path.exists(MNTNS):
        open(MNTNS, "w").close()
    _log("creating the mount namespace " + MNTNS)
    _run(["unshare", "--mount=" + MNTNS, "--propagation", "private", "sh", "-c", NS_SCRIPT, "sh", ROOT, RESOLV,
          str(tb.user_uid()), str(tb.user_gid()), runtime_dir()] + shared_dirs())
    return True


# ------------------------------------------------------------ argv builders

def runtime_dir():
    """The test user's XDG_RUNTIME_DIR inside the root (podman 5's own, not podman 4's)."""
    return "%s/%d" % (XDG_DIR, tb.user_uid())


def shared_dirs():
    """Host dirs bound into the root at the same path: the daemon's socket, profile and log
    (tests/e2e/daemon.py puts them in WORKDIR and the host's /run/user/UID) are the same files
    for the daemon outside and for crun inside."""
    return [tb.WORKDIR, tb.runtime_dir()]


def in_bed(argv, netns=True):
    """argv as root inside the root's mount namespace (and the test network namespace)."""
    ns = ["nsenter", "--mount=" + MNTNS]
    if netns:
        ns.append("--net=" + tb.NETNS_PATH)
    return ns + list(argv)


def as_user(argv, netns=True, env=None):
    """argv as the test user inside the root, with a clean environment, from its home there."""
    user_env = {
        "HOME": "/home/" + tb.USER,
        "USER": tb.USER,
        "LOGNAME": tb.USER,
        "PATH": tb.USER_PATH,
        "XDG_RUNTIME_DIR": runtime_dir(),
        # cgroup v1 here: podman 5 warns on every command otherwise.
        "PODMAN_IGNORE_CGROUPSV1_WARNING": "1",
    }
    user_env.update(env or {})
    cmd = ["setpriv", "--reuid=%d" % tb.user_uid(), "--regid=%d" % tb.user_gid(), "--init-groups",
           "env", "-i", "--chdir=/home/" + tb.USER]
    return in_bed(cmd + ["%s=%s" % kv for kv in sorted(user_env.items())] + list(argv), netns=netns)


def podman(args, runtime="crun"):
    """A rootless podman 5 command of the test user inside the test namespace."""
    return as_user(["podman", "--runtime", runtime] + list(args))


def run_container(cmd, runtime="crun", seccomp=None, network="pasta", extra=(), name=None, rm=True):
    """argv of `podman run` of cmd in SKELETON with the root's /usr (network pasta, as podman 5's default)."""
    args = ["run"] + (["--rm"] if rm else []) + ["--network", network, "-v", "/usr:/usr:ro"]
    if seccomp:
        args += ["--security-opt", "seccomp=" + seccomp]
    if name:
        args += ["--name", name]
    return podman(args + list(extra) + ["--rootfs", SKELETON + ":O"] + list(cmd), runtime)


def default_profile_base():
    """podman 5's own default seccomp profile, as a host path (seccomp-gen.py --base FILE)."""
    return ROOT + "/usr/share/containers/seccomp.json"


# -------------------------------------------------------------- up / status

def up():
    if os.geteuid() != 0:
        raise PermissionError("bed13 up must run as root")
    started = time.monotonic()
    tb.up()
    # debootstrap builds the root; dnsmasq is the DNS server the tests run in the test namespace.
    tb.ensure_packages(HOST_PACKAGES, recommends=False)
    ensure_root()
    ensure_root_config()
    ensure_skeleton()
    ensure_addresses()
    ensure_mntns()
    _log("up in %.1fs" % (time.monotonic() - started))


def _is_pause_process(pid):
    """pid is the test user's catatonit (podman's pause process), not a reused pid."""
    try:
        with open("/proc/%d/comm" % pid) as f:
            comm = f.read().strip()
        return comm == "catatonit" and os.stat("/proc/%d" % pid).st_uid == tb.user_uid()
    except OSError:
        return False


def down():
    """Stop podman 5's containers and its pause process (which holds the saved namespace), then
    unbind the namespace; keep the root (the next `up` makes a new namespace in 0.1 s)."""
    if os.geteuid() != 0:
        raise PermissionError("bed13 down must run as root")
    if _mntns_bound():
        if os.path.exists(tb.NETNS_PATH):
            subprocess.run(podman(["rm", "--all", "--force", "--time", "0"]), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=120)
        pause = runtime_dir() + "/libpod/tmp/pause.pid"
        pid = subprocess.run(in_bed(["cat", pause], netns=False), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, universal_newlines=True).stdout.strip()
        if pid.isdigit() and _is_pause_process(int(pid)):
            tb._kill_pid(int(pid))
        _log("unbinding the mount namespace " + MNTNS)
        _run(["umount", MNTNS])
    if NS_DIR in _mountinfo_targets():
        _run(["umount", NS_DIR])


def status():
    checks = [
        ("root " + ROOT, _stamp_ok(), "absent or stale stamp"),
        ("skeleton", os.path.isdir(ROOT + SKELETON + "/usr"), "absent"),
        ("mount namespace", _mntns_alive(), "absent"),
    ]
    if _mntns_alive() and os.path.exists(tb.NETNS_PATH):
        out = subprocess.run(podman(["version", "--format", "{{.Client.Version}}"]), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True)
        checks.append(("podman", out.returncode == 0, out.stderr.strip()[-200:]))
        if out.returncode == 0:
            checks[-1] = ("podman " + out.stdout.strip(), True, "")
    return tb.print_checks(checks, 28)


def main(argv):
    return tb.cli(argv, "bed13.py", up, down, status)  # up() says how long it took


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
