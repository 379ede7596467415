"""A real seccomp-notify target for unit tests: no root, no container, no mock of the kernel.

Target() forks a child that moves into a user and network namespace of its
own (its own loopback, up), loads a seccomp filter that sends connect, bind
and listen to a listener, and hands the listener fd to this process.  The
test's Daemon answers the child's notifications in this process, whose
network namespace plays the host's.  Target.run(code) has the child exec
Python code (with `result` to fill in) while the daemon's loop turns.
"""

import ctypes
import errno
import fcntl
import json
import os
import platform
import select
import socket
import struct
import sys
import time
import traceback

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_USER_NOTIF, SECCOMP_RET_ALLOW = 0x7FC00000, 0x7FFF0000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
TRAPPED = ("connect", "bind", "listen")


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def filter_program(b4ns):
    """Classic BPF: the native arch's connect, bind and listen go to the listener."""
    arch = {"x86_64": b4ns.AUDIT_ARCH_X86_64, "aarch64": b4ns.AUDIT_ARCH_AARCH64}[platform.machine()]
    numbers = b4ns.SYSCALL_NUMBERS[arch][0]
    nrs = [numbers[name] for name in TRAPPED]
    program = [(BPF_LD_W_ABS, 0, 0, 4),                          # seccomp_data.arch
               (BPF_JEQ_K, 0, len(nrs) + 1, arch),                 # other arches: allowed
               (BPF_LD_W_ABS, 0, 0, 0)]                          # seccomp_data.nr
    for i, nr in enumerate(nrs):
        program.append((BPF_JEQ_K, len(nrs) - i, 0, nr))         # to the USER_NOTIF return
    program += [(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW), (BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF)]
    return program


def _check(ret, what):
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return ret


def _enter_namespaces(libc):
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET), "unshare")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write("0 %d 1" % uid)
    with open("/proc/self/gid_map", "w") as f:
        f.write("0 %d 1" % gid)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _child(channel, program):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    _enter_namespaces(libc)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
    instructions = (SockFilter * len(program))(*(SockFilter(*i) for i in program))
    prog = SockFprog(len(program), instructions)
    nr = {"x86_64": 317, "aarch64": 277}[platform.machine()]
    listener = _check(libc.syscall(ctypes.c_long(nr), ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                                   ctypes.c_uint(SECCOMP_FILTER_FLAG_NEW_LISTENER), ctypes.byref(prog)), "seccomp")
    channel.sendmsg([b"ready"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", listener))])
    os.close(listener)
    scope = {"socket": socket, "errno": errno, "os": os, "struct": struct, "ctypes": ctypes, "libc": libc}
    while True:
        code = channel.recv(1 << 16)
        if not code:
            return
        scope["result"] = None
        try:
            exec(code.decode(), scope)
            reply = {"result": scope["result"]}
        except Exception:
            reply = {"error": traceback.format_exc()}
        channel.sendall(json.dumps(reply).encode())


class Target:
    """The child under the filter.  daemon: the Daemon that answers it (registered here)."""

    def __init__(self, b4ns, daemon, metadata=None):
        self.daemon = daemon
        program = filter_program(b4ns)
        self.channel, child_end = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into the test
            status = 1
            try:
                self.channel.close()
                _child(child_end, program)
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        child_end.close()
        data, ancdata, _flags, _addr = self.channel.recvmsg(16, socket.CMSG_SPACE(4))
        if data != b"ready":
            self.close()
            raise OSError(errno.EPERM, "the child could not enter its namespaces or load its filter")
        listener = struct.unpack("i", ancdata[0][2][:4])[0]
        message = {"fds": ["seccompFd"], "pid": self.pid, "metadata": metadata,
                   "state": {"id": "unit-%d" % self.pid, "pid": self.pid}}
        daemon.registry.on_container_process(json.dumps(message).encode(), [listener])

    def run(self, code, timeout=30):
        """Exec `code` in the child (it sets `result`), turning the daemon's loop meanwhile."""
        self.channel.sendall(code.encode())
        deadline = time.monotonic() + timeout
        while not select.select([self.channel], [], [], 0)[0]:
            if time.monotonic() > deadline:
                raise TimeoutError("the child did not answer: %s" % code)
            self.daemon.events.run_once(0.01)
        reply = json.loads(self.channel.recv(1 << 20).decode())
        if "error" in reply:
            raise AssertionError("in the child:\n" + reply["error"])
        return reply["result"]

    def close(self):
        self.channel.close()
        os.waitpid(self.pid, 0)


def can_run():
    """Why Target cannot run here, or None: it needs unprivileged user namespaces."""
    pid = os.fork()
    if pid == 0:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _enter_namespaces(libc)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return "this kernel refuses user namespaces to unprivileged users"
    return None


if __name__ == "__main__":
    sys.exit("a helper of tests/unit/test_switcher.py")
