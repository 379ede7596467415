#!/usr/bin/env python3
"""bypass4netns.py: host-speed networking for rootless containers.

A container started with a seccomp profile whose listenerPath names this
daemon's socket hands the daemon its seccomp user-notification fd.  The daemon
then answers the few syscalls that decide where a socket goes (connect, bind,
listen, and TCP Fast Open sends): for a destination that is not ignored it
creates a socket in the host's network namespace, connects or binds it itself
with the address it validated, pins it to its host interface, and installs it
at the container's fd number (SECCOMP_IOCTL_NOTIF_ADDFD).  From then on the
data path is the host kernel's.  Everything else proceeds in the container's
own network namespace, and no trapped call that decides where a socket goes
is ever answered "continue": calls on sockets that are not IP are made by a
helper in the container's namespaces (unless --no-fd-swap-guard).  Only calls
that decide nothing continue: i386 socketcall operations that are not trapped
ones, and sends without MSG_FASTOPEN (Switcher.let_run).

The processes, each forked by the one above it (fork_child: it dies with
its parent and keeps nothing of its parent's but what it is given):

    Keeper          holds the counter and in-flight tables and the fds the
     |              daemon gives it; restarts a dead daemon, answers its
     |              calls under way (EINTR), hands the next one its state
     |              (KeeperLink: length-prefixed JSON snapshots + SCM_RIGHTS)
     +- Daemon      the runtimes' socket and the bypass4netnsd API, the
         |          container registry, the published ports, hand-over
         +- Worker x N   a Server and its Switcher for the filters handed to
         |    |          it (Worker.hand: JSON + the notify fd over SCM_RIGHTS;
         |    |          ParentChannel: its few requests back, JSON)
         |    +- HelperProcess   one per container and set of namespaces:
         |                       makes the calls on unix and netlink sockets
         |                       as the caller and answers them itself
         |                       (HelperWire: REQUEST/REPLY structs +
         |                       SCM_RIGHTS; the worker's end: NamespaceHelper)
         +- MultinodeAgent   --multinode's etcd client (JSON both ways)

With --workers 1 the daemon serves its filters itself (LocalPool: one Server
on its own loop, behind the same WorkerPool contract as the worker processes).

One notification's path: the container's thread traps; the kernel queues
it on the filter's notify fd; the worker's Server.on_notify receives it
(SECCOMP_IOCTL_NOTIF_RECV) into a Call, and Switcher.handle looks the (arch,
syscall number) up in its dispatch table, built from TRAPS and
Switcher.HANDLERS.  on_connect, for one, takes the target's socket
(pidfd_getfd), reads the address once, checks the notification is still
valid, decides (Settings, address policy), and either switches (a host
socket connected, pinned, ADDFD'ed) or makes the call on the container's own
socket; on a unix socket, Switcher.other_family hands it to the container's
NamespaceHelper.  Exactly one answer goes back (Call.result, fail, let_run).

The sections follow the same order: the kernel ABI and the table of trapped
calls, syscalls, pure policy, one notification's path (Call, Switcher and
its parts), what the processes share, then each process from the keeper
down with its wire protocol, and the command line.

Single file, standard library only, Linux >= 5.9, Python >= 3.9.
"""

import argparse
import array
import base64
import collections
import ctypes
import errno
import fcntl
import heapq
import mmap
import ipaddress
import json
import logging
import os
import re
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request

__version__ = "0.1.0"

log = logging.getLogger("bypass4netns")


class LogLimit:
    """Errors that can repeat at the rate of calls or clients, logged so that they cannot fill
    a disk: a line once, then at most once per INTERVAL with how many times it was left out."""

    INTERVAL = 10.0     # seconds
    LINES = 1024        # distinct lines remembered (the oldest forgotten first)

    def __init__(self):
        self.lines = {}             # line -> [monotonic time it may be logged again, times left out]

    def log(self, level, message, *args):
        line = message % args
        now = time.monotonic()
        entry = self.lines.pop(line, None)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            self.lines[line] = entry
            return
        if len(self.lines) >= self.LINES:
            del self.lines[next(iter(self.lines))]
        self.lines[line] = [now + self.INTERVAL, 0]
        if entry is not None and entry[1]:
            line += " (%d more times in the last %g s)" % (entry[1], self.INTERVAL)
        log.log(level, "%s", line)


# ---------------------------------------------------------------------------
# Kernel ABI (include/uapi/linux/seccomp.h, audit.h, socket.h) and the table of trapped calls
# ---------------------------------------------------------------------------

SECCOMP_GET_NOTIF_SIZES = 3                 # seccomp(2) operation
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1        # let the syscall run as the target asked
SECCOMP_ADDFD_FLAG_SETFD = 1                # install at newfd, replacing what is there
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1      # wake the target on the replier's CPU (>= 6.6)

SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100       # _IOWR('!', 0, struct seccomp_notif)
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101       # _IOWR('!', 1, struct seccomp_notif_resp)
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102   # _IOW('!', 2, __u64)
SECCOMP_IOCTL_NOTIF_ADDFD = 0x40182103      # _IOW('!', 3, struct seccomp_notif_addfd)
SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x40082104  # _IOW('!', 4, __u64)

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_ARM = 0x40000028
AUDIT_ARCH_RISCV64 = 0xC00000F3
X32_SYSCALL_BIT = 0x40000000                # x32 shares x86_64's arch value

PIDFD_THREAD = os.O_EXCL                    # pidfd_open flag for any thread (>= 6.9)
SYS_pidfd_getfd = 438                       # the same number on every architecture
SO_NETNS_COOKIE = 71                        # u64 id of the socket's netns (>= 5.14)
SIOCGSKNS = 0x894C                          # fallback: an fd of the socket's netns
MSG_FASTOPEN = 0x20000000
O_CLOEXEC = 0o2000000
SO_BINDTOIFINDEX = 62                       # pin a socket to an interface; unprivileged only while unpinned
NETLINK_ROUTE_GROUPS = 0x10 | 0x100         # RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLM_F_REQUEST_DUMP = 0x1 | 0x300            # NLM_F_REQUEST | NLM_F_DUMP
NLMSG_DONE, NLMSG_ERROR = 3, 2
IFA_ADDRESS, IFA_LOCAL = 1, 2
PR_SET_PDEATHSIG = 1                        # prctl: a signal to this process when its parent dies
PR_SET_CHILD_SUBREAPER = 36                 # prctl: orphaned descendants become this process's children
PR_SET_DUMPABLE = 4                         # prctl: 0 keeps ptrace and /proc/PID/mem out
CLONE_NEWNS = 0x00020000                    # setns(2): a mount namespace,
CLONE_NEWUSER = 0x10000000                  # a user namespace,
CLONE_NEWNET = 0x40000000                   # a network namespace


class SeccompData(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_int32), ("arch", ctypes.c_uint32),
                ("instruction_pointer", ctypes.c_uint64),
                ("args", ctypes.c_uint64 * 6)]


class SeccompNotif(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("data", SeccompData)]


class SeccompNotifResp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64),
                ("error", ctypes.c_int32), ("flags", ctypes.c_uint32)]


class SeccompNotifAddfd(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("flags", ctypes.c_uint32),
                ("srcfd", ctypes.c_uint32), ("newfd", ctypes.c_uint32),
                ("newfd_flags", ctypes.c_uint32)]


class SeccompNotifSizes(ctypes.Structure):
    _fields_ = [("seccomp_notif", ctypes.c_uint16),
                ("seccomp_notif_resp", ctypes.c_uint16),
                ("seccomp_data", ctypes.c_uint16)]


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


for _struct, _size in ((SeccompData, 64), (SeccompNotif, 80), (SeccompNotifResp, 24),
                       (SeccompNotifAddfd, 24), (SeccompNotifSizes, 6)):
    assert ctypes.sizeof(_struct) == _size, _struct.__name__

# The trapped syscalls, one row each: the dispatch tables (with
# Switcher.HANDLERS), the i386 socketcall(2) numbers, the profile's rules
# (SECCOMP_NOTIFY_RULES, of which seccomp-gen.py holds a generated copy) and
# the namespace helper's operations (HelperWire.OPS) all derive from it.  A notification of any other arch
# or number is never decoded: it continues untouched (it acts on nothing of
# ours: no such call is in the profile).
CONNECT, BIND, LISTEN, SENDTO, SENDMSG, SENDMMSG = "connect", "bind", "listen", "sendto", "sendmsg", "sendmmsg"
SOCKETCALL = "socketcall"
SYS_SOCKETCALL_I386 = 102                   # i386's multiplexer, which libseccomp traps too


def _flag_set(index, flag):
    """An OCI seccomp filter: argument `index` has `flag` set (value is the mask, valueTwo the datum)."""
    return ({"index": index, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"},)


# The profile traps no send but TCP Fast Open's, which connect too (they are
# refused: Switcher.send).  Switched sockets, UDP ones included, are pinned
# to an interface (HostInterfaces), so their sends need no check.
# helper_op: the code by which a worker asks a NamespaceHelper to make the call on a
# socket that is not IP (HelperWire.OPS; 0: never asked).
Trap = collections.namedtuple("Trap", "name x86_64 i386 x32 generic arm socketcall argc helper_op filters")
TRAPS = tuple(Trap(*row) for row in (
    # name      x86_64  i386  x32  generic  arm  socketcall  argc  helper  the profile's argument filters
    (CONNECT,       42,  362,  42,     203, 283,          3,    3,     1, ()),
    (BIND,          49,  361,  49,     200, 282,          2,    3,     2, ()),
    (LISTEN,        50,  363,  50,     201, 284,          4,    2,     3, ()),
    (SENDTO,        44,  369,  44,     206, 290,         11,    6,     0, _flag_set(3, MSG_FASTOPEN)),
    (SENDMSG,       46,  370, 518,     211, 296,         16,    3,     0, _flag_set(2, MSG_FASTOPEN)),
    (SENDMMSG,     307,  345, 538,     269, 374,         20,    4,     0, _flag_set(3, MSG_FASTOPEN)),
))
_TRAP_COLUMNS = {AUDIT_ARCH_X86_64: ("x86_64", 8), AUDIT_ARCH_I386: ("i386", 4), AUDIT_ARCH_AARCH64: ("generic", 8),
                 AUDIT_ARCH_RISCV64: ("generic", 8), AUDIT_ARCH_ARM: ("arm", 4)}
# arch -> ({name: nr}, pointer size of the ABI)
SYSCALL_NUMBERS = {arch: ({trap.name: getattr(trap, column) for trap in TRAPS}, ptr)
                   for arch, (column, ptr) in _TRAP_COLUMNS.items()}
X32_NUMBERS = {trap.name: trap.x32 for trap in TRAPS}
SOCKETCALLS = {trap.socketcall: (trap.name, trap.argc) for trap in TRAPS}   # call number -> (name, argc)
_SOCKETCALL_RULE = ((SOCKETCALL, ()),)  # i386 only: its calls carry their arguments in memory
SECCOMP_NOTIFY_RULES = tuple((trap.name, trap.filters) for trap in TRAPS) + _SOCKETCALL_RULE
SEND_FLAGS_ARG = {trap.name: trap.filters[0]["index"] for trap in TRAPS if trap.filters}  # send -> its flags' arg

# seccomp(2) itself, for SECCOMP_GET_NOTIF_SIZES, by `uname -m`.
SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "riscv64": 277, "i686": 354,
               "i386": 354, "armv7l": 383, "armv8l": 383}

# The ioctls' structs as the hot path packs them (struct is several times
# faster than ctypes field access); the ctypes classes above document them.
_NOTIF = struct.Struct("=QIIiIQ6Q")         # seccomp_notif: id, pid, flags, nr, arch, ip, args[6]
_RESP = struct.Struct("=QqiI")              # seccomp_notif_resp: id, val, error, flags
_ADDFD = struct.Struct("=QIIII")            # seccomp_notif_addfd: id, flags, srcfd, newfd, newfd_flags
for _layout, _struct in ((_NOTIF, SeccompNotif), (_RESP, SeccompNotifResp), (_ADDFD, SeccompNotifAddfd)):
    assert _layout.size == ctypes.sizeof(_struct), _struct.__name__

MAX_SOCKADDR = 128                          # sizeof(struct sockaddr_storage)

_SOCKADDR_IN = struct.Struct("!HH4s")       # family is host order: read separately
_SOCKADDR_IN6 = struct.Struct("!HHI16s")     # then sin6_scope_id, host order
_SOCKADDR_NL = struct.Struct("=HxxII")       # sockaddr_nl: family, port id, multicast groups
_TIMEVAL = struct.Struct("=qq")
_LINGER = struct.Struct("=ii")              # struct linger: l_onoff, l_linger
_U64 = struct.Struct("=Q")
_U32 = struct.Struct("!I")                  # the length of a hand-over's state
_FAMILY = struct.Struct("=H")               # sa_family_t, host order
_AF_UNSPEC = _FAMILY.pack(socket.AF_UNSPEC)  # a sockaddr's first bytes when it disconnects
_ZERO_NOTIF = bytes(_NOTIF.size)


# ---------------------------------------------------------------------------
# Syscalls: thin wrappers (OSError with errno, EINTR retried), /proc readers
# ---------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _retry(call, *args):
    """Run a libc call until it is not interrupted; raise OSError on failure."""
    while True:
        ret = call(*args)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def setns(fd, nstype):
    """Join the namespace `fd` names (os.setns is Python 3.12's)."""
    _retry(_libc.setns, fd, nstype)


_CAP_HEADER = struct.Struct("=Ii")          # __user_cap_header_struct: version, pid
_CAP_DATA = struct.Struct("=6I")            # two __user_cap_data_structs: effective, permitted, inheritable
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def capabilities():
    """This thread's (effective, permitted, inheritable) capabilities, 64-bit masks."""
    header = ctypes.create_string_buffer(_CAP_HEADER.pack(_LINUX_CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(_CAP_DATA.size)
    if _libc.capget(header, data) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    e0, p0, i0, e1, p1, i1 = _CAP_DATA.unpack(data.raw)
    return e0 | e1 << 32, p0 | p1 << 32, i0 | i1 << 32


def set_capabilities(effective, permitted):
    """capset: these effective and permitted capabilities (masks), none inheritable."""
    header = ctypes.create_string_buffer(_CAP_HEADER.pack(_LINUX_CAPABILITY_VERSION_3, 0))
    mask = 0xFFFFFFFF
    data = ctypes.create_string_buffer(_CAP_DATA.pack(effective & mask, permitted & mask, 0,
                                                      effective >> 32, permitted >> 32, 0))
    if _libc.capset(header, data) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _ioctl(fd, request, arg):
    """fcntl.ioctl, retried on EINTR; a writable `arg` gets what the kernel writes back."""
    while True:
        try:
            return fcntl.ioctl(fd, request, arg)
        except InterruptedError:
            continue


# ioctl(2) typed for RECV into memory of our own choosing: fcntl.ioctl copies a
# small buffer through its stack, and a process killed as RECV returns never
# copies it back (see InflightTable).
_ioctl_pointer = _libc["ioctl"]
_ioctl_pointer.restype = ctypes.c_int
_ioctl_pointer.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)


def notif_recv(notify_fd, address, view):
    """SECCOMP_IOCTL_NOTIF_RECV into the zeroed struct seccomp_notif at `address`, which
    `view` shows: the notification's fields.

    RECV ignores O_NONBLOCK: call it only when epoll says a notification waits.
    """
    if _ioctl_pointer(notify_fd, SECCOMP_IOCTL_NOTIF_RECV, address) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return _NOTIF.unpack_from(view)


# The structs below go to fcntl.ioctl as bytearrays: it takes a bytes object
# only after failing to parse it as a writable buffer, which costs two
# exceptions and their formatted messages, 0.35 us, on every call.

def notif_send(notify_fd, notif_id, val, error, flags):
    """SECCOMP_IOCTL_NOTIF_SEND; False when the target stopped waiting (ENOENT)."""
    try:
        _ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_SEND, bytearray(_RESP.pack(notif_id, val, error, flags)))
    except FileNotFoundError:
        return False
    return True


def notif_id_valid(notify_fd, notif_id):
    """Whether the target still waits for this notification's answer."""
    try:
        _ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_ID_VALID, bytearray(_U64.pack(notif_id)))
    except OSError:
        return False
    return True


def notif_addfd(notify_fd, notif_id, srcfd, newfd, cloexec):
    """Install our `srcfd` at the target's `newfd`, replacing it; False when the target is gone.

    Other failures raise OSError: EBADF when `newfd` is past the target's
    RLIMIT_NOFILE, EMFILE and the like.
    """
    request = bytearray(_ADDFD.pack(notif_id, SECCOMP_ADDFD_FLAG_SETFD, srcfd, newfd, O_CLOEXEC if cloexec else 0))
    try:
        _ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_ADDFD, request)
    except FileNotFoundError:
        return False
    return True


# syscall(2) typed for pidfd_getfd, a function object of its own: typed arguments
# cost a third of wrapping each in a ctypes object on every trapped call.
_syscall_pidfd_getfd = _libc["syscall"]
_syscall_pidfd_getfd.restype = ctypes.c_long
_syscall_pidfd_getfd.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_uint)


def pidfd_getfd(pidfd, targetfd):
    """A duplicate, close-on-exec, of fd `targetfd` of the process `pidfd` names."""
    return _retry(_syscall_pidfd_getfd, SYS_pidfd_getfd, pidfd, targetfd, 0)


# process_vm_readv(2) typed, with the iovecs passed by address: a third cheaper
# than converting byref() arguments on each call.
_process_vm_readv = _libc["process_vm_readv"]
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_readv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                              ctypes.c_ulong)


class MemoryReader:
    """process_vm_readv into one preallocated buffer: no allocation per read but the result."""

    def __init__(self, size=MAX_SOCKADDR):
        self.buffer = ctypes.create_string_buffer(size)
        self.local = IoVec(ctypes.cast(self.buffer, ctypes.c_void_p), size)
        self.remote = IoVec(0, 0)
        self.iovecs = (ctypes.addressof(self.local), 1, ctypes.addressof(self.remote), 1, 0)

    def read(self, pid, address, length):
        """`length` bytes at `address` in process `pid`; EFAULT when short."""
        if length > len(self.buffer):
            raise OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))
        self.local.iov_len = self.remote.iov_len = length
        self.remote.iov_base = address
        if _retry(_process_vm_readv, pid, *self.iovecs) != length:
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        return ctypes.string_at(self.buffer, length)  # .raw would copy the whole buffer


def sock_call(call, fd, *args):
    """connect/bind/sendto with a raw sockaddr, exactly as validated; returns -errno or result."""
    while True:
        ret = call(fd, *args)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            return -err


CONNECT_GUARD = 0.002   # seconds a connect on a file the container shares may wait (SIGALRM ends it)


def guarded_connect(fd, raw):
    """One connect of `fd` to `raw` under CONNECT_GUARD; -EINTR if the guard ended it.

    For a file the container shares (its own socket, or a host socket
    installed): another of its threads may make it blocking at any time
    (fcntl is not trapped), and a connect that blocks would hold the loop
    for the whole handshake.  Every serving process has a SIGALRM handler
    (watch_signals), so the signal ends the wait, and the connect goes on;
    a process without one (a test's Switcher) connects unguarded, since the
    signal's default action would end it.
    """
    if not callable(signal.getsignal(signal.SIGALRM)):
        return connect_once(fd, raw)
    signal.setitimer(signal.ITIMER_REAL, CONNECT_GUARD)
    try:
        if _libc.connect(fd, raw, len(raw)) == 0:
            return 0
        return -ctypes.get_errno()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def start_connect(fd, raw, shared=False):
    """connect a non-blocking `fd` to `raw`: 0 if it is done at once (local handshakes often are),
    -EINPROGRESS if under way, else -errno.  A second connect tells a handshake that ended
    within the first; it also makes the socket connected, so a later connect gets EISCONN
    as after any connect that returned 0.  `shared`: the container shares the file, so each
    connect is a guarded_connect, and one the guard ended is under way."""
    connect = guarded_connect if shared else connect_once
    result = connect(fd, raw)
    if result == -errno.EINPROGRESS:
        result = connect(fd, raw)
        if result == -errno.EALREADY:
            result = -errno.EINPROGRESS
    return -errno.EINPROGRESS if result == -errno.EINTR else result


def connect_once(fd, raw):
    """connect `fd` to `raw` (a socket nobody else holds), restarted after a signal."""
    return sock_call(_libc.connect, fd, raw, len(raw))


def get_notif_sizes():
    """The kernel's struct sizes, or None where seccomp(2)'s number is unknown."""
    nr = SYS_SECCOMP.get(os.uname().machine)
    if nr is None:
        return None
    sizes = SeccompNotifSizes()
    _retry(_libc.syscall, ctypes.c_long(nr), ctypes.c_uint(SECCOMP_GET_NOTIF_SIZES),
           ctypes.c_uint(0), ctypes.byref(sizes))
    return sizes


def recv_with_fds(sock, maxfds=16, size=1 << 16):
    """One recvmsg: (data, [fds]).  Every received fd is ours to close.

    OSError(EMFILE) when the kernel dropped fds it could not install here
    (MSG_CTRUNC): this process is out of fds.
    """
    data, ancdata, flags, _addr = sock.recvmsg(size, socket.CMSG_SPACE(maxfds * 4))
    fds = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack("%di" % (len(payload) // 4), payload[:len(payload) // 4 * 4]))
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EMFILE, "file descriptors dropped in transit (MSG_CTRUNC)")
    return data, fds


def out_of_fds(error):
    """Whether an OSError says this process (EMFILE) or the system (ENFILE) has no fd left."""
    return error.errno in (errno.EMFILE, errno.ENFILE)


def raise_fd_limit():
    """RLIMIT_NOFILE's soft limit raised to the hard one, as Go's runtime does: (old, new)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, soft
    return soft, hard


def own_netns_id():
    """An id of the daemon's network namespace: its cookie (Linux >= 5.14), else its inode."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            return ("cookie", probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))
        except OSError:
            return ("inode", os.stat("/proc/self/ns/net").st_ino)


def in_netns(sock, netns):
    """Whether `sock` lives in the network namespace own_netns_id() gave `netns`."""
    if netns[0] == "cookie":
        return ("cookie", sock.getsockopt(_SOL, SO_NETNS_COOKIE, 8)) == netns
    try:
        nsfd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    except PermissionError:
        # SIOCGSKNS needs CAP_NET_ADMIN over the socket's namespace: the
        # daemon has it over its containers' (it owns their user
        # namespaces), so a namespace it cannot open is the host's.
        return True
    try:
        return ("inode", os.fstat(nsfd).st_ino) == netns
    finally:
        os.close(nsfd)


def thread_group_id(tid):
    """The process (thread group) that thread `tid` belongs to; OSError if it is gone."""
    with open("/proc/%d/status" % tid) as f:
        for line in f:
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    raise ProcessLookupError(errno.ESRCH, "no thread %d" % tid)


NAMESPACES = (("user", CLONE_NEWUSER), ("mnt", CLONE_NEWNS), ("net", CLONE_NEWNET))  # joined in this order


def namespace_inodes(tid):
    """The inodes of a thread's NAMESPACES ("self": ours), which tell namespaces apart."""
    return tuple(os.stat("/proc/%s/ns/%s" % (tid, name)).st_ino for name, _nstype in NAMESPACES)


def read_proc_net(pid, parsers):
    """What parse(text) finds in /proc/PID/net/NAME, for each (NAME, parse) of `parsers`, in one
    list: process `pid`'s network namespace.  A file that cannot be read (the process is gone)
    or parsed adds nothing."""
    found = []
    for name, parse in parsers:
        try:
            with open("/proc/%d/net/%s" % (int(pid), name)) as f:
                found.extend(parse(f.read()))
        except (OSError, TypeError, ValueError):
            pass
    return found


def container_addresses(pid):
    """A container's own IP addresses, read from its network namespace through process `pid`'s
    /proc (no address if the process is gone)."""
    return read_proc_net(pid, (("fib_trie", parse_fib_trie_addresses), ("if_inet6", parse_if_inet6_addresses)))


# ---------------------------------------------------------------------------
# Policy and parsers: pure functions, no syscalls
# ---------------------------------------------------------------------------

class Error(Exception):
    """A user-facing error: bad flag values, an unusable socket path."""


_LOOPBACK_IP4, _LOOPBACK_IP6 = ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")
_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


def parse_ignore(values):
    """--ignore values -> (networks, auto).  Each value is a comma list of CIDRs or `auto`."""
    networks, auto = [], False
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item == "auto":
                auto = True
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise Error("invalid --ignore value %r: not a CIDR or 'auto'" % item) from None
    return networks, auto


def parse_sockaddr(raw):
    """A sockaddr as read from the target -> (IP version, address as an int, port), or None.

    None means the bytes name no IP destination the daemon can judge
    (AF_UNSPEC, another family, too short); a v4-mapped IPv6 address comes
    back as the IPv4 address it carries.  Integers, not ipaddress objects:
    this runs on every trapped connect.
    """
    if len(raw) < 16:
        return None
    family = _FAMILY.unpack_from(raw)[0]
    if family == socket.AF_INET:
        return 4, int.from_bytes(raw[4:8], "big"), raw[2] << 8 | raw[3]
    if family == socket.AF_INET6 and len(raw) >= 24:
        address = int.from_bytes(raw[8:24], "big")
        if address >> 32 == 0xFFFF:
            return 4, address & 0xFFFFFFFF, raw[2] << 8 | raw[3]
        return 6, address, raw[2] << 8 | raw[3]
    return None


def packed_address(dest):
    """parse_sockaddr()'s destination -> its address as bytes (4 or 16), as HostInterfaces keys them."""
    return dest[1].to_bytes(4 if dest[0] == 4 else 16, "big")


# --debug's line for each decision (Switcher.debug_decision), read back by parse_decisions():
# the container's short id, the calling thread, the fd, the call, its destination, the outcome.
DECISION_FORMAT = "container %s pid %d fd %d %s %s: %s"
_DECISION_LINE = re.compile(r"container (\S+) pid (\d+) fd (-?\d+) (\w+) (\S+): (.*)$", re.M)


def parse_decisions(text):
    """[(short id, tid, fd, call, destination, outcome)] of the decision lines in a --debug log."""
    return [(cid, int(tid), int(fd), what, dest, outcome)
            for cid, tid, fd, what, dest, outcome in _DECISION_LINE.findall(text)]


def format_destination(dest):
    """(version, address, port) -> "198.18.0.1:80" or "[2001:db8::1]:80", for logs."""
    if dest is None:
        return "-"
    version, address, port = dest
    return ("%s:%d" if version == 4 else "[%s]:%d") % (ipaddress.ip_address(address) if version == 6
                                                         else ipaddress.IPv4Address(address), port)


def encode_sockaddr(family, ip, port):
    """(family, ip or None for any, port) -> raw sockaddr bytes, or None if `family` can't hold `ip`."""
    if family == socket.AF_INET:
        if ip is not None and ip.version != 4:
            return None
        packed = ip.packed if ip is not None else bytes(4)
        return _FAMILY.pack(family) + struct.pack("!H4s8x", port, packed)
    if ip is None:
        packed = bytes(16)
    elif ip.version == 4:
        packed = _MAPPED_PREFIX + ip.packed
    else:
        packed = ip.packed
    return _FAMILY.pack(family) + struct.pack("!HI16s", port, 0, packed) + bytes(4)


# Why a destination stays in the container: decisions compare these
# constants (by identity), logs print them.
LOOPBACK = "loopback"                       # the container itself: never bypassed
UNSPECIFIED = "unspecified"                 # 0.0.0.0 and :: mean the local host: never bypassed
LINK_LOCAL = "link-local"                   # 169.254.0.0/16 and fe80::/10 are the container's link: never
                                            # bypassed (pasta's DNS forwarder and host.containers.internal)
IGNORED = "ignored"                         # in an --ignore network
AUTO_IGNORED = "auto-ignored"               # in one of the container's own subnets (--ignore auto)
NOT_IP = "not an IP address"                # AF_UNSPEC and the like


def compile_networks(networks):
    """ipaddress networks -> ((version, network as int, netmask as int, network), ...) for
    destination_reason: integer compares cost a tenth of `ip in network`."""
    return tuple((net.version, int(net.network_address), int(net.netmask), net) for net in networks)


def destination_reason(dest, networks, auto_networks=()):
    """(reason, network) why the destination `dest` stays in the container, (None, None) to bypass.

    `dest` is parse_sockaddr's tuple; the networks are compile_networks'.
    """
    version, address, _port = dest
    if version == 4:
        if address >> 24 == 127:
            return LOOPBACK, None
        if address == 0:
            return UNSPECIFIED, None
        if address >> 16 == 0xA9FE:
            return LINK_LOCAL, None
    else:
        if address == 1:
            return LOOPBACK, None
        if address == 0:
            return UNSPECIFIED, None
        if address >> 118 == 0x3FA:
            return LINK_LOCAL, None
    for net_version, net, mask, network in networks:
        if net_version == version and address & mask == net:
            return IGNORED, network
    for net_version, net, mask, network in auto_networks:
        if net_version == version and address & mask == net:
            return AUTO_IGNORED, network
    return None, None


def describe_reason(reason, network):
    return reason if network is None else "%s %s" % (reason, network)


class PortMapping:
    """One published port: host (ip, port) <- container port, for one protocol."""

    __slots__ = ("host_ip", "host_port", "container_port", "proto")

    def __init__(self, host_ip, host_port, container_port, proto):
        self.host_ip, self.host_port = host_ip, host_port
        self.container_port, self.proto = container_port, proto

    def __repr__(self):
        if self.host_ip is None:
            host = ""
        else:
            host = ("[%s]:" if self.host_ip.version == 6 else "%s:") % self.host_ip
        return "%s%d->%d/%s" % (host, self.host_port, self.container_port, self.proto)

    def __eq__(self, other):
        return isinstance(other, PortMapping) and repr(self) == repr(other)


def _parse_port_range(text, spec):
    try:
        if "-" in text:
            low, high = (int(p) for p in text.split("-", 1))
        else:
            low = high = int(text)
    except ValueError:
        raise Error("invalid -p value %r: %r is not a port or range" % (spec, text)) from None
    if not (0 < low <= high <= 65535):
        raise Error("invalid -p value %r: ports must be 1-65535, low-high" % spec)
    return low, high


def parse_publish(spec):
    """One -p value, [HOSTIP:]HOSTPORT[-END]:CONTAINERPORT[-END][/tcp|/udp] -> [PortMapping]."""
    text, _, proto = spec.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp"):
        raise Error("invalid -p value %r: protocol must be tcp or udp" % spec)
    host_ip = None
    if text.startswith("["):
        ip_text, sep, text = text[1:].partition("]:")
        if not sep:
            raise Error("invalid -p value %r: expected [IPv6]:HOSTPORT:CONTAINERPORT" % spec)
        try:
            host_ip = ipaddress.IPv6Address(ip_text)
        except ValueError:
            raise Error("invalid -p value %r: %r is not an IPv6 address" % (spec, ip_text)) from None
    parts = text.split(":")
    if len(parts) == 3 and host_ip is None:
        try:
            host_ip = ipaddress.IPv4Address(parts[0]) if parts[0] else None
        except ValueError:
            raise Error("invalid -p value %r: %r is not an IPv4 address" % (spec, parts[0])) from None
        parts = parts[1:]
    if len(parts) != 2:
        raise Error("invalid -p value %r: expected [HOSTIP:]HOSTPORT:CONTAINERPORT[/PROTO]" % spec)
    host_low, host_high = _parse_port_range(parts[0], spec)
    cont_low, cont_high = _parse_port_range(parts[1], spec)
    if host_high - host_low != cont_high - cont_low:
        raise Error("invalid -p value %r: host and container ranges differ in length" % spec)
    return [PortMapping(host_ip, host_low + i, cont_low + i, proto)
            for i in range(host_high - host_low + 1)]


def build_publish_table(specs):
    """All -p values -> {(proto, container_port): PortMapping}, refusing conflicts.

    One host port may serve two mappings on distinct host IPs, as with
    docker; a mapping on all addresses overlaps every other on its port.
    """
    table, hosts = {}, {}
    for spec in specs:
        for mapping in parse_publish(spec):
            key = (mapping.proto, mapping.container_port)
            host_key = (mapping.proto, mapping.host_port)
            for other in hosts.get(host_key, ()):
                if None in (other.host_ip, mapping.host_ip) or other.host_ip == mapping.host_ip:
                    raise Error("invalid -p value %r: host port %d/%s is already published"
                                % (spec, mapping.host_port, mapping.proto))
            if key in table:
                raise Error("invalid -p value %r: container port %d/%s is already published"
                            % (spec, mapping.container_port, mapping.proto))
            table[key] = mapping
            hosts.setdefault(host_key, []).append(mapping)
    return table


# OCI annotations by which a container adds to the daemon's --ignore and -p
PUBLISH_ANNOTATION = "bypass4netns.publish"                     # comma-separated -p values
IGNORE_ANNOTATION = "bypass4netns.ignore"                       # comma-separated CIDRs or auto
NERDCTL_IGNORE_SUBNETS = "nerdctl/bypass4netns-ignore-subnets"  # nerdctl's: a JSON list of the same
NERDCTL_IGNORE_BIND = "nerdctl/bypass4netns-ignore-bind"        # nerdctl's: "true", no bind bypassed


def parse_annotations(annotations):
    """A container's annotations -> (ignore values, publish specs, ignore_bind), every value
    checked; Error naming the annotation that is invalid."""
    if not isinstance(annotations, dict):
        return [], [], False
    # Values are separated by commas or spaces: podman's --annotation splits its argument
    # at commas, so its users need the spaces.
    ignore = str(annotations.get(IGNORE_ANNOTATION) or "").replace(",", " ").split()
    subnets = annotations.get(NERDCTL_IGNORE_SUBNETS)
    if subnets:
        try:
            subnets = json.loads(subnets)
        except (TypeError, ValueError):
            subnets = None
        if not (isinstance(subnets, list) and all(isinstance(item, str) for item in subnets)):
            raise Error("%s: not a JSON list of strings" % NERDCTL_IGNORE_SUBNETS)
        ignore.extend(subnets)
    try:
        parse_ignore(ignore)
    except Error as e:
        raise Error("%s: %s" % (IGNORE_ANNOTATION, e)) from None
    publish = str(annotations.get(PUBLISH_ANNOTATION) or "").replace(",", " ").split()
    try:
        build_publish_table(publish)
    except Error as e:
        raise Error("%s: %s" % (PUBLISH_ANNOTATION, e)) from None
    return ignore, publish, str(annotations.get(NERDCTL_IGNORE_BIND, "")).lower() == "true"


class Settings:
    """How a container's calls are judged: the daemon's --ignore and -p, plus its annotations'.

    `publish` maps (proto, container port) to a PortMapping; `in_use` holds
    the (proto, container port) keys whose host side another container
    published first: binding them fails with EADDRINUSE, as with docker.
    `swap_guard`: False with --no-fd-swap-guard (Switcher.other_family);
    `udp_guard`: False with --no-udp-loopback-guard (Switcher.switch).
    """

    __slots__ = ("networks", "auto", "publish", "in_use", "swap_guard", "udp_guard")

    def __init__(self, networks, auto, publish, in_use=frozenset(), swap_guard=True, udp_guard=True):
        self.networks, self.auto, self.publish, self.in_use = networks, auto, publish, in_use
        self.swap_guard, self.udp_guard = swap_guard, udp_guard

    def with_container(self, added):
        """These settings plus what ContainerRegistry.container_settings() found (JSON, or None for nothing)."""
        if added is None:
            return self
        return self.for_container(added["ignore"], map(mapping_from_json, added["publish"]),
                                  map(tuple, added["in_use"]), added["ignore_bind"])

    def for_container(self, ignore, mappings, in_use, ignore_bind):
        """These settings plus a container's: ignore values, own PortMappings, in_use keys, and
        ignore_bind (nerdctl's: no published port at all, the daemon's included)."""
        networks, auto = parse_ignore(ignore)
        publish = {} if ignore_bind else dict(self.publish)
        publish.update(((m.proto, m.container_port), m) for m in mappings)
        return Settings(self.networks + compile_networks(networks), self.auto or auto, publish, frozenset(in_use),
                        self.swap_guard, self.udp_guard)


def settings_json(ignore, publish, in_use, ignore_bind):
    """A container's own settings as they travel (Settings.with_container reads them): its
    ignore values, the PortMappings it publishes, the (proto, container port) keys whose
    host side another publishes, and nerdctl's ignore_bind."""
    return {"ignore": ignore, "publish": [mapping_to_json(m) for m in publish],
            "in_use": [list(key) for key in in_use], "ignore_bind": ignore_bind}


def mapping_to_json(mapping):
    return [mapping.proto, None if mapping.host_ip is None else str(mapping.host_ip), mapping.host_port,
            mapping.container_port]


def mapping_from_json(values):
    proto, host_ip, host_port, container_port = values
    return PortMapping(None if host_ip is None else ipaddress.ip_address(host_ip), host_port, container_port, proto)


def parse_proc_route(text):
    """/proc/PID/net/route -> on-link IPv4 networks (gateway 0, not the default route)."""
    nets = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        dest, gateway, mask = (int(fields[i], 16) for i in (1, 2, 7))
        if gateway == 0 and mask != 0:
            addr = ipaddress.IPv4Address(dest.to_bytes(4, "little"))
            netmask = ipaddress.IPv4Address(mask.to_bytes(4, "little"))
            nets.append(ipaddress.IPv4Network("%s/%s" % (addr, netmask), strict=False))
    return nets


def auto_ignored(subnets, addresses, is_host_address):
    """`--ignore auto`: the networks that stay in a container, from its on-link `subnets` and its
    own `addresses`.  A subnet private to the container (slirp4netns' 10.0.2.0/24, a podman
    bridge's) stays whole.  Where the container's address in a subnet is a copy of one of the
    host's (`is_host_address(packed)`: pasta copies the host's addresses and routes), the subnet
    is the host's own network, whose peers are bypassed: only the container's own addresses
    there stay, since inside the container they mean the container itself."""
    ignored = []
    for subnet in dict.fromkeys(subnets):
        own = [address for address in addresses if address in subnet]
        copies = [address for address in own if is_host_address(address.packed)]
        if copies:
            ignored.extend(ipaddress.ip_network(address) for address in own)
        else:
            ignored.append(subnet)
    return ignored


def if_inet6_entries(text):
    """/proc/PID/net/if_inet6 -> (address, prefix length) of the interfaces' global addresses."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[5] == "lo":
            continue
        addr = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        if not (addr.is_link_local or addr.is_loopback):
            yield addr, int(fields[2], 16)


def parse_proc_if_inet6(text):
    """/proc/PID/net/if_inet6 -> the IPv6 networks of the interfaces' global addresses."""
    return [ipaddress.IPv6Network("%s/%d" % entry, strict=False) for entry in if_inet6_entries(text)]


def parse_fib_trie_addresses(text):
    """/proc/PID/net/fib_trie -> the namespace's own IPv4 addresses (its /32 LOCAL entries),
    loopback left out."""
    addresses, last = set(), None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|-- "):
            last = line[4:]
        elif line.startswith("/32 host LOCAL") and last is not None:
            address = ipaddress.IPv4Address(last)
            if not address.is_loopback:
                addresses.add(address)
    return sorted(addresses)


def parse_if_inet6_addresses(text):
    """/proc/PID/net/if_inet6 -> the namespace's own global IPv6 addresses."""
    return sorted({addr for addr, _prefix in if_inet6_entries(text)})


# --multinode: the Go tool's etcd keys, "<prefix><container address>:<container port>",
# each valued "<host address>:<host port>" (IPv6 addresses in brackets, both ways).
MULTINODE_PREFIX = "bypass4netns/multinode/"


def format_host_port(ip, port):
    return ("[%s]:%d" if ip.version == 6 else "%s:%d") % (ip, port)


def parse_host_port(text):
    """"198.18.0.1:80" or "[2001:db8::1]:80" -> (address, port), or None."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host), int(port)
    except ValueError:
        return None


def multinode_routes(entries, own_host):
    """etcd's (key, value) pairs -> [version, address, port, host IP, host port] of the
    containers other nodes publish.  A value naming a loopback, unspecified, multicast or
    link-local address, or this node's own (`own_host`: its containers are its own daemon's),
    is left out: a registration can only lead to another node's published port."""
    rows = []
    for key, value in entries:
        if not key.startswith(MULTINODE_PREFIX):
            continue
        container, host = parse_host_port(key[len(MULTINODE_PREFIX):]), parse_host_port(value)
        if container is None or host is None:
            continue
        host_ip = host[0]
        if (host_ip == own_host or host_ip.is_loopback or host_ip.is_unspecified or host_ip.is_multicast
                or host_ip.is_link_local or getattr(host_ip, "ipv4_mapped", None)):
            continue
        rows.append([container[0].version, int(container[0]), container[1], str(host_ip), host[1]])
    return rows


_NLMSGHDR = struct.Struct("=IHHII")        # nlmsghdr: length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")        # ifaddrmsg: family, prefix length, flags, scope, ifindex
_RTATTR = struct.Struct("=HH")              # rtattr: length, type


def parse_ifaddr_dump(data):
    """RTM_NEWADDR messages of an rtnetlink dump -> ([(packed address, ifindex)], whether it ended)."""
    entries, offset = [], 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind = _NLMSGHDR.unpack_from(data, offset)[:2]
        if length < _NLMSGHDR.size:
            break
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            return entries, True
        if kind == RTM_NEWADDR:
            index = _IFADDRMSG.unpack_from(data, offset + _NLMSGHDR.size)[4]
            attrs, at = {}, offset + _NLMSGHDR.size + _IFADDRMSG.size
            while at + _RTATTR.size <= offset + length:
                size, name = _RTATTR.unpack_from(data, at)
                if size < _RTATTR.size:
                    break
                attrs[name] = bytes(data[at + _RTATTR.size:at + size])
                at += (size + 3) & ~3
            address = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)  # IPv4's own address is IFA_LOCAL
            if address is not None and len(address) in (4, 16):
                entries.append((address, index))
        offset += (length + 3) & ~3
    return entries, False


def is_loopback_address(packed):
    return packed[0] == 127 if len(packed) == 4 else packed == _IPV6_LOOPBACK


_IPV6_LOOPBACK = bytes(15) + b"\1"


def parse_fdinfo_flags(info):
    """The `flags:` line of a /proc fdinfo text: the file's flags plus O_CLOEXEC of the fd."""
    start = info.find(b"flags:")
    if start < 0:
        raise OSError(errno.EINVAL, "no flags in fdinfo")
    return int(info[start + 6:info.index(b"\n", start)], 8)


# /proc/TID/status's umask, effective uid and gid, and groups, as bytes (one search, no decoding).
_STATUS_IDS = re.compile(rb"\nUmask:\t([0-7]+)\n.*?\nUid:\t\d+\t(\d+)\t.*?\nGid:\t\d+\t(\d+)\t.*?\nGroups:\t?([\d ]*)\n"
                         rb".*?\nCapEff:\t([0-9a-f]+)\n", re.S)


def status_id_fields(data):
    """/proc/TID/status (bytes) -> its raw (umask, euid, egid, groups, effective capabilities)
    fields: a cache key."""
    found = _STATUS_IDS.search(data)
    if found is None:
        raise OSError(errno.EINVAL, "no ids in /proc/TID/status")
    return found.groups()


def parse_status_ids(fields):
    """status_id_fields() -> (effective uid, effective gid, groups, umask, effective capabilities
    as a bit mask), ids as the reader's user namespace sees them."""
    umask, euid, egid, groups, caps = fields
    return int(euid), int(egid), tuple(int(g) for g in groups.split()), int(umask, 8), int(caps, 16)


def parse_id_map(text):
    """/proc/PID/uid_map or gid_map -> ((first id inside, first id outside, count), ...)."""
    return tuple(tuple(int(v) for v in line.split()) for line in text.splitlines() if line.strip())


def map_into(id_map, outside):
    """The id inside a user namespace of an id of the reader's, by the namespace's map; None if unmapped."""
    for inside, first, count in id_map:
        if first <= outside < first + count:
            return inside + outside - first
    return None


COUNTERS = ("bypassed", "container", "published", "refused", "errors", "out_of_fds",
            "notifications")
(COUNT_BYPASSED,            # connects switched to a host socket
 COUNT_CONTAINER,           # connects left to the container's network
 COUNT_PUBLISHED,           # binds of a published port done on the host
 COUNT_REFUSED,             # calls failed by policy (a host socket to a forbidden place)
 COUNT_ERRORS,              # handlers that failed (a bug, logged)
 COUNT_OUT_OF_FDS,          # calls failed (ENOBUFS) or left to the container: the daemon had no fd left
 COUNT_NOTIFICATIONS) = range(len(COUNTERS))


def format_counters(values):
    return " ".join("%s=%d" % item for item in zip(COUNTERS, values))


# ---------------------------------------------------------------------------
# One notification: the Call, and the Switcher with its parts (a worker's hot path)
# ---------------------------------------------------------------------------

_BYPASSABLE = {(socket.SOCK_STREAM, socket.IPPROTO_TCP), (socket.SOCK_DGRAM, socket.IPPROTO_UDP),
               (socket.SOCK_STREAM, 262)}  # 262: IPPROTO_MPTCP

# Options carried to the host socket when they differ from a fresh socket's:
# (level, name, buffer length or 0 for an int, which protocols).
_TCP, _UDP, _ANY = "tcp", "udp", "any"
_SOL, _IP, _IP6, _TCPL, _UDPL = (socket.SOL_SOCKET, socket.IPPROTO_IP, socket.IPPROTO_IPV6,
                                 socket.IPPROTO_TCP, socket.IPPROTO_UDP)
CARRIED_OPTIONS = (
    (_SOL, socket.SO_REUSEADDR, 0, _ANY), (_SOL, socket.SO_REUSEPORT, 0, _ANY),
    (_SOL, socket.SO_KEEPALIVE, 0, _ANY), (_SOL, socket.SO_RCVTIMEO, 16, _ANY),
    (_SOL, socket.SO_SNDTIMEO, 16, _ANY), (_SOL, socket.SO_RCVBUF, 0, _ANY),
    (_SOL, socket.SO_SNDBUF, 0, _ANY), (_SOL, socket.SO_LINGER, 8, _ANY),
    (_SOL, socket.SO_BROADCAST, 0, _ANY), (_SOL, socket.SO_PRIORITY, 0, _ANY),
    (_SOL, socket.SO_OOBINLINE, 0, _ANY), (_SOL, 18, 0, _ANY),            # SO_RCVLOWAT
    (_SOL, 29, 0, _ANY),                                                  # SO_TIMESTAMP
    (_SOL, socket.SO_BINDTODEVICE, 16, _ANY),   # set (or SO_BINDTOIFINDEX): stays (carry_options)
    (_TCPL, socket.TCP_NODELAY, 0, _TCP), (_TCPL, socket.TCP_MAXSEG, 0, _TCP),
    (_TCPL, socket.TCP_CORK, 0, _TCP), (_TCPL, socket.TCP_KEEPIDLE, 0, _TCP),
    (_TCPL, socket.TCP_KEEPINTVL, 0, _TCP), (_TCPL, socket.TCP_KEEPCNT, 0, _TCP),
    (_TCPL, socket.TCP_SYNCNT, 0, _TCP), (_TCPL, socket.TCP_LINGER2, 0, _TCP),
    (_TCPL, socket.TCP_WINDOW_CLAMP, 0, _TCP), (_TCPL, socket.TCP_CONGESTION, 16, _TCP),
    (_TCPL, 18, 0, _TCP),                                                 # TCP_USER_TIMEOUT
    (_TCPL, 25, 0, _TCP),                                                 # TCP_NOTSENT_LOWAT
    (_TCPL, 30, 0, _TCP),                                                 # TCP_FASTOPEN_CONNECT
    (_UDPL, 1, 0, _UDP), (_UDPL, 103, 0, _UDP), (_UDPL, 104, 0, _UDP),   # UDP_CORK, _SEGMENT, _GRO
    (_IP, socket.IP_TOS, 0, _ANY), (_IP, socket.IP_TTL, 0, _ANY),
    (_IP, 24, 0, _ANY),                                                   # IP_BIND_ADDRESS_NO_PORT
    (_IP, 10, 0, _ANY), (_IP, 11, 0, _ANY),                               # IP_MTU_DISCOVER, IP_RECVERR
    (_IP, 8, 0, _UDP), (_IP, 13, 0, _UDP), (_IP, 12, 0, _UDP),            # IP_PKTINFO, _RECVTOS, _RECVTTL
)
CARRIED_OPTIONS_V6 = (
    (_IP6, socket.IPV6_V6ONLY, 0, _ANY), (_IP6, 67, 0, _ANY),             # IPV6_TCLASS
    (_IP6, socket.IPV6_UNICAST_HOPS, 0, _ANY), (_IP6, 23, 0, _ANY),       # IPV6_MTU_DISCOVER
    (_IP6, 25, 0, _ANY), (_IP6, 49, 0, _UDP), (_IP6, 66, 0, _UDP),        # _RECVERR, _RECVPKTINFO, _RECVTCLASS
)


class Template:
    """What a fresh host socket of one (family, type, proto) looks like.

    Only what differs from it is carried over, so that the host socket keeps
    the kernel's own defaults (buffer autotuning above all).  A buffer size
    set to exactly the default value is indistinguishable and not carried.
    The common case, nothing set, costs one getsockopt per option and one
    list comparison: no kernel call tells that no option was set.
    """

    __slots__ = ("int_options", "int_defaults", "buffer_options", "buffer_defaults", "int_columns",
                 "buffer_columns")

    def __init__(self, family, kind, proto):
        tag = _TCP if kind == socket.SOCK_STREAM else _UDP
        table = CARRIED_OPTIONS + (CARRIED_OPTIONS_V6 if family == socket.AF_INET6 else ())
        self.int_options, self.int_defaults = [], []
        self.buffer_options, self.buffer_defaults = [], []
        with socket.socket(family, kind, proto) as fresh:
            for level, name, size, which in table:
                if which not in (_ANY, tag):
                    continue
                try:
                    default = fresh.getsockopt(level, name, size) if size else fresh.getsockopt(level, name)
                except OSError:
                    continue
                if size:
                    self.buffer_options.append((level, name, size))
                    self.buffer_defaults.append(default)
                else:
                    self.int_options.append((level, name))
                    self.int_defaults.append(default)
        # The same, as columns for map(): the reads then loop in C, not in bytecode.
        self.int_columns = tuple(zip(*self.int_options)) or ((), ())
        self.buffer_columns = tuple(zip(*self.buffer_options)) or ((), (), ())

    def differences(self, sock):
        """[(level, name, value)] where `sock` differs from a fresh socket."""
        ints = list(map(sock.getsockopt, *self.int_columns))
        buffers = list(map(sock.getsockopt, *self.buffer_columns))
        if ints == self.int_defaults and buffers == self.buffer_defaults:
            return []
        diffs = []
        for (level, name), value, default in zip(self.int_options, ints, self.int_defaults):
            if value != default:
                if level == _SOL and name in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    value //= 2  # the kernel doubles what it is given
                diffs.append((level, name, value))
        for (level, name, _size), value, default in zip(self.buffer_options, buffers, self.buffer_defaults):
            if value != default:
                diffs.append((level, name, value))
        return diffs


CLOSE_GUARD = 0.002     # seconds the daemon's close of a lingering socket may wait (SIGALRM ends it)


class SharedSocket(socket.SocketType):
    """A socket the daemon holds while a container may hold it too: its duplicate of
    the target's fd, or a host socket once installed there.

    Built on the C socket type, without socket.socket's Python layers (they
    cost microseconds per trapped call: an __init__, three calls per close,
    an enum made at every read of `family`).  Its close never waits: where
    SO_LINGER is on and the daemon's is the last reference (another thread
    of the target closed its fd meanwhile), the kernel's close would wait
    for the peer to acknowledge the end, l_linger seconds or for ever, and
    every container this process serves with it.  A signal ends that wait:
    the close of a lingering socket runs under a CLOSE_GUARD timer where
    SIGALRM has a handler (watch_signals installs one), else on a thread of
    its own (100 us).
    """

    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self.fileno() >= 0:
            try:
                onoff, seconds = _LINGER.unpack(self.getsockopt(_SOL, socket.SO_LINGER, _LINGER.size))
            except OSError:
                onoff = 0
            if onoff and seconds:
                if not callable(signal.getsignal(signal.SIGALRM)):
                    threading.Thread(target=os.close, args=(self.detach(),), daemon=True).start()
                    return
                signal.setitimer(signal.ITIMER_REAL, CLOSE_GUARD)
                try:
                    super().close()
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                return
        super().close()

    def close_unconnected(self):
        """Close a socket that never got a connection: its close has nothing to wait for."""
        super().close()


class NotSwitched(Exception):
    """The socket stays in the container; the message says why (debug log)."""


def carry_options(host, diffs):
    """Set a Template's differences on the host socket; NotSwitched where the host refuses one, or
    where the socket is bound to a device of the container's (the host has no such device)."""
    for level, name, value in diffs:
        if level == _SOL and name == socket.SO_BINDTODEVICE:
            raise NotSwitched("bound to a container device")
        try:
            host.setsockopt(level, name, value)
        except OSError as e:
            raise NotSwitched("option %d/%d not settable on the host: %s" % (level, name, e.strerror)) from None


class HostInterfaces:
    """Which host interface holds each host address: where a switched client socket is pinned.

    A socket pinned (SO_BINDTOIFINDEX) to an interface that is not the
    loopback never reaches the host's loopback, whatever it is pointed at
    later: the kernel routes all it sends through that interface.  The
    container cannot unpin it: changing a socket's device once set takes
    CAP_NET_RAW in the user namespace that owns the host's network
    namespace.  The table comes from rtnetlink (RTM_GETADDR) when first
    needed, again when an address is not in it, and again after the kernel
    announces an address change (the RTMGRP_*_IFADDR groups, watched on
    `events`).
    """

    def __init__(self, events):
        self.table = None           # packed address -> ifindex, None until read (again)
        self.loopback = frozenset()  # the ifindexes holding 127.0.0.0/8 or ::1
        self.changes = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                     socket.NETLINK_ROUTE)
        self.changes.bind((0, NETLINK_ROUTE_GROUPS))
        self.events = events
        events.watch(self.changes.fileno(), select.EPOLLIN, self.on_change)

    def on_change(self, _events):
        try:
            while self.changes.recv(1 << 16):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass  # ENOBUFS: changes were lost, which the re-read covers
        self.table = None

    def read(self):
        table = {}
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as nl:
            nl.send(_NLMSGHDR.pack(_NLMSGHDR.size + _IFADDRMSG.size, RTM_GETADDR, NLM_F_REQUEST_DUMP, 1, 0)
                    + bytes(_IFADDRMSG.size))
            done = False
            while not done:
                entries, done = parse_ifaddr_dump(nl.recv(1 << 16))
                table.update(entries)
        self.table = table
        self.loopback = frozenset(index for address, index in table.items() if is_loopback_address(address))

    def index_of(self, packed):
        """The interface to pin a socket whose source address is `packed` to; None if that
        address is on the loopback or not the host's."""
        if self.table is None or packed not in self.table:
            self.read()
        index = self.table.get(packed)
        return None if index in self.loopback else index

    def is_host_address(self, packed):
        if self.table is None:
            self.read()
        return packed in self.table

    def on_loopback(self, packed):
        """Whether `packed` is an address of the host's loopback interface (127.0.0.1 is, and
        so is any address added to `lo`)."""
        if self.table is None:
            self.read()
        return is_loopback_address(packed) or self.table.get(packed) in self.loopback

    def close(self):
        self.events.unwatch(self.changes.fileno())
        self.changes.close()


class ThreadHandle:
    """What the daemon keeps open for one thread of a container while it lives.

    Its pidfd, and per fd number it connected on, an open /proc fdinfo file:
    a live view (each pread shows whatever that number holds now), so one
    pread tells O_NONBLOCK and close-on-exec where an open+read+close took
    five times as long.
    """

    __slots__ = ("tid", "pidfd", "fdinfo", "status", "namespaces")
    FDINFO_FILES = 8        # per thread, the most recently used fd numbers

    def __init__(self, tid, pidfd):
        self.tid, self.pidfd, self.fdinfo = tid, pidfd, {}
        self.status = None      # for a NamespaceHelper: /proc/TID/status, open (a live view too)
        # and namespace_inodes(tid), as first seen: a thread that joins other
        # namespaces after its first call on a unix socket keeps its helper.
        self.namespaces = None

    def ids(self):
        """status_id_fields() of the thread's status now."""
        if self.status is None:
            self.status = os.open("/proc/%d/status" % self.tid, os.O_RDONLY | os.O_CLOEXEC)
        return status_id_fields(os.pread(self.status, 4096, 0))

    def namespace_inodes(self):
        if self.namespaces is None:
            self.namespaces = namespace_inodes(self.tid)
        return self.namespaces

    def fd_flags(self, fd):
        info_fd = self.fdinfo.get(fd)
        if info_fd is None:
            info_fd = os.open("/proc/%d/fdinfo/%d" % (self.tid, fd), os.O_RDONLY | os.O_CLOEXEC)
            if len(self.fdinfo) >= self.FDINFO_FILES:
                os.close(self.fdinfo.pop(next(iter(self.fdinfo))))
            self.fdinfo[fd] = info_fd
        return parse_fdinfo_flags(os.pread(info_fd, 256, 0))

    def close(self):
        os.close(self.pidfd)
        for info_fd in self.fdinfo.values():
            os.close(info_fd)
        self.fdinfo.clear()
        if self.status is not None:
            os.close(self.status)
            self.status = None


class AnswerError(RuntimeError):
    """A handler broke the one-answer contract: a bug, logged, never a second reply."""


class Call:
    """One notification: who asks what, what the daemon holds for it, and its one answer.

    A call gets exactly one answer (a value, an error or CONTINUE), or none
    when the target stopped waiting; a PendingConnect, a NamespaceHelper or
    a PeerProbe answers it later.  A call whose pointers were followed never
    continues: the kernel would reread memory that another thread may have
    changed since the check.

    `sock` is the daemon's duplicate of the target's socket while the call
    holds it (Switcher.target_socket).  The call closes it just before its
    answer, so that the target's own close() is always the last one (and
    closes a connection itself, as natively); whoever answers later takes it
    with hand_over().
    """

    __slots__ = ("filter", "notify_fd", "container", "id", "tid", "args", "fd", "ptr", "answered", "deferred",
                 "read_memory", "args_in_memory", "installed", "retried", "sock")

    def __init__(self, seccomp_filter, notif_id, tid, args):
        self.filter, self.notify_fd, self.container = seccomp_filter, seccomp_filter.notify_fd, seccomp_filter.container
        self.id, self.tid = notif_id, tid
        self.set_args(args)
        self.ptr = 8
        self.answered = self.deferred = False
        self.read_memory = False     # a pointer of the target's was followed
        self.args_in_memory = False  # i386 socketcall: the kernel reads the arguments again
        self.installed = False       # a host socket is at the target's fd
        self.retried = False         # a dead process had it under way (Server.handle_anew)
        self.sock = None             # SharedSocket: the daemon's duplicate of the target's socket

    def set_args(self, args):
        """The syscall's six arguments; `fd`, the first as the int the target passed, with them."""
        self.args = args
        fd = args[0] & 0xFFFFFFFF
        self.fd = fd - (1 << 32) if fd & 0x80000000 else fd

    def hand_over(self):
        """The call's socket, now the caller's to close (it answers the call, or has it answered)."""
        sock, self.sock = self.sock, None
        return sock

    def _answer(self, val, error, flags):
        if self.answered:
            raise AnswerError("notification %#x answered twice" % self.id)
        self.answered = True
        if self.sock is not None:
            self.hand_over().close()
        notif_send(self.notify_fd, self.id, val, error, flags)

    def reply(self, val=0):
        self._answer(val, 0, 0)

    def fail(self, err):
        """Fail the call with errno `err` (positive)."""
        self._answer(0, -err, 0)

    def result(self, result):
        """Answer with a sock_call result: >= 0 is the value, < 0 an -errno."""
        if result < 0:
            self._answer(0, result, 0)
        else:
            self._answer(result, 0, 0)

    def let_run(self):
        """CONTINUE: the kernel runs the call as the target made it."""
        if self.read_memory:
            raise AnswerError("CONTINUE asked after reading the target's memory")
        self._answer(0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    def still_valid(self):
        """Whether the target still waits (checked after reading its memory: what was read was its own).

        When it does not, nobody waits for an answer: the call counts as answered.
        """
        if notif_id_valid(self.notify_fd, self.id):
            return True
        self.abandon()
        return False

    def abandon(self):
        """The target stopped waiting (interrupted, or gone): there is nobody to answer."""
        self.answered = True
        if self.sock is not None:
            self.hand_over().close()


class TargetAccess:
    """What the daemon reads of a call's target: its thread (a pidfd, kept while the thread
    lives), its fds and their flags, its memory.

    `events` is the loop's Events, where kept threads' pidfds are watched.
    """

    THREADS_KEPT = 1024     # ThreadHandles at most, each 2 + up to FDINFO_FILES fds...
    FD_SHARE = 16           # ...and at most 1/16 of the fd limit's worth of them

    def __init__(self, events):
        self.events = events
        self.threads = {}           # tid -> ThreadHandle, while the thread lives (the oldest evicted)
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.threads_kept = min(self.THREADS_KEPT, max(16, fd_limit // self.FD_SHARE))
        self.pidfd_flags = PIDFD_THREAD
        self.memory = MemoryReader()

    def fd(self, tid, fd):
        """pidfd_getfd of the target's `fd`, through the thread's kept pidfd if any."""
        thread = self.threads.get(tid)
        if thread is not None:
            try:
                return pidfd_getfd(thread.pidfd, fd)
            except ProcessLookupError:
                self.forget_thread(tid)  # that thread exited; `tid` is another one's now
        thread = self.open_thread(tid)
        try:
            return pidfd_getfd(thread.pidfd, fd)
        finally:
            if tid not in self.threads:
                thread.close()

    def open_thread(self, tid):
        """A ThreadHandle for `tid`, kept until the thread exits where the kernel allows."""
        if self.pidfd_flags:
            try:
                pidfd = os.pidfd_open(tid, self.pidfd_flags)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.pidfd_flags = 0  # kernel < 6.9: no thread pidfds
            else:
                if len(self.threads) >= self.threads_kept:
                    self.forget_thread(next(iter(self.threads)))  # the longest kept
                thread = self.threads[tid] = ThreadHandle(tid, pidfd)
                self.events.watch(pidfd, select.EPOLLIN, lambda _events: self.forget_thread(tid))
                return thread
        try:
            return ThreadHandle(tid, os.pidfd_open(tid))  # only a thread-group leader has one
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        return ThreadHandle(tid, os.pidfd_open(thread_group_id(tid)))

    def forget_thread(self, tid):
        thread = self.threads.pop(tid, None)
        if thread is not None:
            self.events.unwatch(thread.pidfd)
            thread.close()

    def fd_flags(self, call):
        """The file flags of the target's fd, O_CLOEXEC included (only /proc tells that one)."""
        thread = self.threads.get(call.tid)
        if thread is not None:
            return thread.fd_flags(call.fd)
        with open("/proc/%d/fdinfo/%d" % (call.tid, call.fd), "rb") as f:
            return parse_fdinfo_flags(f.read())

    def namespaces(self, tid):
        """The inodes of thread `tid`'s NAMESPACES."""
        thread = self.threads.get(tid)
        return namespace_inodes(tid) if thread is None else thread.namespace_inodes()

    def read(self, call, address, length):
        """`length` bytes of the target's memory at `address`; from now on the call never continues."""
        call.read_memory = True
        return self.memory.read(call.tid, address, length)

    def read_sockaddr(self, call, addr_arg, len_arg):
        """The sockaddr the call names, or None once the call is failed (EINVAL, EFAULT)."""
        length = call.args[len_arg] & 0xFFFFFFFF
        if length > MAX_SOCKADDR:
            call.fail(errno.EINVAL)
            return None
        try:
            return self.read(call, call.args[addr_arg], length)
        except OSError as e:
            call.fail(e.errno or errno.EFAULT)
            return None

    def close(self):
        for tid in list(self.threads):
            self.forget_thread(tid)


class HostSockets:
    """Sockets in the host's network namespace for the containers: made like a container's
    socket (its options carried where they differ from a fresh one's: Template), pinned to
    the interface of their source address (HostInterfaces), installed at the target's fd."""

    def __init__(self, events):
        self.interfaces = HostInterfaces(events)  # where switched client sockets are pinned
        self.templates = {}         # (family, type, proto) -> Template
        self.own_netns = own_netns_id()
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:  # the host's: this netns's
            low, high = map(int, f.read().split())
        self.ephemeral = range(low, high + 1)  # ports a bound container socket may take on the host

    def is_host_socket(self, sock):
        """Whether `sock` lives in the daemon's (the host's) network namespace: switched already."""
        return in_netns(sock, self.own_netns)

    def differences(self, sock, kind, proto):
        """The options of `sock` that differ from a fresh socket's of its kind (Template)."""
        key = (sock.family, kind, proto)
        template = self.templates.get(key)
        if template is None:
            template = self.templates[key] = Template(*key)
        return template.differences(sock)

    def pin(self, host):
        """SO_BINDTOIFINDEX: `host` (connected, or connecting) to the interface that holds the source
        address its connect chose; NotSwitched, the connection aborted, where that is the loopback."""
        source = host.getsockname()[0]
        if host.family == socket.AF_INET:
            packed = socket.inet_pton(socket.AF_INET, source)
        else:
            packed = socket.inet_pton(socket.AF_INET6, source.split("%")[0])
            if packed[:12] == _MAPPED_PREFIX:
                packed = packed[12:]
        index = self.interfaces.index_of(packed)
        if index is None:
            host.setsockopt(_SOL, socket.SO_LINGER, _LINGER.pack(1, 0))  # a reset, not a goodbye
            raise NotSwitched("its host source address %s is on the loopback" % source)
        host.setsockopt(_SOL, SO_BINDTOIFINDEX, index)

    @staticmethod
    def install(call, host, flags):
        """ADDFD: `host` at the target's fd, close-on-exec as that fd was.  False when the target
        is gone (the call is abandoned); NotSwitched when the kernel refuses (the fd is past the
        target's RLIMIT_NOFILE, say): the socket then stays in the container."""
        try:
            if not notif_addfd(call.notify_fd, call.id, host.fileno(), call.fd, flags & O_CLOEXEC):
                call.abandon()
                return False
        except OSError as e:
            raise NotSwitched("ADDFD failed: %s" % e.strerror) from None
        call.installed = True
        return True

    def close(self):
        self.interfaces.close()


class PendingConnect:
    """A blocking connect under way, answered when its handshake ends or SO_SNDTIMEO runs out.

    `sock` is the daemon's own fd of the connecting socket: its host socket,
    or its duplicate of the container's.  Each PendingConnect is its own key:
    a timer or event of one that ended can never match another, whatever fd
    number it reuses.
    """

    __slots__ = ("call", "sock", "raw", "host_socket", "timer", "slot")

    def __init__(self, call, sock, raw, host_socket):
        self.call, self.sock, self.raw = call, sock, raw
        self.host_socket = host_socket  # the daemon's own host socket, not a container's
        self.timer = None
        self.slot = 0                   # its Inflight slot (0: none)


class PendingConnects:
    """The blocking connects under way (PendingConnect), each answered when it ends, never
    blocking the loop; each has a pending slot in the Inflight row meanwhile."""

    def __init__(self, events, inflight):
        self.events, self.inflight = events, inflight
        self.pending = set()

    def __bool__(self):
        return bool(self.pending)

    def wait(self, call, sock, raw, host_socket):
        """Answer the blocking connect under way on `sock` (taken over) when it ends."""
        seconds, micros = _TIMEVAL.unpack(sock.getsockopt(_SOL, socket.SO_SNDTIMEO, 16))
        pending = PendingConnect(call, sock, raw, host_socket)
        pending.slot = self.inflight.add_pending(call.filter.key, call.id)
        call.deferred = True
        self.pending.add(pending)
        self.events.watch(sock.fileno(), select.EPOLLOUT | select.EPOLLONESHOT,
                          lambda _events: self.finish(pending))
        if seconds or micros:
            pending.timer = self.events.call_at(time.monotonic() + seconds + micros / 1e6,
                                                lambda: self.finish(pending, timed_out=True))

    def finish(self, pending, timed_out=False):
        """The handshake ended (or SO_SNDTIMEO ran out): answer as the kernel's blocking connect would."""
        if pending not in self.pending:
            return
        sock = self.forget(pending)
        with sock:
            fd = sock.fileno()
            if timed_out:
                result = -errno.EINPROGRESS  # as natively: the connect goes on
            else:
                result = self.outcome(sock, pending.raw)
            if pending.host_socket:
                os.set_blocking(fd, True)  # the target's flags from now on: its connect blocks
        pending.call.result(result)

    @staticmethod
    def outcome(sock, raw):
        """How a blocking connect on `sock`, whose handshake is over, ends: its error, or 0.

        Connecting once more would end it as a blocking connect does (0 and
        connected, or the error), but another of the container's threads may
        have made the socket new again meanwhile (shutdown() under way does,
        untrapped), and a connect would then start another handshake that the
        container never asked for.  So only a connected socket is connected
        once more (so that a later connect gets EISCONN), under the guard.
        """
        error = sock.getsockopt(_SOL, socket.SO_ERROR)
        if error:
            return -error
        try:
            sock.getpeername()
        except OSError:
            return -errno.ECONNABORTED  # disconnected under way: the kernel's answer then
        result = guarded_connect(sock.fileno(), raw)
        return -errno.ECONNABORTED if result == -errno.EINTR else result

    def forget(self, pending):
        """Stop waiting for `pending`; returns its socket, now the caller's to close."""
        self.pending.discard(pending)
        self.inflight.end_pending(pending.slot)
        self.events.unwatch(pending.sock.fileno())
        if pending.timer is not None:
            pending.timer.cancel()
        return pending.sock

    def sweep(self):
        """Forget blocking connects whose caller was interrupted: the connect goes on, as natively."""
        for pending in list(self.pending):
            if not notif_id_valid(pending.call.notify_fd, pending.call.id):
                self.forget(pending).close()

    def forget_notify_fd(self, notify_fd):
        """Forget the pending connects of a filter whose processes all exited."""
        for pending in [p for p in self.pending if p.call.notify_fd == notify_fd]:
            self.forget(pending).close()

    def close(self):
        for pending in list(self.pending):
            self.forget(pending).close()
            # As a signal would: the connection goes on (POSIX), no thread waits for this process.
            pending.call.fail(errno.EINTR)


class NamespaceHelpers:
    """The NamespaceHelpers this process starts: one per container and set of namespaces of
    its callers (kept in Container.helpers), and the peers' stand-ins (PeerRoutes).  Each
    helper's replies come through `events`; the calls it had not answered when it ends fail
    (their Inflight slots in `inflight`)."""

    HELPERS_PER_CONTAINER = 16   # sets of namespaces per container with a helper; beyond: EAGAIN

    def __init__(self, events, inflight):
        self.events, self.inflight = events, inflight
        self.own_namespaces = namespace_inodes("self")

    def for_call(self, call, namespaces):
        """The container's helper in the calling thread's `namespaces` (inodes), started if need be."""
        container = call.container
        helper = container.helpers.get(namespaces)
        if helper is None:
            if namespaces in container.helpers_failed:
                raise OSError(errno.EIO, "no helper can join these namespaces")
            if len(container.helpers) + len(container.helpers_failed) >= self.HELPERS_PER_CONTAINER:
                # Each is a process in the daemon's cgroup, not the container's (and each
                # that fails is a fork and a logged error): a container that makes
                # namespaces in a loop must not fill the host, nor its log.
                raise OSError(errno.EAGAIN, "too many sets of namespaces")
            try:
                helper = container.helpers[namespaces] = self.start(
                    call.tid, container.short_id, lambda: self.end(container, namespaces, errno.EIO), namespaces)
            except OSError:
                container.helpers_failed.add(namespaces)
                raise
        return helper

    def start(self, tid, short_id, on_end, key=None):
        """A NamespaceHelper in thread `tid`'s namespaces (their inodes: `key`, if known);
        on_end() when it is found gone."""
        key = key or namespace_inodes(tid)
        joins = [(name, nstype) for (name, nstype), inode, own in zip(NAMESPACES, key, self.own_namespaces)
                 if inode != own]
        helper = NamespaceHelper.start(tid, joins, self.inflight.cells)
        self.events.watch(helper.channel.fileno(), select.EPOLLIN,
                          lambda _events: self.on_reply(helper, short_id, on_end))
        log.info("container %s: namespace helper pid %d", short_id, helper.pid)
        return helper

    def on_reply(self, helper, short_id, on_end):
        """The answer to the oldest ask() sent to `helper`, or its end."""
        try:
            reply = helper.channel.recv(NamespaceHelper.REPLY.size)
        except BlockingIOError:
            return
        except OSError:
            reply = b""
        if len(reply) != NamespaceHelper.REPLY.size or not helper.asked:
            log.error("container %s: namespace helper pid %d is gone", short_id, helper.pid)
            on_end()
            return
        helper.asked.popleft()(NamespaceHelper.REPLY.unpack(reply)[0])

    def end(self, container, key, error):
        """Stop a container's helper (ours: by its pid), failing the calls it had not answered
        with `error`."""
        self.stop(container.helpers.pop(key), error)

    def stop(self, helper, error):
        self.events.unwatch(helper.channel.fileno())
        helper.stop(self.inflight, error)

    def end_all(self, container, error=errno.EIO):
        for key in list(container.helpers):
            self.end(container, key, error)


# Another served container's published port (--handle-c2c-connections): its host side
# (host_ip None: the host's loopback), and whose it is (a process of it: pid).
PeerRoute = collections.namedtuple("PeerRoute", "host_ip host_port cid pid")


class PeerRoutes:
    """Where a connect may go other than its destination: --handle-c2c-connections' served
    containers' published ports (PeerRoute), --multinode's other nodes' ((host IP, host
    port)), both keyed (version, address, port); and the NamespaceHelpers that stand in for
    peers during the policy check (PeerProbe).

    `helpers` is the Switcher's NamespaceHelpers.
    """

    def __init__(self, helpers):
        self.namespace_helpers = helpers
        self.peers = {}             # (version, address, port) -> PeerRoute
        self.nodes = {}             # (version, address, port) -> (host IP, host port)
        self.probe = True           # a peer is reached only where the caller's own network reaches it
        self.helpers = {}           # peer container id -> its NamespaceHelper, for stand-ins

    def __bool__(self):
        return bool(self.peers or self.nodes)

    def set(self, rows, probe, nodes):
        """The daemon's Routes.peer_rows(), whether a peer is probed for first, and the other
        nodes' multinode_routes() rows."""
        self.nodes = {(version, address, port): (ipaddress.ip_address(host_ip), host_port)
                      for version, address, port, host_ip, host_port in nodes}
        self.peers = {(version, address, port): PeerRoute(None if host_ip is None else ipaddress.ip_address(host_ip),
                                                          host_port, cid, pid)
                      for version, address, port, host_ip, host_port, cid, pid in rows}
        self.probe = probe
        for cid in set(self.helpers) - {peer.cid for peer in self.peers.values()}:
            self.end_helper(cid)

    def helper(self, peer):
        """A NamespaceHelper in the namespaces of `peer`'s container."""
        helper = self.helpers.get(peer.cid)
        if helper is None:
            helper = self.helpers[peer.cid] = self.namespace_helpers.start(peer.pid, peer.cid[:12],
                                                                           lambda: self.end_helper(peer.cid))
        return helper

    def end_helper(self, cid):
        self.namespace_helpers.stop(self.helpers.pop(cid), errno.EIO)

    def close(self):
        for cid in list(self.helpers):
            self.end_helper(cid)


class PeerProbe:
    """A connect to a peer (--handle-c2c-connections) waiting for the policy check: the peer's
    NamespaceHelper listens at the peer's address and port in the peer's network (a stand-in:
    the peer's own server listens on the host), then the caller's connects there from the
    caller's network.  The call keeps its socket till it is answered, and has a pending slot
    in the Inflight row meanwhile; `done(reachable)` goes on with it, if it is still valid.
    """

    __slots__ = ("call", "raw", "dest", "inflight", "done", "stand_in", "prober", "slot")

    def __init__(self, call, raw, dest, inflight, done):
        self.call, self.raw, self.dest, self.inflight, self.done = call, raw, dest, inflight, done
        self.stand_in = self.prober = None
        self.slot = 0

    def start(self, stand_in, prober):
        """stand_in(), prober(): the peer's and the caller's NamespaceHelper (OSError: none)."""
        call = self.call
        self.slot = self.inflight.add_pending(call.filter.key, call.id)
        call.deferred = True
        self.prober = prober
        try:
            self.stand_in = stand_in()
            self.stand_in.ask(NamespaceHelper.STAND_IN, self.raw, self.stood_in)
        except OSError as e:
            self.give_up(e)

    def stood_in(self, result):
        # EADDRINUSE: the peer listens there itself, in its network.
        if result not in (0, -errno.EADDRINUSE):
            self.give_up("no stand-in: %s" % os.strerror(-result))
            return
        try:
            self.prober().ask(NamespaceHelper.PROBE, self.raw, self.probed)
        except OSError as e:
            self.give_up(e)

    def probed(self, result):
        self.call.container.remember_probe(self.dest, result == 0)
        try:
            self.stand_in.ask(NamespaceHelper.END_STAND_IN, self.raw, lambda _result: None)
        except OSError:
            pass
        self.answer(result == 0)

    def give_up(self, why):
        log.error("container %s: cannot probe %s: %s", self.call.container.short_id,
                  format_destination(self.dest), why)
        self.answer(False)

    def answer(self, reachable):
        self.inflight.end_pending(self.slot)
        if self.call.still_valid():
            self.done(reachable)


class Switcher:
    """The handlers of the trapped syscalls, one per syscall, and the parts they share: the
    target (TargetAccess), host sockets (HostSockets), blocking connects under way
    (PendingConnects), routes to peers and other nodes (PeerRoutes), and the
    NamespaceHelpers it starts.

    `events` is the loop's Events, where the parts watch what they wait for.
    """

    def __init__(self, events, base, ports, inflight, debug=False):
        self.events = events
        self.base = base            # Settings: the daemon's flags, to which a container's add
        self.ports = ports          # Reservations, or a worker's ParentChannel: lend(), end_loan()
        self.debug = debug
        self.inflight = inflight    # Inflight: what the daemon answers for if this process dies
        self.targets = TargetAccess(events)
        self.hosts = HostSockets(events)
        self.pending = PendingConnects(events, inflight)
        self.helpers = NamespaceHelpers(events, inflight)
        self.routes = PeerRoutes(self.helpers)
        self.limit = LogLimit()
        handlers = {name: types.MethodType(handler, self) for name, handler in self.HANDLERS.items()}
        self.dispatch = {}          # (arch, nr) -> (bound handler, pointer size)
        for arch, (numbers, ptr) in SYSCALL_NUMBERS.items():
            for name, nr in numbers.items():
                self.dispatch[(arch, nr)] = (handlers[name], ptr)
        for name, nr in X32_NUMBERS.items():
            self.dispatch[(AUDIT_ARCH_X86_64, nr | X32_SYSCALL_BIT)] = (handlers[name], 4)

    def handle(self, call, arch, nr):
        """Answer one notification, exactly once, whatever happens in its handler."""
        call.container.counters[COUNT_NOTIFICATIONS] += 1
        entry = self.dispatch.get((arch, nr))
        if entry is None:
            if arch == AUDIT_ARCH_I386 and nr == SYS_SOCKETCALL_I386:
                entry = self.socketcall_entry(call)
            else:
                call.let_run()
            if entry is None:
                return
        handler, call.ptr = entry
        try:
            handler(call)
            if not (call.answered or call.deferred):
                raise AnswerError("%s left its notification unanswered" % handler.__name__)
        except Exception as e:
            call.container.counters[COUNT_ERRORS] += 1
            log.exception("container %s: %s(fd %d) failed: %s", call.container.short_id, handler.__name__[3:],
                          call.fd, e)
            if not (call.answered or call.deferred):
                self.fail_safe(call)

    @staticmethod
    def fail_safe(call):
        """The answer to a call whose handler failed: EIO, never CONTINUE (the kernel would look
        the fd number up again, and act on memory read anew)."""
        try:
            call.fail(errno.EIO)
        except OSError as e:
            log.error("container %s: cannot answer: %s", call.container.short_id, e)

    def socketcall_entry(self, call):
        """i386 socketcall(2): its arguments are in the target's memory; read them once.

        Returns the (handler, pointer size) entry with call.args set to the
        copy, or None once the call is answered here.
        """
        name_count = SOCKETCALLS.get(call.args[0] & 0xFFFFFFFF)
        if name_count is None:
            call.let_run()
            return None
        name, count = name_count
        try:
            raw = self.targets.memory.read(call.tid, call.args[1], 4 * count)
        except OSError as e:
            call.fail(e.errno or errno.EFAULT)
            return None
        call.set_args(struct.unpack("=%dI" % count, raw) + (0,) * (6 - count))
        call.args_in_memory = True
        return self.dispatch[(AUDIT_ARCH_I386, SYSCALL_NUMBERS[AUDIT_ARCH_I386][0][name])]

    def let_run(self, call):
        """Let the call run untouched in the container: the decision read nothing from memory.

        An i386 socketcall send is the exception: the kernel would read its
        arguments, fd and flags included, from memory again, where another
        thread may have put MSG_FASTOPEN and a host socket since, even one
        switched after this answer (a published port's, bound and not
        listening yet, unpinned).  It is refused (ENOSYS, as a kernel without
        socketcall answers): glibc makes direct calls on the kernels this
        daemon runs on; only static i386 binaries of an older libc send so.
        """
        if call.args_in_memory:
            container = call.container
            if not container.warned_socketcall:
                container.warned_socketcall = True
                log.warning("container %s: refusing socketcall(2) sends (ENOSYS): the kernel would read "
                            "their flags again", container.short_id)
            call.fail(errno.ENOSYS)
            return
        call.let_run()

    def target_socket(self, call, op):
        """Whether the target's fd is an IP socket, the call then holding the daemon's duplicate
        of it (call.sock).

        Anything else is answered here: an fd that is not open gets EBADF and
        one that is not a socket ENOTSOCK, as from the kernel; a socket of
        another family goes to other_family().  The family comes from the
        getsockname() Python makes anyway to check the fd; the object's type
        and proto are placeholders, so that Python asks the kernel for
        nothing more.
        """
        try:
            dup = self.targets.fd(call.tid, call.fd)
        except OSError as e:
            if e.errno == errno.EBADF:
                call.fail(errno.EBADF)
                return False
            if out_of_fds(e):
                self.note_out_of_fds(call, e)
            # The thread is gone, or the daemon is out of fds: never CONTINUE.
            call.fail(errno.ENOBUFS if out_of_fds(e) else e.errno or errno.EIO)
            return False
        try:
            call.sock = SharedSocket(-1, socket.SOCK_STREAM, 0, dup)
        except OSError as e:  # ENOTSOCK: Python leaves the fd to us
            os.close(dup)
            call.fail(e.errno or errno.ENOTSOCK)
            return False
        if call.sock.family in (socket.AF_INET, socket.AF_INET6):
            return True
        self.other_family(call, op)
        return False

    def other_family(self, call, op):
        """connect, bind or listen on a socket neither IPv4 nor IPv6 (unix, netlink...), which
        stays the container's.

        The kernel cannot run it (CONTINUE): it would look the fd number up
        again, where another thread may have put a host socket since, and the
        call would then run on the host (README: "swapping the fd").  What such
        a call does depends on who makes it and where, so the container's
        NamespaceHelper makes it on our duplicate, as the calling thread.

        One such call the daemon makes itself, since it behaves exactly as the
        helper's would: a netlink socket's bind that joins no multicast group
        (glibc's getaddrinfo makes one per lookup).  It depends on nobody's ids
        (the group check is the only one), and neither the helper nor the
        daemon is in the container's pid namespace, which the kernel's choice
        of a port id would take the caller's pid from.

        With --no-fd-swap-guard, the kernel runs them all (CONTINUE): about
        four times faster here, and the race open again (README: swapping
        the fd).
        """
        if not call.container.settings.swap_guard:
            call.let_run()
            return
        raw = None
        if op == BIND and call.sock.family == socket.AF_NETLINK:
            raw = self.targets.read_sockaddr(call, 1, 2)
            if raw is None or not call.still_valid():
                return
            if len(raw) >= _SOCKADDR_NL.size and _SOCKADDR_NL.unpack_from(raw)[2] == 0:
                call.result(sock_call(_libc.bind, call.sock.fileno(), raw, len(raw)))
                return
        self.delegate(call, op, raw)

    def note_out_of_fds(self, call, error):
        """The daemon could not take an fd: the call fails (ENOBUFS) or stays in the container's
        network, counted, and said once in a while."""
        call.container.counters[COUNT_OUT_OF_FDS] += 1
        self.limit.log(logging.ERROR, "container %s: the daemon is out of file descriptors (%s): a call failed "
                       "with ENOBUFS or stayed in the container's network", call.container.short_id, error.strerror)

    def host_twin(self, call, kind, proto):
        """(the target fd's file flags, a new socket in the host's namespace of call.sock's
        family) for a switch.

        None once the call is failed with EBADF: another thread closed the
        fd, as the kernel would answer.  NotSwitched when the daemon is out
        of fds or the host makes no such socket.
        """
        try:
            flags = self.targets.fd_flags(call)
        except OSError as e:
            if out_of_fds(e):
                self.note_out_of_fds(call, e)
                raise NotSwitched("the daemon is out of file descriptors") from None
            call.fail(errno.EBADF)
            return None
        try:
            return flags, SharedSocket(call.sock.family, kind, proto)
        except OSError as e:
            if out_of_fds(e):
                self.note_out_of_fds(call, e)
            raise NotSwitched("no host socket: %s" % e.strerror) from None

    def judge(self, call, dest):
        """(reason, network) why `dest` stays in the container, or (None, None) to bypass it."""
        if dest is None:
            return NOT_IP, None
        settings = call.container.settings
        return destination_reason(dest, settings.networks,
                                  call.container.auto_networks(call.tid, self.hosts.interfaces.is_host_address)
                                  if settings.auto else ())

    def debug_decision(self, call, what, dest, outcome):
        log.debug(DECISION_FORMAT, call.container.short_id, call.tid, call.fd, what, format_destination(dest),
                  outcome)

    def close(self, containers):
        """End what the parts hold: helpers, connects under way (EINTR), threads, interfaces."""
        for container in containers:
            self.helpers.end_all(container, errno.EINTR)  # first: a probe's call may connect, and wait
        self.routes.close()
        self.pending.close()
        self.targets.close()
        self.hosts.close()

    # -- connect -----------------------------------------------------------

    def on_connect(self, call):
        """Switch the socket to the host and connect it there, or connect it where it is.

        The sockaddr is read once, checked, and used by the daemon's own
        connect: never CONTINUE after reading it.
        """
        if not self.target_socket(call, CONNECT):
            return
        raw = self.targets.read_sockaddr(call, 1, 2)
        if raw is None or not call.still_valid():
            return
        dest = parse_sockaddr(raw)
        routes = self.routes
        if routes.peers or routes.nodes:
            node = routes.nodes.get(dest)
            if node is not None:
                self.reach_host_side(call, raw, dest, node[0], node[1], "another node's published port")
                return
            peer = routes.peers.get(dest)
            if peer is not None and peer.cid != call.container.id:
                self.connect_to_peer(call, raw, dest, peer)
                return
        reason, network = self.judge(call, dest)
        sock = call.sock
        kind = sock.getsockopt(_SOL, socket.SO_TYPE)
        own_service = False
        if reason is LOOPBACK:
            rewritten = self.own_published_service(call.container.settings, sock.family, kind, dest)
            if rewritten is not None:
                raw, dest = rewritten
                reason, own_service = None, True
        if self.hosts.is_host_socket(sock):
            # Switched already: it can only go where the host goes, and
            # only with the address validated here.
            if reason is not None and dest is not None:
                call.container.counters[COUNT_REFUSED] += 1
                if self.debug:
                    self.debug_decision(call, "connect", dest, "refused: switched (%s)"
                                        % describe_reason(reason, network))
                call.fail(errno.ENETUNREACH)
                return
            pinned = sock.getsockopt(_SOL, SO_BINDTOIFINDEX)
            if kind == socket.SOCK_DGRAM and raw[:2] == _AF_UNSPEC and pinned:
                self.disconnect_pinned_udp(call)
                return
            if not pinned and dest is not None and not own_service and \
                    self.hosts.interfaces.on_loopback(packed_address(dest)):
                # An unpinned one (a published port's, or a connection it accepted) would get
                # there: an address added to the host's `lo` is no loopback address to judge().
                call.container.counters[COUNT_REFUSED] += 1
                if self.debug:
                    self.debug_decision(call, "connect", dest, "refused: switched (the host's loopback)")
                call.fail(errno.ENETUNREACH)
                return
            outcome = "switched already"
        elif reason is None:
            outcome = self.bypass_connect(call, kind, raw, dest, own_service)
            if outcome is None:
                return
            call.container.counters[COUNT_CONTAINER] += 1
        else:
            call.container.counters[COUNT_CONTAINER] += 1
            outcome = "container (%s)" % describe_reason(reason, network)
        if self.debug:
            self.debug_decision(call, "connect", dest, outcome)
        self.connect_in_place(call, raw, kind)

    def disconnect_pinned_udp(self, call):
        """connect(AF_UNSPEC) on a switched, pinned UDP socket.

        The kernel's UDP disconnect also drops the socket's device binding
        (__udp_disconnect), and an unpinned host socket, whose sends are not
        trapped, reaches the host's loopback.  So the socket is not
        disconnected: a fresh host socket with its options, pinned to the
        same interface, takes its place at the target's fd, unconnected and
        unbound, as the disconnected one would be (but for a port bound
        before the connect, which it does not keep).  Another fd of the old
        socket keeps it connected.
        """
        old = call.sock
        index = old.getsockopt(_SOL, SO_BINDTOIFINDEX)
        proto = old.getsockopt(_SOL, socket.SO_PROTOCOL)
        diffs = [diff for diff in self.hosts.differences(old, socket.SOCK_DGRAM, proto)
                 if diff[:2] != (_SOL, socket.SO_BINDTODEVICE)]
        host = None
        try:
            twin = self.host_twin(call, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK, proto)
            if twin is None:
                return
            flags, host = twin
            carry_options(host, diffs)  # the old socket's, which the host took once already
            host.setsockopt(_SOL, SO_BINDTOIFINDEX, index)
            host.setblocking(not flags & os.O_NONBLOCK)
            if self.hosts.install(call, host, flags):
                host.close()
                if self.debug:
                    self.debug_decision(call, "connect", None, "disconnected: a fresh pinned host socket")
                call.reply(0)
        except NotSwitched as why:
            # Never the kernel's disconnect instead: it would unpin the socket.
            self.limit.log(logging.ERROR, "container %s: a switched UDP socket not disconnected: %s",
                           call.container.short_id, why)
            call.fail(errno.ENOBUFS)
        finally:
            if host is not None:
                host.close()

    def bypass_connect(self, call, kind, raw, dest, own_service):
        """Connect a host socket to `raw` for the call and install it; None once answered, else
        why the socket stays."""
        proto = call.sock.getsockopt(_SOL, socket.SO_PROTOCOL)
        if (kind, proto) not in _BYPASSABLE:
            return "container (not TCP or UDP)"
        try:
            result = self.switch(call, kind, proto, raw, dest, own_service)
        except NotSwitched as why:
            return "container (%s)" % why
        if self.debug and result is not None:
            self.debug_decision(call, "connect", dest, "bypassed" if call.installed
                                else "host connect failed, answered as is: %s" % os.strerror(-result))
        return None

    @staticmethod
    def own_published_service(settings, family, kind, dest):
        """(raw, dest) of the host side of the published port a loopback `dest` names, or None.

        A container that reaches its own published service on its loopback
        must find it where the daemon put it: on the host.
        """
        mapping = settings.publish.get((_TCP if kind == socket.SOCK_STREAM else _UDP, dest[2]))
        if mapping is None:
            return None
        host_ip = mapping.host_ip or (_LOOPBACK_IP4 if dest[0] == 4 else _LOOPBACK_IP6)
        raw = encode_sockaddr(family, host_ip, mapping.host_port)
        return None if raw is None else (raw, parse_sockaddr(raw))

    def switch(self, call, kind, proto, raw, dest, own_service):
        """Connect a new host socket like call.sock to `raw` (parsed: `dest`), pin it, and install
        it at the target's fd.

        The call is answered here: the connect's result, which is the
        destination's own answer when it fails at once (nothing is
        installed then, as a failed connect changes nothing natively).  The
        result is also returned: None if the target went away.  The host
        socket is pinned to the interface of its source address before the
        container gets it, so that wherever it is pointed later it never
        reaches the host's loopback (HostInterfaces).  A connection to the
        host side of a published port on the host's loopback (`own_service`:
        a destination the daemon chose, never the container) cannot be
        pinned; only TCP goes there, since a TCP socket goes nowhere else
        without a trapped call.  Raises NotSwitched when the socket must stay
        in the container.

        The pin is a wall for TCP and IPv6 UDP only.  An IPv4 datagram's
        IP_PKTINFO names its interface past the socket's pin (the kernel
        checks IPV6_PKTINFO against it, not IP_PKTINFO), and sends are not
        trapped: so IPv4 UDP, v4-mapped destinations included, stays in the
        container unless --no-udp-loopback-guard, and a switched IPv6 UDP
        socket is made IPV6_V6ONLY (a v4-mapped send would take that path).
        """
        sock, hosts = call.sock, self.hosts
        udp_guard = kind == socket.SOCK_DGRAM and call.container.settings.udp_guard
        if udp_guard and dest[0] == 4:
            raise NotSwitched("IPv4 UDP: its datagrams' IP_PKTINFO would pass the pin")
        packed = packed_address(dest)
        pin = not (own_service and is_loopback_address(packed))
        if not pin and kind != socket.SOCK_STREAM:
            raise NotSwitched("a UDP socket on the host's loopback could send anywhere there")
        if pin and hosts.interfaces.on_loopback(packed):
            raise NotSwitched("an address of the host's loopback interface")
        bound_ip, bound_port = sock.getsockname()[:2]
        if bound_ip not in ("0.0.0.0", "::"):
            raise NotSwitched("bound to a container address")
        if bound_port and bound_port not in hosts.ephemeral:
            # The host socket would hold that port on the host (and could keep a host service
            # from binding it): only the host's ephemeral ports, which its kernel hands out
            # to anybody, are taken so.
            raise NotSwitched("bound to port %d, not one of the host's ephemeral ports" % bound_port)
        diffs = hosts.differences(sock, kind, proto)
        twin = self.host_twin(call, kind | socket.SOCK_NONBLOCK, proto)
        if twin is None:
            return None
        flags, host = twin
        try:
            carry_options(host, diffs)
            if udp_guard:
                host.setsockopt(_IP6, socket.IPV6_V6ONLY, 1)
            if bound_port:
                try:
                    host.bind((bound_ip, bound_port))
                except OSError as e:
                    raise NotSwitched("bound port %d not free on the host: %s"
                                      % (bound_port, e.strerror)) from None
            result = start_connect(host.fileno(), raw)
            if result < 0 and result != -errno.EINPROGRESS:
                call.result(result)  # the destination's answer, as the host's kernel gives it
                return result
            if pin:
                hosts.pin(host)
            nonblocking = bool(flags & os.O_NONBLOCK)
            if result == 0 and not nonblocking:
                host.setblocking(True)
            if not hosts.install(call, host, flags):
                return None
            call.container.counters[COUNT_BYPASSED] += 1  # before the answer: its container may be gone after
            # The replaced socket, no longer the target's, is closed after the
            # answer: ours is its last reference, whose close tears it down (7 us
            # here), and nobody sees when, since it never got a connection
            # (switch() takes no socket with an address of its own).
            replaced = call.hand_over()
            try:
                if result == -errno.EINPROGRESS and not nonblocking:
                    self.pending.wait(call, host, raw, host_socket=True)
                else:
                    # Our reference to the host socket goes before the answer, so
                    # that the target's close() is the last one, as natively.
                    host.close()
                    call.result(result)
                host = None
            finally:
                replaced.close_unconnected()
            return result
        finally:
            if host is not None:
                host.close()

    def connect_in_place(self, call, raw, kind=socket.SOCK_STREAM):
        """Connect the target's own socket (call.sock) to the validated `raw`, and answer.

        A datagram socket's connect only records the address, so its O_NONBLOCK
        is not read (nor switched off and on): a resolver's lookup connects one.
        """
        fd = call.sock.fileno()
        stream = kind != socket.SOCK_DGRAM    # a datagram socket's connect never waits
        blocking = stream and os.get_blocking(fd)
        if blocking:
            os.set_blocking(fd, False)  # the file is shared with the target: restored below
            try:
                result = start_connect(fd, raw, shared=True)
            finally:
                os.set_blocking(fd, True)
        else:
            result = start_connect(fd, raw, shared=stream)
        if call.retried:
            # The dead process's connect got there first: its outcome is this call's.
            result = {-errno.EISCONN: 0, -errno.EALREADY: -errno.EINPROGRESS}.get(result, result)
        if result == -errno.EINPROGRESS and blocking:
            self.pending.wait(call, call.hand_over(), raw, host_socket=False)
        else:
            call.result(result)

    # -- another container's published port (--handle-c2c-connections) -----

    def connect_to_peer(self, call, raw, dest, peer):
        """A connect to a served container's address and published port goes to the port's host
        side, where the caller's own network reaches that container too (asked once in a while:
        Container.probed)."""
        reachable = call.container.probed(dest) if self.routes.probe else True
        if reachable is not None:
            self.reach_peer(call, raw, dest, peer, reachable)
            return
        probe = PeerProbe(call, raw, dest, self.inflight,
                          lambda reachable: self.reach_peer(call, raw, dest, peer, reachable))
        probe.start(lambda: self.routes.helper(peer),
                    lambda: self.helpers.for_call(call, self.targets.namespaces(call.tid)))

    def reach_peer(self, call, raw, dest, peer, reachable):
        """Connect to the peer's host side if `reachable`, else where the caller is: its own
        network answers as it would without the daemon."""
        if reachable:
            self.reach_host_side(call, raw, dest, peer.host_ip or (_LOOPBACK_IP4 if dest[0] == 4
                                                                   else _LOOPBACK_IP6),
                                 peer.host_port, "a peer's published port")
            return
        call.container.counters[COUNT_CONTAINER] += 1
        if self.debug:
            self.debug_decision(call, "connect", dest, "container (a peer its network does not reach)")
        self.connect_in_place(call, raw)

    def reach_host_side(self, call, raw, dest, host_ip, host_port, what):
        """Connect a host socket to the host side of a published port for a connect to `dest`;
        where that cannot be, connect where the caller is."""
        kind = call.sock.getsockopt(_SOL, socket.SO_TYPE)
        host_raw = encode_sockaddr(call.sock.family, host_ip, host_port)
        if kind != socket.SOCK_STREAM:
            outcome = "container (%s, not TCP)" % what
        elif host_raw is None:
            outcome = "container (%s, at an IPv6 address)" % what
        else:
            if self.debug:
                self.debug_decision(call, "connect", dest, "%s, at %s" % (what, format_destination(
                    parse_sockaddr(host_raw))))
            outcome = self.bypass_connect(call, kind, host_raw, parse_sockaddr(host_raw), True)
            if outcome is None:
                return
        call.container.counters[COUNT_CONTAINER] += 1
        if self.debug:
            self.debug_decision(call, "connect", dest, outcome)
        self.connect_in_place(call, raw)

    # -- bind --------------------------------------------------------------

    def on_bind(self, call):
        """Bind a published port on the host, anything else where the socket is."""
        if not self.target_socket(call, BIND):
            return
        raw = self.targets.read_sockaddr(call, 1, 2)
        if raw is None or not call.still_valid():
            return
        sock = call.sock
        if self.hosts.is_host_socket(sock):
            # A switched socket is bound already (by this very call, if a dead process
            # published it); binding it anew on the host would let the container pick
            # host addresses.
            call.result(0 if call.retried else -errno.EINVAL)
            return
        dest = parse_sockaddr(raw)
        kind = sock.getsockopt(_SOL, socket.SO_TYPE)
        mapping, outcome = None, "container"
        if dest is not None and destination_reason(dest, ())[0] is not LOOPBACK:
            key = (_TCP if kind == socket.SOCK_STREAM else _UDP, dest[2])
            if key in call.container.settings.in_use:
                if self.debug:
                    self.debug_decision(call, "bind", dest, "refused: another container published its host port")
                call.fail(errno.EADDRINUSE)
                return
            mapping = call.container.settings.publish.get(key)
        if mapping is not None:
            proto = sock.getsockopt(_SOL, socket.SO_PROTOCOL)
            if (kind, proto) in _BYPASSABLE:
                try:
                    result = self.publish_bind(call, kind, proto, mapping)
                except NotSwitched as why:
                    outcome = "container (%s)" % why
                else:
                    if result is not None:
                        call.container.counters[COUNT_PUBLISHED] += result == 0
                        if result == -errno.EADDRINUSE:
                            self.limit.log(logging.WARNING, "container %s: %r: host port %d/%s is taken by "
                                           "another process, so the container's bind of port %d fails "
                                           "(EADDRINUSE); if that is the runtime's own -p for the same "
                                           "port (pasta, rootlesskit), publish it one way only: the "
                                           "runtime's -p or this daemon's", call.container.short_id,
                                           mapping, mapping.host_port, mapping.proto, mapping.container_port)
                        if self.debug:
                            self.debug_decision(call, "bind", dest, "published as %r: %s"
                                                % (mapping, os.strerror(-result) if result else "ok"))
                        call.result(result)
                    return
        result = sock_call(_libc.bind, sock.fileno(), raw, len(raw))
        if self.debug:
            self.debug_decision(call, "bind", dest, outcome)
        call.result(result)

    def publish_bind(self, call, kind, proto, mapping):
        """Bind a host socket at the mapping's host side and install it at the target's fd.

        Returns 0 or -errno (the host's answer, EADDRINUSE as the kernel says
        it), or None if the target went away.  The socket is not pinned: a
        socket pinned to an interface hears only what comes in through it,
        and a published port's clients come through any (the host's own, over
        the loopback, bridges, ...).  README says what it can reach.
        """
        sock = call.sock
        raw = encode_sockaddr(sock.family, mapping.host_ip, mapping.host_port)
        if raw is None:
            raise NotSwitched("%r cannot be bound by an IPv4 socket" % mapping)
        diffs = self.hosts.differences(sock, kind, proto)
        twin = self.host_twin(call, kind, proto)
        if twin is None:
            return None
        flags, host = twin
        lent = installed = False
        try:
            carry_options(host, diffs)
            self.ports.lend(mapping)
            lent = True
            result = sock_call(_libc.bind, host.fileno(), raw, len(raw))
            if result < 0:
                return result
            if flags & os.O_NONBLOCK:
                host.setblocking(False)
            installed = self.hosts.install(call, host, flags)
            return 0 if installed else None
        finally:
            host.close()
            if lent:
                self.ports.end_loan(mapping, installed, call.container.id)

    # -- listen ------------------------------------------------------------

    def on_listen(self, call):
        """listen() on a switched socket only where a published port put it.

        A host socket whose connect failed is not connected: listen() would
        open a listener in the host's namespace, on every host address, at a
        port the kernel picks.  That is refused (EOPNOTSUPP).  Any other
        socket listens, the daemon doing it on the very socket it checked.
        """
        if not self.target_socket(call, LISTEN):
            return
        sock = call.sock
        if not self.hosts.is_host_socket(sock) or self.published_at(call.container.settings,
                                                                    *sock.getsockname()[:2]):
            call.result(sock_call(_libc.listen, sock.fileno(), ctypes.c_int(call.args[1] & 0xFFFFFFFF)))
            return
        call.container.counters[COUNT_REFUSED] += 1
        if self.debug:
            self.debug_decision(call, "listen", None, "refused: switched, not a published port")
        call.fail(errno.EOPNOTSUPP)

    @staticmethod
    def published_at(settings, host_ip, host_port):
        """Whether a TCP mapping publishes (host_ip, host_port), a getsockname() result, on the host."""
        address = ipaddress.ip_address(host_ip.split("%")[0])
        address = getattr(address, "ipv4_mapped", None) or address
        return any(mapping.proto == _TCP and mapping.host_port == host_port
                   and mapping.host_ip in (None, address) for mapping in settings.publish.values())

    # -- calls on sockets that are not IP: made by a NamespaceHelper ---------

    def delegate(self, call, op, raw=None):
        """Have the container's NamespaceHelper make `op` on call.sock (taken over) as the
        calling thread would, and answer the call itself.  `raw`: the sockaddr, if read already.

        Until it has answered, the call has a pending slot in the Inflight
        row (the helper frees it), so that a dead daemon's calls get EINTR.
        """
        slot = 0
        if op == LISTEN:
            raw = b""
        elif raw is None:
            raw = self.targets.read_sockaddr(call, 1, 2)
            if raw is None or not call.still_valid():
                return
        with call.hand_over() as sock:
            try:
                helper = self.helpers.for_call(call, self.targets.namespaces(call.tid))
                helper.reclaim(self.inflight)
                slot = self.inflight.add_pending(call.filter.key, call.id)
                helper.request(op, call, raw, sock.fileno(), self.targets.threads.get(call.tid), slot)
            except OSError as e:
                self.inflight.end_pending(slot)
                call.fail(e.errno or errno.EIO)
                return
        call.deferred = True

    # -- sends ---------------------------------------------------------------

    def on_sendto(self, call):
        self.send(call, SENDTO)

    def on_sendmsg(self, call):
        self.send(call, SENDMSG)

    def on_sendmmsg(self, call):
        self.send(call, SENDMMSG)

    def send(self, call, op):
        """A send the profile trapped.  The default profile traps only TCP Fast Open sends, which
        also connect a socket where the daemon cannot check it: they are refused as by a host
        whose TCP Fast Open client is off (EOPNOTSUPP), and TCP Fast Open clients then connect.

        A profile from an older `seccomp-gen.py --udp` traps every send with a
        destination.  Those without MSG_FASTOPEN run as made (CONTINUE): such
        a send cannot connect, bind or listen a socket, and whatever socket the
        fd number holds when the kernel runs it, the same send untrapped (the
        default profile's) could do as much.
        """
        if call.args[SEND_FLAGS_ARG[op]] & MSG_FASTOPEN:
            call.fail(errno.EOPNOTSUPP)
        else:
            self.let_run(call)

    # The handler of each trapped call, by its TRAPS name: __init__ builds the
    # dispatch table, (arch, nr) -> (bound handler, pointer size), from TRAPS and this.
    HANDLERS = {CONNECT: on_connect, BIND: on_bind, LISTEN: on_listen,
                SENDTO: on_sendto, SENDMSG: on_sendmsg, SENDMMSG: on_sendmmsg}


assert set(Switcher.HANDLERS) == {trap.name for trap in TRAPS}, "a trapped call without a handler"


# ---------------------------------------------------------------------------
# What the processes share: tables in shared memory, the per-container session,
# the event loop, starting a child
# ---------------------------------------------------------------------------

class CounterTable:
    """Every container's counters, in memory the daemon shares with the workers it forks.

    A container has a slot; each server (worker) that serves it counts in
    its own row of that slot, so every row has one writer and nothing is
    lost; the daemon reads the sums.  Slots are reused oldest-freed first,
    so that a late write by a worker that has not yet seen a container go
    lands in a row nobody reads.
    """

    SLOTS = 16384   # containers alive at once (each costs the daemon fds: far more than it can hold)

    def __init__(self, servers, slots=SLOTS):
        self.servers, self.slots = servers, slots
        self.memory = mmap.mmap(-1, servers * slots * len(COUNTERS) * 8)  # MAP_SHARED, kept by fork
        self.cells = memoryview(self.memory).cast("q")
        self.free = collections.deque(range(slots))

    def allocate(self):
        """A zeroed slot; Error when every slot is taken."""
        if not self.free:
            raise Error("%d containers at once: no counters left" % self.slots)
        slot = self.free.popleft()
        zeros = bytes(len(COUNTERS) * 8)
        for server in range(self.servers):
            self.row(server, slot).cast("B")[:] = zeros
        return slot

    def release(self, slot):
        self.free.append(slot)

    def row(self, server, slot):
        """Server `server`'s counters of slot `slot`: a writable view, indexed by COUNT_*."""
        start = (server * self.slots + slot) * len(COUNTERS)
        return self.cells[start:start + len(COUNTERS)]

    def totals(self, slot):
        return [sum(column) for column in zip(*(self.row(server, slot) for server in range(self.servers)))]


class InflightTable:
    """The notifications each worker is answering, in memory shared with the daemon, so that
    when a worker dies the daemon answers what it left: a thread would otherwise wait in its
    call until a signal interrupts it.

    Per worker, slot 0 is the notification being handled (for reading only:
    it is recovered from the RECV copy below) and the others the calls it
    answers later: blocking connects waiting in its loop, the calls its
    NamespaceHelpers are making, peer probes; a slot is (filter key, 0 when
    free; notification id).  Those are answered EINTR, as a signal would
    have: never CONTINUE, which would let the kernel look the fd number up
    again.  After the slots: the key of the filter the worker receives on,
    then the struct seccomp_notif RECV writes.  The kernel writes it there
    itself, so a worker killed as RECV returns leaves the notification it
    took where the daemon finds it, to be handled anew (Server.handle_anew);
    otherwise nobody would answer it, and its thread would wait for ever.
    """

    PENDING = 1024      # calls answered later (connects, helper calls, probes) per worker
    FIELDS = 2
    RECEIVING = (1 + PENDING) * FIELDS      # the cell of the filter key, then the notification's

    def __init__(self, servers):
        self.per_server = self.RECEIVING + 1 + _NOTIF.size // 8
        self.memory = mmap.mmap(-1, servers * self.per_server * 8)  # MAP_SHARED, kept by fork
        self.cells = memoryview(self.memory).cast("Q")  # notification ids are random u64

    def row(self, server):
        return self.cells[server * self.per_server:(server + 1) * self.per_server]

    def writer(self, server):
        """The Inflight that worker `server` writes its row with."""
        offset = (server * self.per_server + self.RECEIVING + 1) * 8
        return Inflight(self.row(server), ctypes.addressof(ctypes.c_char.from_buffer(self.memory, offset)),
                        memoryview(self.memory)[offset:offset + _NOTIF.size])

    def orphans(self, server):
        """What a dead worker left, its row freed: ([(filter key, notification id)] under way in
        its loop or with its NamespaceHelpers, [(filter key, struct seccomp_notif)] of the call
        it was handling or had taken by RECV, which can be handled anew: the target still waits
        in the same call, or the kernel says it does not)."""
        row = self.row(server)
        under_way = [tuple(row[i:i + self.FIELDS]) for i in range(self.FIELDS, self.RECEIVING, self.FIELDS) if row[i]]
        key = row[self.RECEIVING]
        notif = bytes(row[self.RECEIVING + 1:self.RECEIVING + 1 + _NOTIF.size // 8].cast("B"))
        anew = [(key, notif)] if key and notif != _ZERO_NOTIF else []
        row.cast("B")[:] = bytes(len(row) * 8)
        return under_way, anew


class Inflight:
    """One worker's row of the InflightTable, as it writes it: a few stores per notification."""

    __slots__ = ("cells", "free", "notif_address", "notif_view")

    def __init__(self, cells, notif_address, notif_view):
        self.cells = cells
        self.free = list(range(InflightTable.PENDING, 0, -1))
        self.notif_address, self.notif_view = notif_address, notif_view

    def receive(self, key, notify_fd):
        """RECV on the filter `key` names, into the row: the notification's fields."""
        self.cells[InflightTable.RECEIVING] = key
        self.notif_view[:] = _ZERO_NOTIF
        return notif_recv(notify_fd, self.notif_address, self.notif_view)

    def begin(self, key, notif_id):
        cells = self.cells
        cells[1] = notif_id
        cells[0] = key

    def end(self):
        self.cells[0] = 0

    def add_pending(self, key, notif_id):
        """A slot for a call answered later: a blocking connect left waiting, a NamespaceHelper's
        call (0 if all are taken: it is not answered for)."""
        if not self.free:
            return 0
        slot = self.free.pop()
        base = slot * InflightTable.FIELDS
        cells = self.cells
        cells[base + 1] = notif_id
        cells[base] = key
        return slot

    def end_pending(self, slot):
        if slot:
            self.cells[slot * InflightTable.FIELDS] = 0
            self.free.append(slot)

    def free_slot(self, slot):
        """A slot another process (a NamespaceHelper) ended is free again."""
        if slot:
            self.free.append(slot)


class Container:
    """One container (by OCI id) as one server sees it: its filters there, its `auto` subnets,
    and the server's row of its counters."""

    AUTO_REFRESH = 2.0  # seconds an `auto` subnet list is trusted

    def __init__(self, cid, table, slot, server, settings):
        self.id = cid
        self.short_id = cid[:12]
        self.settings = settings    # Settings: the daemon's, plus the container's annotations
        self.notify_fds = set()
        self.table, self.slot = table, slot
        self.counters = table.row(server, slot)
        self.auto_nets = ()
        self.auto_read = -1e9
        self.warned_socketcall = False
        self.helpers = {}           # (user, mount, network namespace inodes) -> NamespaceHelper
        self.helpers_failed = set()  # namespace inodes no helper could join (a nested user namespace)
        self.probes = {}            # peer destination -> (reachable, monotonic time it is trusted till)

    PROBE_TRUSTED = 10.0        # seconds a peer found reachable from the container stays so
    PROBE_DOUBTED = 1.0         # and one found unreachable
    PROBES_KEPT = 1024

    def probed(self, dest):
        """Whether the container's own network reached peer `dest` lately; None if not asked lately."""
        known = self.probes.get(dest)
        return known[0] if known is not None and known[1] > time.monotonic() else None

    def remember_probe(self, dest, reachable):
        if len(self.probes) >= self.PROBES_KEPT:
            self.probes.clear()
        self.probes[dest] = (reachable, time.monotonic() + (self.PROBE_TRUSTED if reachable else self.PROBE_DOUBTED))

    def auto_networks(self, tid, is_host_address):
        """What `--ignore auto` keeps in the container (compiled), read from its network namespace
        through /proc: auto_ignored() of its subnets and addresses; `is_host_address(packed)`
        tells the host's own addresses."""
        now = time.monotonic()
        if now - self.auto_read > self.AUTO_REFRESH:
            self.auto_read = now
            subnets = read_proc_net(tid, (("route", parse_proc_route), ("if_inet6", parse_proc_if_inet6)))
            self.auto_nets = compile_networks(auto_ignored(subnets, container_addresses(tid), is_host_address))
        return self.auto_nets


class Filter:
    """One seccomp filter of a container (one notify fd): a process the runtime started and its
    descendants."""

    __slots__ = ("key", "notify_fd", "container", "shared", "turns")

    def __init__(self, key, notify_fd, container, shared):
        self.key, self.notify_fd, self.container = key, notify_fd, container
        self.shared = shared        # other servers RECV on the same filter
        # Which of its threads call, and how they take turns.  A shared filter was found
        # crowded: whichever server sees it calm again says so (Server.wake_ups follows).
        self.turns = Turns(crowded=shared)


class Turns:
    """How the threads of one filter take turns at trapped calls, as one server sees them:
    crowded (many threads queueing) or calm (one thread at a time).  Pure: note() is
    given each call's thread, and says when the state changes.

    Crowded: BUSY_TID_CHANGES calls, each from another thread than the one
    before, within BUSY_WINDOW seconds, twice in a row.  Calm again:
    CALM_STREAK calls in a row from one thread.  The server acts on a change
    (Server.on_turns): a crowded filter is shared by every worker, and its
    answers wake their threads where those last ran, not on the server's
    CPU (SYNC_WAKE_UP, which suits one thread and a server taking turns,
    puts every woken thread on the server's CPU: measured with 4 processes
    of one container connecting unix sockets, 25,400 connects/s with it and
    32,400 without; one process, 26,000 with it and 14,000 without).
    """

    __slots__ = ("last_tid", "tid_changes", "window", "streak", "crowded")

    BUSY_TID_CHANGES = 100  # calls each from another thread than the one before...
    BUSY_WINDOW = 1.0       # ...within this many seconds, twice in a row: crowded
    CALM_STREAK = 100       # calls in a row from one thread: calm again

    def __init__(self, crowded=False):
        self.last_tid = 0
        self.tid_changes = 0
        self.window = 0.0
        self.streak = 0
        self.crowded = crowded

    def note(self, tid, clock=time.monotonic):
        """A call from thread `tid`: True once the filter becomes crowded, False once it
        becomes calm, else None.  `clock` is read once every BUSY_TID_CHANGES changes.

        The hot path calls it only when `tid` is not last_tid or the filter is
        crowded: a calm filter's same thread costs one comparison.
        """
        if tid == self.last_tid:
            self.streak += 1
            if self.crowded and self.streak >= self.CALM_STREAK:
                self.crowded = False
                return False
            return None
        self.last_tid, self.streak = tid, 0
        self.tid_changes += 1
        if self.tid_changes < self.BUSY_TID_CHANGES:
            return None
        now = clock()
        busy = now - self.window < self.BUSY_WINDOW
        self.tid_changes, self.window = 0, now
        if busy and not self.crowded:
            self.crowded = True
            return True
        return None


class Timer:
    """A deadline in Events; cancel() makes it a no-op (the heap keeps it until it is due)."""

    __slots__ = ("callback",)

    def __init__(self, callback):
        self.callback = callback

    def cancel(self):
        self.callback = None


class Events:
    """The loop's registry: one callback per watched fd (epoll), and deadlines."""

    def __init__(self):
        self.epoll = select.epoll()
        self.callbacks = {}         # fd -> callable(events)
        self.timers = []            # heap of (deadline, serial, Timer)
        self.serial = 0

    def watch(self, fd, mask, callback):
        self.callbacks[fd] = callback
        self.epoll.register(fd, mask)

    def unwatch(self, fd):
        self.callbacks.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def call_at(self, deadline, callback):
        """Run `callback()` once time.monotonic() reaches `deadline`; returns its Timer."""
        timer = Timer(callback)
        self.serial += 1
        heapq.heappush(self.timers, (deadline, self.serial, timer))
        return timer

    def run_once(self, timeout):
        """Wait for events (at most `timeout` seconds, -1 for no limit) and run what is due."""
        if self.timers:
            wait = max(0.0, self.timers[0][0] - time.monotonic())
            timeout = wait if timeout < 0 else min(timeout, wait)
        try:
            events = self.epoll.poll(timeout)
        except InterruptedError:
            return
        for fd, mask in events:
            callback = self.callbacks.get(fd)
            if callback is not None:
                self.run(callback, mask)
        if self.timers:
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                timer = heapq.heappop(self.timers)[2]
                if timer.callback is not None:
                    self.run(timer.callback)

    @staticmethod
    def run(callback, *args):
        try:
            callback(*args)
        except Exception:  # a bug must cost one event, never the daemon
            log.exception("internal error in %s", getattr(callback, "__qualname__", callback))

    def close(self):
        self.epoll.close()


def run_loop(events, running, housekeeping, due):
    """Turn `events` while running(); every HOUSEKEEPING seconds while due(), call housekeeping()."""
    next_time = 0.0
    while running():
        busy = due()
        events.run_once(HOUSEKEEPING if busy else -1)
        if busy:
            now = time.monotonic()
            if now >= next_time:
                next_time = now + HOUSEKEEPING
                housekeeping()


ACTED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)  # the daemon's


def close_other_fds(keep):
    """In a forked child: close every fd but those in `keep` (and the log's)."""
    keep = set(keep)
    keep.update(h.stream.fileno() for h in log.handlers if getattr(h, "stream", None) is not None)
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            try:
                os.close(int(name))
            except OSError:
                pass  # the listing's own fd


def fork_child(child, what, keep=None, signals=None):
    """Fork a process that dies with this one (PR_SET_PDEATHSIG) and exits with child()'s
    status (None: 0); the pid.  The child never returns from here.

    Every child of the tree is started here, so that none keeps what is its
    parent's: the signal wake-up fd (the parent's pipe) goes; `signals`, if
    given, becomes the disposition of the signals a parent acts on
    (ACTED_ON); with `keep` (fds), every fd but 0, 1, 2 and those is closed.
    """
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() == parent:  # else the parent died before the prctl: nothing to serve
                signal.set_wakeup_fd(-1)
                for signum in ACTED_ON if signals is not None else ():
                    signal.signal(signum, signals)
                if keep is not None:
                    close_other_fds({0, 1, 2, *keep})
                status = child() or 0
        except BaseException:
            log.exception("%s failed", what)
        finally:
            os._exit(status)
    return pid


def answer_orphans(inflight, server, notify_fds):
    """Answer the calls server `server` had under way when it died (a blocking connect in its
    loop, a NamespaceHelper's call): EINTR, as if a signal had interrupted them, never
    CONTINUE, which would let the kernel look the fd number up again (POSIX says a connect
    so interrupted goes on asynchronously).  `notify_fds` maps filter keys to notify fds.
    Returns (how many were answered, [(key, struct seccomp_notif)] of the call it was
    handling, for a live server to handle anew: Server.handle_anew)."""
    under_way, anew = inflight.orphans(server)
    answered = 0
    for key, notif_id in under_way:
        notify_fd = notify_fds.get(key)
        if notify_fd is not None:
            try:
                answered += notif_send(notify_fd, notif_id, 0, -errno.EINTR, 0)
            except OSError as e:
                log.error("cannot answer a call a dead process left: %s", e.strerror)
    return answered, anew


def watch_signals(events, on_signal, more=()):
    """SIGTERM, SIGINT, SIGUSR1, SIGHUP and `more` as loop events: on_signal(signum) runs
    between notifications.  Returns the pipe, for close_signal_pipe.

    SIGALRM gets a handler too, but never reaches on_signal: it only ends a
    wait the process bounds with a timer (a RECV on a shared filter, a
    lingering close).
    """
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP, signal.SIGALRM) + tuple(more):
        signal.signal(signum, lambda *_: None)

    def on_readable(_events):
        try:
            signums = os.read(rfd, 64)
        except BlockingIOError:
            return
        for signum in signums:
            if signum != signal.SIGALRM:
                on_signal(signum)
    events.watch(rfd, select.EPOLLIN, on_readable)
    return rfd, wfd


def close_signal_pipe(pipe):
    if pipe:
        signal.set_wakeup_fd(-1)
        for fd in pipe:
            os.close(fd)


def describe_exit(status):
    if os.WIFSIGNALED(status):
        return "was killed by signal %d" % os.WTERMSIG(status)
    return "exited with status %d" % os.WEXITSTATUS(status)


def sd_notify(message):
    """Tell systemd (a Type=notify unit) what the service does: READY=1, RELOADING=1,
    STOPPING=1.  Nothing outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path[0] == "@":
        path = "\0" + path[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(message.encode(), path)
    except OSError as e:
        log.warning("cannot notify systemd on %s: %s", os.environ["NOTIFY_SOCKET"], e.strerror)


# ---------------------------------------------------------------------------
# The keeper: holds the daemon's tables and fds, restarts it, hands the next one its state
# (KeeperLink and the hand-over: length-prefixed JSON snapshots + SCM_RIGHTS)
# ---------------------------------------------------------------------------

FDS_PER_MESSAGE = 200       # SCM_RIGHTS fds in one message of a hand-over (the kernel takes 253)
HANDED_OVER = b"ok"         # a --take-over successor's word that it has taken everything


def send_state(conn, state, fds):
    """A daemon's snapshot() and the fds it names, on stream socket `conn` (blocking)."""
    state = dict(state, fd_count=len(fds))
    payload = json.dumps(state).encode()
    conn.sendall(_U32.pack(len(payload)) + payload)
    for start in range(0, len(fds), FDS_PER_MESSAGE):
        batch = array.array("i", fds[start:start + FDS_PER_MESSAGE])
        conn.sendmsg([b"f"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, batch)])


def receive_state(conn, sender):
    """What send_state() sent on `conn`: (state, [fd]); Error if `sender` breaks off, None at
    end of file before anything."""
    def exactly(count):
        data = b""
        while len(data) < count:
            chunk = conn.recv(count - len(data))  # never past the length: fds ride on later bytes
            if not chunk:
                if not data and count == _U32.size:
                    return None
                raise Error("%s broke off what it was sending" % sender)
            data += chunk
        return data
    header = exactly(_U32.size)
    if header is None:
        return None
    length, = _U32.unpack(header)
    state = json.loads(exactly(length))
    fds = []
    while len(fds) < state["fd_count"]:
        try:
            data, got = recv_with_fds(conn, FDS_PER_MESSAGE, 1)
        except OSError:  # fds dropped (out of fds here), or the sender gone
            data, got = b"", []
        fds.extend(got)
        if not data:
            for fd in fds:
                os.close(fd)
            raise Error("%s broke off after %d fds" % (sender, len(fds)))
    return state, fds


def receive_hand_over(path):
    """--take-over: everything the daemon serving `path` hands over, (state, fds); OSError if
    no daemon answers there, Error if it does not hand over."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(60)
        conn.connect(path)
        conn.sendall(TAKE_OVER_REQUEST)
        handed = receive_state(conn, "the daemon on %s" % path)
        if handed is None:
            raise Error("the daemon on %s closed the hand-over (a version without it?)" % path)
        conn.sendall(HANDED_OVER)
    return handed


class KeeperLink:
    """The daemon's side of its keeper: a stream socket (None without a keeper, --no-keeper,
    or once it took no more), and the fds the keeper holds.  Whatever changes what
    HandOver.snapshot() gives calls changed(): the keeper is sent a snapshot once this turn
    of the loop ends (sync)."""

    __slots__ = ("sock", "held", "timer", "events", "snapshot")

    TIMEOUT = 5.0       # seconds a snapshot may take to send: the keeper only reads

    def __init__(self, sock=None):
        self.sock = sock
        if sock is not None:
            sock.settimeout(self.TIMEOUT)
        self.held = set()           # idents (HandOver.snapshot) of the fds the keeper has a duplicate of
        self.timer = None           # the Timer of the next sync, once something changed
        self.events = None          # the daemon's loop...
        self.snapshot = None        # ...and its HandOver.snapshot: attach()

    def attach(self, events, snapshot):
        self.events, self.snapshot = events, snapshot

    @property
    def main_pid(self):
        """The process to signal, whose pid the pid files hold: the keeper's if there is one."""
        return os.getpid() if self.sock is None else os.getppid()

    def changed(self):
        if self.sock is not None and self.timer is None:
            self.timer = self.events.call_at(0, self.sync)

    def sync(self):
        """Send the keeper a snapshot(), with the fds it does not hold yet; whether it took it."""
        if self.sock is None:
            return False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        fds, new, held = [], [], set()

        def ref(fd, ident):
            held.add(ident)
            if ident not in self.held:
                fds.append(fd)
                new.append(ident)
            return ident
        state = self.snapshot(ref, for_keeper=True)
        state["new"] = new
        try:
            send_state(self.sock, state, fds)
        except OSError as e:
            log.error("the keeper takes no more of the daemon's state (%s): if this process dies now, "
                      "its containers are not served on", e.strerror or e)
            self.close()
            return False
        self.held = held
        return True

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
EXIT_RELOAD = 75            # the daemon's exit status once it left everything to its keeper (SIGUSR2)
RESUME_ENV = "BYPASS4NETNS_RESUME"  # a reloaded keeper's memfd of what its old code handed it


def take_resume():
    """A keeper run anew (SIGUSR2): the (state, fds) its old code left in RESUME_ENV, else None."""
    value = os.environ.pop(RESUME_ENV, None)
    if value is None:
        return None
    with os.fdopen(int(value), "r") as f:
        f.seek(0)
        resumed = json.load(f)
    for fd in resumed["fds"].values():
        os.set_inheritable(fd, False)
    return resumed["state"], resumed["fds"]


class Keeper:
    """The first process, unless --no-keeper: it forks the daemon and keeps a duplicate of
    every notify fd and listening socket the daemon serves, with the daemon's last snapshot().
    When the daemon dies (SIGKILL, the OOM killer, a bug) it answers what the dead daemon left
    and starts another with all of them: running containers wait a moment, then are served on.
    On SIGUSR2 it runs the script file anew in its own place (same pid), the new code taking
    everything over the same way.  Other signals go to the daemon; SIGKILL of the keeper ends
    the daemon too (PR_SET_PDEATHSIG), as a way to stop everything at once."""

    RESTARTS = 5            # restarts within RESTART_WINDOW seconds before giving up on a daemon
    RESTART_WINDOW = 60.0   # that dies as soon as it starts
    REAP_TIMEOUT = 5.0      # seconds a dead daemon's workers have to follow it (PR_SET_PDEATHSIG)

    def __init__(self, argv, workers, new_daemon, serve, pid_file=None):
        self.argv = argv            # to run the script anew with
        self.pid_file = pid_file    # written once the first daemon serves...
        self.ready_fd = None        # ...and then --ready-fd told
        self.new_daemon = new_daemon  # callable(table, inflight, KeeperLink) -> Daemon
        self.serve = serve          # callable(daemon, handed) -> exit status
        self.table, self.inflight = CounterTable(workers), InflightTable(workers)
        self.workers = workers
        self.events = Events()
        self.signal_pipe = None
        self.held = {}              # ident -> the keeper's duplicate of the daemon's fd
        self.anew = []              # [key, base64 struct seccomp_notif]: for the next daemon to handle
        self.state = None           # the daemon's last snapshot, fds as idents; None until it serves
        self.counted = False        # whether state's counters are all there is (a reload's): no table's
        self.announced = False      # READY=1 sent to systemd
        self.child = self.last_child = None  # the daemon's pid while it lives; the last one's
        self.child_status = None
        self.link = None
        self.reloading = False
        self.stopping = False
        self.restarts = collections.deque()
        script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-", "-c") else None
        self.script = script if script is not None and os.path.isfile(script) else None

    def run(self, handed=None, ready_fd=None):
        """Keep daemons running until one exits 0 (stopped, or handed over to --take-over);
        the exit status.  `handed`: a reloaded keeper's (state, fds)."""
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # the dead daemon's workers are ours to reap
        self.signal_pipe = watch_signals(self.events, self.on_signal, (signal.SIGUSR2, signal.SIGCHLD))
        self.ready_fd = ready_fd
        if handed is not None:
            self.state, self.held = handed
            self.anew = self.state.pop("anew", [])
            self.counted = True
        while True:
            self.start()
            self.supervise()
            status = self.child_status
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                return 0
            if self.state is None or self.stopping:
                return 1  # it never served, or died while stopping: its error is in the log
            if self.reloading and os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_RELOAD:
                self.run_anew()  # returns only if the exec failed: the old code serves on
            elif self.may_restart(status):
                log.error("the daemon (pid %d) %s: starting another with its %d containers",
                          self.last_child, describe_exit(status), len(self.state["containers"]))
            else:
                return 1
            self.reloading = False
            self.answer_orphans()

    def start(self):
        link, link_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = fork_child(lambda: self.become_daemon(link, link_end), "the daemon", signals=signal.SIG_DFL)
        link_end.close()
        self.child = self.last_child = pid
        self.link = link
        link.settimeout(KeeperLink.TIMEOUT)
        self.events.watch(link.fileno(), select.EPOLLIN, lambda _events: self.on_link())
        log.info("daemon: pid %d", pid)

    def become_daemon(self, link, link_end):
        """In the forked daemon: drop what is the keeper's, then serve; the exit status."""
        close_signal_pipe(self.signal_pipe)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the others: fork_child
        self.events.close()
        link.close()
        if self.ready_fd is not None:
            os.close(self.ready_fd)
        handed = None if self.state is None else (self.with_counters(), self.held)
        return self.serve(self.new_daemon(self.table, self.inflight, KeeperLink(link_end)), handed)

    def supervise(self):
        """Take the daemon's snapshots until it exits, then the last ones it sent."""
        while self.child is not None:
            self.events.run_once(-1)
        while self.link is not None:
            self.on_link()
        self.reap_the_rest()

    def on_link(self):
        try:
            received = receive_state(self.link, "the daemon")
        except (OSError, Error, ValueError) as e:
            log.error("the daemon's state: %s: if it dies now, its containers are not served on", e)
            received = None
        if received is None:
            self.events.unwatch(self.link.fileno())
            self.link.close()
            self.link = None
            return
        state, fds = received
        for ident, fd in zip(state.pop("new"), fds):
            old = self.held.get(ident)
            if old is not None:
                os.close(old)  # an ident of a daemon before this one
            self.held[ident] = fd
        named = {entry["fd"] for kind in ("listeners", "filters") for entry in state[kind]}
        for ident in [ident for ident in self.held if ident not in named]:
            os.close(self.held.pop(ident))
        self.state, self.counted = state, False
        self.anew = []  # the daemon that sent a state has handled them (adopt_containers)
        if not (self.announced or self.reloading):  # a reload is ready once the new code serves
            self.announced = True
            if self.pid_file:
                write_pid_file(self.pid_file)
            if self.ready_fd is not None:
                os.write(self.ready_fd, b"1")
                os.close(self.ready_fd)
                self.ready_fd = None
            sd_notify("READY=1\nMAINPID=%d" % os.getpid())

    def on_signal(self, signum):
        if signum == signal.SIGCHLD:
            self.reap()
            return
        if self.child is None:
            return
        if signum == signal.SIGUSR2:
            if not self.may_reload():
                return
            self.reloading, self.announced = True, False
            sd_notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
            sd_notify("STOPPING=1")
        os.kill(self.child, signum)

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child:
                self.child, self.child_status = None, status

    def reap_the_rest(self):
        """The dead daemon's workers are ours now (the subreaper): wait for them to die."""
        deadline = time.monotonic() + self.REAP_TIMEOUT
        while True:
            self.reap()
            try:
                with open("/proc/self/task/%d/children" % os.getpid()) as f:
                    left = [int(pid) for pid in f.read().split()]
            except FileNotFoundError:
                left = []
            if not left:
                return
            if time.monotonic() > deadline:
                for pid in left:
                    os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.01)

    def may_reload(self):
        if self.state is None:
            log.error("SIGUSR2: the daemon is not serving yet: nothing reloaded")
            return False
        if self.script is None:
            log.error("SIGUSR2: cannot reload: this daemon was not started from a file; "
                      "start the new version with --take-over")
            return False
        check = subprocess.run([sys.executable, self.script, "--version"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        if check.returncode != 0:
            log.error("SIGUSR2: %s does not run (%s): serving on with the code running now", self.script,
                      (check.stderr.strip().splitlines() or ["exit status %d" % check.returncode])[-1])
            return False
        log.warning("reloading %s (%s)", self.script, check.stdout.strip())
        return True

    def may_restart(self, status):
        now = time.monotonic()
        self.restarts.append(now)
        while self.restarts[0] < now - self.RESTART_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) > self.RESTARTS:
            log.critical("the daemon (pid %d) %s, the %dth time in %d s: giving up; running containers' "
                         "trapped calls fail with ENOSYS from now on", self.last_child, describe_exit(status),
                         len(self.restarts), self.RESTART_WINDOW)
            return False
        return True

    def answer_orphans(self):
        """The dead daemon's calls under way get EINTR; those it was handling are handed to the
        next daemon (state["anew"]), which handles them anew."""
        notify_fds = {entry["key"]: self.held[entry["fd"]] for entry in self.state["filters"]}
        for server in range(self.workers):
            answered, anew = answer_orphans(self.inflight, server, notify_fds)
            self.anew += [[key, base64.b64encode(notif).decode()] for key, notif in anew]
            if answered:
                log.warning("%d call(s) the dead daemon left under way answered EINTR", answered)

    def with_counters(self):
        """The last snapshot, with the counters the daemon had counted till it stopped."""
        state = dict(self.state, anew=self.anew)
        if not self.counted:
            state["containers"] = {cid: dict(entry, counters=self.table.totals(entry["slot"]))
                                   for cid, entry in state["containers"].items()}
        return state

    def run_anew(self):
        """Exec the script file in this process, handing it every fd and the state (SIGUSR2)."""
        self.answer_orphans()
        memfd = os.memfd_create("bypass4netns-state", 0)  # inherited by the exec
        with os.fdopen(os.dup(memfd), "w") as f:
            json.dump({"state": self.with_counters(), "fds": self.held}, f)
        for fd in self.held.values():
            os.set_inheritable(fd, True)
        env = dict(os.environ)
        env[RESUME_ENV] = str(memfd)
        try:
            os.execve(sys.executable, [sys.executable, self.script] + self.argv, env)
        except OSError as e:
            log.error("SIGUSR2: cannot run %s: %s: serving on with the code running now", self.script, e.strerror)
        os.close(memfd)
        for fd in self.held.values():
            os.set_inheritable(fd, False)

    def close(self):
        close_signal_pipe(self.signal_pipe)
        if self.ready_fd is not None:
            os.close(self.ready_fd)
        for fd in self.held.values():
            os.close(fd)
        self.held.clear()
        self.events.close()


# ---------------------------------------------------------------------------
# The daemon: the runtimes' socket, the containers, published ports, the bypass4netnsd API,
# hand-over; wiring and a loop (Daemon)
# ---------------------------------------------------------------------------

STATUS_REQUEST = b'{"bypass4netns": "status"}'  # what `bypass4netns.py status` sends to the socket
TAKE_OVER_REQUEST = b'{"bypass4netns": "take-over"}'  # what `--take-over` sends
LISTEN_BACKLOG = 4096       # runtimes' connections waiting to be accepted (the kernel may cap it)
ACCEPT_PAUSE = 0.1          # seconds without accept() after it failed with nothing to free
EVICTED = 16                # unfinished runtime connections dropped at once when out of fds
MESSAGE_TIMEOUT = 10        # seconds a runtime has to send its whole message
MAX_MESSAGE = 1 << 20       # bytes: a container's state is a few KiB


def bind_unix_listener(path):
    """A listening unix socket at `path`, only for this user; Error if a daemon listens there."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody is listening there
        else:
            raise Error("another daemon is listening on %s" % path)
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
        listener.listen(LISTEN_BACKLOG)
    except BaseException:
        listener.close()
        raise
    finally:
        os.umask(old_umask)
    return listener


class Listener:
    """One of the daemon's sockets: the runtimes', the API's, or a Bypass's (the runtimes' too)."""

    __slots__ = ("sock", "path", "on_data", "bypass")

    def __init__(self, sock, path, on_data, bypass):
        self.sock, self.path = sock, path
        self.on_data = on_data      # callable(RuntimeMessage) when a client sent something
        self.bypass = bypass        # the Bypass whose socket it is, or None


class RuntimeMessage:
    """A client's connection to a Listener and what it sent so far."""

    __slots__ = ("conn", "listener", "data", "fds", "tried", "timer")

    def __init__(self, conn, listener):
        self.conn, self.listener = conn, listener
        self.data = bytearray()
        self.fds = []
        self.tried = 0              # the length at the last parse attempt
        self.timer = None


class RuntimeListener:
    """The daemon's sockets and the clients' connections to them: the runtimes' socket, and the
    API's and each Bypass's (ApiFrontEnd), accepted and read here.

    A connection has MESSAGE_TIMEOUT seconds to send its whole message (and
    its fds); out of fds, the oldest unfinished ones make room.  On a
    runtimes' socket a message is a container's process (the OCI seccomp
    agent's: state JSON and SCM_RIGHTS fds), given to on_container(data,
    fds, bypass); or one of the two requests of this program itself:
    TAKE_OVER_REQUEST, given to on_take_over(RuntimeMessage), and
    STATUS_REQUEST, answered here with status().
    """

    def __init__(self, events, socket_path, on_container, on_take_over, status):
        self.events, self.socket_path = events, socket_path
        self.on_container, self.on_take_over, self.status = on_container, on_take_over, status
        self.listener = None        # the runtimes' socket's Listener
        self.messages = {}          # connection fd -> RuntimeMessage, oldest first
        self.out_of_fds = 0         # times the daemon had no fd for a runtime's connection or fds
        self.limit = LogLimit()

    def listen(self):
        self.listener = self.add_listener(self.socket_path, self.on_runtime_data)

    def add_listener(self, path, on_data, bypass=None):
        """A new socket at `path`; each client's RuntimeMessage goes to on_data."""
        return self.adopt(bind_unix_listener(path), path, on_data, bypass)

    def adopt(self, sock, path, on_data, bypass=None):
        """A listening socket (a previous daemon's, or just bound) served from now on."""
        listener = Listener(sock, path, on_data, bypass)
        self.watch_listener(listener)
        return listener

    def close_listener(self, listener):
        self.events.unwatch(listener.sock.fileno())
        listener.sock.close()
        try:
            os.unlink(listener.path)
        except FileNotFoundError:
            pass

    def pause(self, listeners):
        """Accept nothing more on `listeners` (a hand-over) until watch_listener()."""
        for listener in listeners:
            self.events.unwatch(listener.sock.fileno())

    def on_accept(self, listener):
        while True:
            try:
                conn, _ = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if out_of_fds(e):
                    self.out_of_fds += 1
                    if self.messages:
                        # The oldest clients that have not sent a whole message
                        # make room: a runtime dials without waiting (EAGAIN on
                        # a full backlog), so the backlog must keep moving.
                        for oldest in list(self.messages.values())[:EVICTED]:
                            self.end_message(oldest, "out of file descriptors: the oldest unfinished "
                                             "connections make room")
                        continue
                # Nothing to free: the connection waits in the backlog, retried
                # after a pause, not at the rate epoll reports it.
                self.limit.log(logging.ERROR, "accept on %s: %s: pausing %.1f s",
                               listener.path, e.strerror, ACCEPT_PAUSE)
                self.events.unwatch(listener.sock.fileno())
                self.events.call_at(time.monotonic() + ACCEPT_PAUSE, lambda: self.watch_listener(listener))
                return
            conn.setblocking(False)
            message = self.messages[conn.fileno()] = RuntimeMessage(conn, listener)
            message.timer = self.events.call_at(time.monotonic() + MESSAGE_TIMEOUT,
                                                lambda m=message: self.end_message(m, "no complete message in %d s"
                                                                                   % MESSAGE_TIMEOUT))
            self.events.watch(conn.fileno(), select.EPOLLIN | select.EPOLLRDHUP,
                              lambda _events, m=message: listener.on_data(m))

    def watch_listener(self, listener):
        if listener.sock.fileno() >= 0:  # not closed meanwhile
            self.events.watch(listener.sock.fileno(), select.EPOLLIN, lambda _events: self.on_accept(listener))

    def on_runtime_data(self, message):
        """Read what a runtime sent; parse it at its end, or before if it may be complete, each
        time it has doubled in length: a slow sender costs a few parses, not one per chunk."""
        try:
            while True:
                data, fds = recv_with_fds(message.conn)
                message.fds.extend(fds)
                if not data:
                    break
                message.data += data
                if len(message.data) > MAX_MESSAGE:
                    raise ValueError("longer than %d MiB" % (MAX_MESSAGE >> 20))
        except (BlockingIOError, InterruptedError):
            if len(message.data) < 2 * message.tried or not message.data:
                return
            message.tried = len(message.data)
            try:
                json.loads(message.data)
            except ValueError:
                return  # not complete yet
            except RecursionError:
                pass  # complete enough to be refused as malformed
        except (OSError, ValueError) as e:
            if isinstance(e, OSError) and out_of_fds(e):
                self.out_of_fds += 1
            self.end_message(message, str(e))
            return
        request = message.data.strip()
        if not message.fds and request == TAKE_OVER_REQUEST:
            self.take(message)
            self.on_take_over(message.conn)
            return
        if not message.fds and request == STATUS_REQUEST:
            self.answer_status(message.conn)
            self.end_message(message, None)
            return
        self.end_message(message, None)
        if message.data or message.fds:
            self.on_container(bytes(message.data), message.fds, message.listener.bypass)
        else:
            log.debug("a client of %s closed without a message", self.socket_path)

    def answer_status(self, conn):
        """`bypass4netns.py status`: the answer is written without waiting, or cut."""
        reply = json.dumps(self.status()).encode()
        try:
            sent = conn.send(reply)
        except OSError as e:
            sent, why = 0, e.strerror
        else:
            why = "the client does not read"
        if sent < len(reply):
            self.limit.log(logging.WARNING, "a status answer was cut: %s", why)

    def take(self, message):
        """Stop reading `message`: its connection is the caller's now."""
        message.timer.cancel()
        del self.messages[message.conn.fileno()]
        self.events.unwatch(message.conn.fileno())

    def end_message(self, message, error):
        """Stop reading `message`; with an error, drop it (its fds included) with one log line."""
        self.take(message)
        message.conn.close()
        if error is not None:
            for fd in message.fds:
                os.close(fd)
            self.limit.log(logging.ERROR, "dropping a runtime message: %s", error)

    def close(self):
        if self.listener is not None:
            self.close_listener(self.listener)


class Reservations:
    """Published host ports held open so no other host process takes them.

    A port is lent to the container's bind just before it binds (released,
    and left alone until the bind reports back: a worker binds in another
    process, while the loop keeps retrying), and taken again once it is free
    (tried by the loop every second: there is no close trap to tell when the
    container let it go).
    """

    def __init__(self, mappings, enabled):
        self.enabled = enabled
        self.held = {}                              # PortMapping key -> socket
        self.lent = set()                           # PortMapping keys a bind under way may take
        self.bound = {}                             # key -> the container that bound it, while it holds it
        self.claims = {self.key(m): (m, None) for m in mappings}  # key -> (mapping, container or None)

    @property
    def wanted(self):
        """The mappings whose host ports are held while free: every claim's, if reservation is on."""
        return [mapping for mapping, _owner in self.claims.values()] if self.enabled else []

    @staticmethod
    def key(mapping):
        return mapping.proto, mapping.host_port, mapping.host_ip

    def holder(self, mapping):
        """(True, the owner: a container id, "bypass ID", or None for the daemon's -p) if a
        mapping on the same host port and an overlapping address is claimed, else (False, None)."""
        for other, owner in self.claims.values():
            if (other.proto == mapping.proto and other.host_port == mapping.host_port
                    and (None in (other.host_ip, mapping.host_ip) or other.host_ip == mapping.host_ip)):
                return True, owner
        return False, None

    def claim(self, owner, mappings):
        """Container `owner`'s own mappings -> (mappings it has now, [(mapping, holder)] claimed
        by another first, [(mapping, why)] of its own that cannot be reserved yet).

        One not reserved yet (TIME_WAIT connections of a server that just
        stopped, or a host process on it) is retried like every reserved
        port; the container's bind gets the host's answer meanwhile.
        """
        own, in_use, unreserved = [], [], []
        for mapping in mappings:
            taken, holder = self.holder(mapping)
            if taken:
                in_use.append((mapping, holder))
                continue
            if self.enabled:
                try:
                    self.held[self.key(mapping)] = self.bind(mapping)
                except OSError as e:
                    unreserved.append((mapping, e.strerror))
            self.claims[self.key(mapping)] = (mapping, owner)
            own.append(mapping)
        return own, in_use, unreserved

    def export(self):
        """[(mapping, owner, held socket or None)] of every claim, for a hand-over."""
        return [(mapping, owner, self.held.get(key)) for key, (mapping, owner) in self.claims.items()]

    def adopt(self, mapping, owner, sock, binder=None):
        """A claim a previous daemon had, with its held socket if any, and the container that has
        bound it: a container's or a bypass's is kept; one of the previous daemon's -p is kept if
        this daemon's -p has it."""
        key = self.key(mapping)
        if binder is not None:
            self.bound[key] = binder
        if owner is None and key not in self.claims:
            if sock is not None:
                sock.close()  # no longer published: let it go
            return
        if owner is not None:
            self.claims[key] = (mapping, owner)
        if sock is not None and self.enabled and key not in self.held:
            self.held[key] = sock
        elif sock is not None:
            sock.close()

    def release(self, owner):
        """Container `owner` is gone: its host ports are free for anyone."""
        for key in [key for key, binder in self.bound.items() if binder == owner]:
            del self.bound[key]
        for key, (mapping, claimant) in list(self.claims.items()):
            if claimant == owner and owner is not None:
                del self.claims[key]
                self.lent.discard(key)
                sock = self.held.pop(key, None)
                if sock is not None:
                    sock.close()

    def reserve_all(self):
        """Take every port at start (but those held already); one that cannot be is an Error."""
        for mapping in self.wanted:
            if self.key(mapping) in self.held:
                continue
            try:
                self.held[self.key(mapping)] = self.bind(mapping)
            except OSError as e:
                raise Error("cannot reserve published port %r: %s" % (mapping, e.strerror)) from None

    @staticmethod
    def bind(mapping):
        """A bound, not listening socket on the mapping's host side (no SO_REUSEADDR, so
        it shares the port with nobody)."""
        kind = socket.SOCK_STREAM if mapping.proto == _TCP else socket.SOCK_DGRAM
        if mapping.host_ip is not None:
            family = socket.AF_INET if mapping.host_ip.version == 4 else socket.AF_INET6
        else:
            family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
        sock = socket.socket(family, kind)
        try:
            if family == socket.AF_INET6 and mapping.host_ip is None:
                sock.setsockopt(_IP6, socket.IPV6_V6ONLY, 0)  # hold IPv4 and IPv6 alike
            sock.bind((str(mapping.host_ip or ("::" if family == socket.AF_INET6 else "0.0.0.0")),
                       mapping.host_port))
        except BaseException:
            sock.close()
            raise
        return sock

    def lend(self, mapping):
        """Free the port for a bind about to take it; retry() leaves it alone until end_loan()."""
        self.lent.add(self.key(mapping))
        sock = self.held.pop(self.key(mapping), None)
        if sock is not None:
            sock.close()

    def end_loan(self, mapping, bound, binder=None):
        """The bind is over: the port is container `binder`'s now (`bound`), or taken back at once."""
        self.lent.discard(self.key(mapping))
        if bound:
            self.bound[self.key(mapping)] = binder
        else:
            self.take(mapping)

    def take(self, mapping):
        """Reserve the port again if it is free (and reservation is on); whether it was taken."""
        key = self.key(mapping)
        if self.enabled and key not in self.held:
            try:
                self.held[key] = self.bind(mapping)
            except OSError:
                return False
            return self.bound.pop(key, None) is not None  # its container let it go
        return False

    def retry(self):
        """Take back every free port; whether one a container had bound was."""
        let_go = False
        for mapping in self.wanted:
            if self.key(mapping) not in self.lent:
                let_go |= self.take(mapping)
        return let_go

    def bound_by(self):
        """[(mapping, container id)] of the daemon's -p ports that containers have bound now."""
        return [(self.claims[key][0], cid) for key, cid in self.bound.items()
                if key in self.claims and self.claims[key][1] is None]

    def unheld(self):
        return len(self.held) < len(self.wanted)

    def close(self):
        for sock in self.held.values():
            sock.close()
        self.held.clear()


class PortLoans:
    """The published ports the daemon holds, as its servers borrow them for a container's bind:
    a LocalPool's Switcher calls lend() and end_loan() directly, a worker's ParentChannel
    asks through its ProcessPool (answer()).  A container that bound a port or let it go
    changes the keeper's snapshot and Routes' rows: `on_bound()` tells them
    (Daemon.ports_changed)."""

    __slots__ = ("reservations", "on_bound")

    def __init__(self, reservations, on_bound):
        self.reservations, self.on_bound = reservations, on_bound

    def lend(self, mapping):
        self.reservations.lend(mapping)

    def end_loan(self, mapping, bound, binder=None):
        self.reservations.end_loan(mapping, bound, binder)
        self.on_bound()

    def answer(self, op, argument, *binder):
        """A worker's request (WorkerWire's LEND, BOUND or UNBOUND, a mapping as JSON, the
        binder): a worker is lent only what is published."""
        mapping = mapping_from_json(argument)
        if self.reservations.key(mapping) in self.reservations.claims:
            if op == WorkerWire.LEND:
                self.lend(mapping)
            else:
                self.end_loan(mapping, op == WorkerWire.BOUND, *binder)


class Routes:
    """Where the containers' own published ports are: for the servers (--handle-c2c-connections:
    peer_rows(); --multinode: the other nodes' rows, from the MultinodeAgent) and for etcd
    (this node's keys, through the agent).  Without either it is idle: nothing is read, sent
    or started.

    `containers()` are the daemon's (OCI id -> Hosted), `workers()` its current servers;
    the ContainerRegistry and PortLoans tell it when they change (update()).
    """

    ADDRESS_REFRESH = 10.0  # seconds between reads of the containers' addresses

    def __init__(self, events, containers, workers, bound, c2c, probe_peers, multinode):
        self.events, self.containers, self.workers = events, containers, workers
        self.bound = bound          # Reservations.bound_by
        self.c2c, self.probe_peers = c2c, probe_peers   # --handle-c2c-connections, not --no-policy-check
        self.multinode = multinode  # (etcd URL, this node's host address), or None
        self.active = c2c or multinode is not None
        self.peers = []             # peer_rows() as the servers have them
        self.nodes = []             # multinode_routes(), from the agent
        self.agent = None           # (pid, channel) of the MultinodeAgent
        self.registered = {}        # etcd key -> value: this node's, as the agent was sent them
        self.limit = LogLimit()

    def peer_rows(self):
        """[version, address, container port, host IP or None, host port, container id, pid] of
        the TCP ports each container publishes itself (its annotations, the API), and of the
        daemon's -p ports a container has bound (as the Go tool registers them), at each of its
        addresses."""
        containers = self.containers()
        published = [(hosted, mapping) for hosted in containers.values()
                     for mapping in map(mapping_from_json, (hosted.settings or {}).get("publish", ()))]
        published += [(containers[cid], mapping) for mapping, cid in self.bound()
                      if cid in containers]
        return [[address.version, int(address), mapping.container_port,
                 None if mapping.host_ip is None else str(mapping.host_ip), mapping.host_port, hosted.cid,
                 hosted.pid]
                for hosted, mapping in published if mapping.proto == _TCP and isinstance(hosted.pid, int)
                for address in hosted.addresses]

    def update(self):
        """Tell the servers the containers' published ports at their addresses, and the agent
        this node's keys, where those have changed."""
        if not self.active:
            return
        rows = self.peer_rows()
        if self.c2c and rows != self.peers:
            self.peers = rows
            self.send(self.workers())
        if self.agent is not None:
            host = self.multinode[1]
            registered = {MULTINODE_PREFIX + format_host_port(ipaddress.IPv4Address(address) if version == 4
                                                              else ipaddress.IPv6Address(address), port):
                          format_host_port(host, host_port)
                          for version, address, port, _host_ip, host_port, _cid, _pid in rows}
            if registered != self.registered:
                self.registered = registered
                try:
                    self.agent[1].send(json.dumps(registered).encode())
                except OSError as e:  # EMSGSIZE past some thousands of keys
                    self.limit.log(logging.ERROR, "cannot send the multinode agent %d keys: %s",
                                   len(registered), e.strerror)

    def status(self):
        """For `bypass4netns.py status`: what is routed, and to which etcd; None if idle."""
        if not self.active:
            return None
        return {"peers": len(self.peers) if self.c2c else None,
                "nodes": len(self.nodes) if self.multinode else None,
                "registered": len(self.registered) if self.multinode else None,
                "etcd": self.multinode[0] if self.multinode else None,
                "host_address": str(self.multinode[1]) if self.multinode else None,
                "agent": self.agent[0] if self.agent else None}

    def send(self, workers):
        if not self.active:
            return
        for worker in workers:
            try:
                worker.set_peers(self.peers, self.probe_peers, self.nodes)
            except OSError as e:  # EMSGSIZE past some thousands of routes
                self.limit.log(logging.ERROR, "cannot send worker %d the routes to %d peers and %d other nodes' "
                               "ports: %s", worker.index, len(self.peers), len(self.nodes), e.strerror)

    def refresh_addresses(self):
        """Read the containers' addresses again (`podman network connect` adds one, say), every
        ADDRESS_REFRESH seconds: their routes and keys follow."""
        for hosted in self.containers().values():
            hosted.addresses = container_addresses(hosted.pid)
        self.update()
        self.events.call_at(time.monotonic() + self.ADDRESS_REFRESH, self.refresh_addresses)

    def start(self):
        """Fork the MultinodeAgent if --multinode (the daemon's workers are forked already, and
        no thread runs: a plain fork), and read the addresses again now and then."""
        if not self.active:
            return
        self.events.call_at(time.monotonic() + self.ADDRESS_REFRESH, self.refresh_addresses)
        if self.multinode is None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        url, host = self.multinode

        # Signals are the daemon's to act on (SIG_IGN here): it hangs up to end the agent.
        pid = fork_child(lambda: MultinodeAgent(theirs, url, host).run(), "the multinode agent",
                         keep=[theirs.fileno()], signals=signal.SIG_IGN)
        theirs.close()
        self.agent = (pid, ours)
        self.events.watch(ours.fileno(), select.EPOLLIN, lambda _events: self.on_agent_message())
        log.info("multinode agent: pid %d, etcd at %s, this node at %s", pid, url, host)

    def addresses(self, pid):
        """A new container's own addresses (its first process `pid`), if they are routed."""
        return container_addresses(pid) if self.active else ()

    def on_agent_message(self):
        pid, channel = self.agent
        try:
            data = channel.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            log.error("the multinode agent (pid %d) is gone: connects to other nodes' containers go their "
                      "normal way", pid)
            self.stop()
            self.nodes = []
        else:
            self.nodes = json.loads(data)
        self.send(self.workers())

    def stop(self, wait=0.0, end=False):
        """Stop the agent and reap it, waiting up to `wait` seconds for it to end before SIGKILL.
        With `end` it revokes its lease first, so this node's keys go; without, they stay till
        the lease runs out (a daemon that takes over puts them again before)."""
        if self.agent is None:
            return
        pid, channel = self.agent
        self.agent = None
        self.events.unwatch(channel.fileno())
        if end:
            try:
                channel.send(MultinodeAgent.END)
            except OSError:
                pass
        channel.close()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG)[0] == 0:
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


class ContainerRegistry:
    """The containers the daemon serves (OCI id -> Hosted) and their filters (notify fd ->
    Handed): it adopts a container's processes as a runtime sends them, works out what the
    container's annotations add to the daemon's flags, hands each filter to the pool's
    workers (its home's, or every worker's once it is busy) and frees a filter once every
    process of it has exited.  A container come or gone changes the keeper's snapshot and
    Routes' rows: both are told where it happens."""

    def __init__(self, events, base, table, reservations, pool, keeper, routes):
        self.events, self.base, self.table, self.reservations = events, base, table, reservations
        self.pool, self.keeper, self.routes = pool, keeper, routes
        self.containers = {}        # OCI id -> Hosted
        self.filters = {}           # notify fd -> Handed
        self.serial = 0             # the last Handed.key
        self.limit = LogLimit()

    def on_container_process(self, data, fds, bypass=None):
        """A runtime's message: container state JSON + SCM_RIGHTS fds; through the socket of
        `bypass` (an API's Bypass) if not None."""
        notify_fd = None
        try:
            message = json.loads(data)
            names = message["fds"]
            state = message.get("state") or {}
            cid = str(state.get("id") or message.get("pid") or "unknown")
            index = names.index("seccompFd")
            if len(fds) != len(names):
                raise ValueError("%d fds for %d names" % (len(fds), len(names)))
            notify_fd = fds[index]
            if os.readlink("/proc/self/fd/%d" % notify_fd) != "anon_inode:seccomp notify":
                raise ValueError("fd seccompFd is not a seccomp notify fd")
        except Exception as e:  # whatever the message holds, it costs its fds, nothing more
            self.limit.log(logging.ERROR, "dropping a malformed runtime message: %s", e)
            for fd in fds:
                os.close(fd)
            return
        for fd in fds:
            if fd != notify_fd:
                os.close(fd)
        self.host_filter(notify_fd, cid, message.get("pid"), message.get("metadata"),
                         lambda: bypass.settings if bypass is not None else self.container_settings(cid, state))

    def host_filter(self, notify_fd, cid, pid, metadata, settings, counters=None):
        """Serve notify fd `notify_fd` of container `cid`: its settings() are asked for if the
        container is new, and its counters start at `counters` (a hand-over's) if given."""
        hosted = self.containers.get(cid)
        if hosted is None:
            try:
                slot = self.table.allocate()
            except Error as e:
                log.error("container %s: not served: %s", cid[:12], e)
                os.close(notify_fd)
                return
            if counters:
                self.table.row(0, slot)[:] = array.array("q", counters)
            home = self.pool.least_busy()
            hosted = self.containers[cid] = Hosted(cid, slot, home, settings(), pid)
            hosted.addresses = self.routes.addresses(pid)
            home.containers.add(cid)
        self.serial += 1
        handed = self.filters[notify_fd] = Handed(self.serial, notify_fd, cid, pid, metadata)
        hosted.filters.add(notify_fd)
        # Watched for the end of the filter only: no EPOLLIN, so that its
        # notifications wake its servers alone.
        self.events.watch(notify_fd, 0, lambda _events: self.on_filter_gone(notify_fd))
        for worker in self.servers_of(hosted):
            worker.hand(handed, hosted)
        self.keeper.changed()       # a filter to hold, maybe a container
        self.routes.update()        # a container's addresses and ports

    def container_settings(self, cid, state):
        """What container `cid`'s annotations add to the daemon's flags, as its servers are
        handed it (JSON), or None for nothing.  Its own published ports are claimed here,
        for as long as it lives."""
        short = cid[:12]
        try:
            ignore, specs, ignore_bind = parse_annotations(state.get("annotations"))
        except Error as e:
            log.error("container %s: its annotations are ignored: %s", short, e)
            return None
        if not (ignore or specs or ignore_bind):
            return None
        own, in_use, unreserved = self.reservations.claim(cid, [m for spec in specs for m in parse_publish(spec)])
        for mapping, holder in in_use:
            log.warning("container %s: %r: host port %d/%s is published by %s: its bind of port %d gets "
                        "EADDRINUSE", short, mapping, mapping.host_port, mapping.proto,
                      "the daemon's -p" if holder is None else "container " + holder[:12], mapping.container_port)
        for mapping, why in unreserved:
            log.warning("container %s: %r: host port %d/%s cannot be reserved yet (%s): retried every second; "
                        "the container's bind gets the host's answer", short, mapping, mapping.host_port,
                        mapping.proto, why)
        if own:
            log.info("container %s: publishing %s", short, ", ".join(map(repr, own)))
        return settings_json(ignore, own, [(m.proto, m.container_port) for m, _holder in in_use], ignore_bind)

    def servers_of(self, hosted):
        return self.pool.workers if hosted.shared else (hosted.home,)

    def hand(self, hosted, worker):
        """Every filter of `hosted` to `worker`."""
        for notify_fd in hosted.filters:
            worker.hand(self.filters[notify_fd], hosted)

    def on_filter_gone(self, notify_fd):
        """A filter every process of which has exited: free it here and in its servers."""
        self.events.unwatch(notify_fd)
        handed = self.filters.pop(notify_fd)
        hosted = self.containers[handed.cid]
        if hosted.shared:
            for worker in self.pool.workers:
                worker.drop(handed.key)
        os.close(notify_fd)
        hosted.filters.discard(notify_fd)
        if not hosted.filters:
            del self.containers[hosted.cid]
            hosted.home.containers.discard(hosted.cid)
            log.info("container %s: gone (%s)", hosted.cid[:12], format_counters(self.table.totals(hosted.slot)))
            self.table.release(hosted.slot)
            self.reservations.release(hosted.cid)
        self.keeper.changed()       # a filter not to hold, maybe a container and its ports
        self.routes.update()        # maybe a container's addresses and ports

    def share(self, cid):
        """A worker found container `cid` busy, and receives on its filters as one of several now."""
        hosted = self.containers.get(cid)
        if hosted is None or hosted.shared:
            return
        hosted.shared = True
        for worker in self.pool.workers:
            if worker is not hosted.home:
                self.hand(hosted, worker)
        log.info("container %s: busy, now served by %d workers", cid[:12], len(self.pool.workers))

    def handle_anew(self, key, notif):
        """A notification a dead process had taken and not answered: to the container's home
        worker, which handles it as if it had just received it."""
        handed = next((handed for handed in self.filters.values() if handed.key == key), None)
        if handed is not None:
            self.containers[handed.cid].home.handle_anew(key, notif)

    def notify_fds(self):
        """{filter key: notify fd}, to answer what a dead worker left (answer_orphans)."""
        return {handed.key: handed.notify_fd for handed in self.filters.values()}

    def worker_replaced(self, old, new, anew):
        """Worker `new` took dead `old`'s place: it gets the routes, and every filter `old` served,
        and handles `anew` what `old` had taken."""
        self.routes.send([new])
        for hosted in self.containers.values():
            if hosted.home is old:
                hosted.home = new
            if hosted.home is new or hosted.shared:
                self.hand(hosted, new)
        for key, notif in anew:
            self.handle_anew(key, notif)

    def rehome(self):
        """After a hand-over that failed, the pool serving anew: each container to one worker."""
        for worker in self.pool.workers:
            worker.containers.clear()
        for hosted in self.containers.values():
            hosted.home, hosted.shared = self.pool.least_busy(), False
            hosted.home.containers.add(hosted.cid)
            self.hand(hosted, hosted.home)

    def status(self):
        """Every container served, for `bypass4netns.py status`."""
        containers = []
        for hosted in self.containers.values():
            settings = hosted.settings or {}
            published = self.base.with_container(hosted.settings).publish.values()
            containers.append({
                "id": hosted.cid,
                "processes": [self.filters[fd].pid for fd in hosted.filters],
                "worker": self.pool.index_of(hosted.home),
                "shared": hosted.shared,
                "published": [repr(m) for m in published],
                "port_in_use": ["%d/%s" % (port, proto) for proto, port in settings.get("in_use", ())],
                "ignore": settings.get("ignore", []),
                "counters": dict(zip(COUNTERS, self.table.totals(hosted.slot))),
            })
        return containers

    def log_counters(self):
        if not self.containers:
            log.warning("no containers")
        for hosted in self.containers.values():
            log.warning("container %s: %s", hosted.cid[:12], format_counters(self.table.totals(hosted.slot)))

    def close(self):
        for notify_fd in self.filters:
            os.close(notify_fd)
        self.filters.clear()


API_HEAD_MAX = 16 << 10     # bytes of a request line and headers
API_BODY_MAX = 1 << 20      # bytes of a request body
SPEC_FIELDS = frozenset(("id", "socketPath", "pidFilePath", "logFilePath", "portMapping", "ignoreSubnets",
                         "ignoreBind"))
PORT_SPEC_FIELDS = frozenset(("protos", "parentIP", "parentPort", "childIP", "childPort"))
HTTP_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                411: "Length Required", 413: "Payload Too Large", 500: "Internal Server Error"}


class ApiError(Error):
    """A request the API refuses: its HTTP status and the message of its JSON body."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def parse_http_request(data):
    """(method, path, body) of one HTTP/1.x request in `data`, None while it is incomplete;
    ApiError(400, 411 or 413) for one that cannot be served."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        if len(data) > API_HEAD_MAX:
            raise ApiError(400, "request headers longer than %d bytes" % API_HEAD_MAX)
        return None
    lines = bytes(data[:head_end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ApiError(400, "not an HTTP/1.x request line: %r" % lines[0][:100])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ApiError(400, "malformed header line: %r" % line[:100])
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise ApiError(411, "a chunked body: send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise ApiError(400, "Content-Length is not a number") from None
    if length < 0:
        raise ApiError(400, "Content-Length is negative")
    if length > API_BODY_MAX:
        raise ApiError(413, "a body longer than %d bytes" % API_BODY_MAX)
    body = data[head_end + 4:]
    if len(body) < length:
        return None
    return parts[0], parts[1].split("?", 1)[0], bytes(body[:length])


def format_http_response(status, payload=None):
    """A complete HTTP/1.1 response, the connection closed after it; `payload` as JSON."""
    body = b"" if payload is None else json.dumps(payload).encode()
    head = "HTTP/1.1 %d %s\r\nContent-Length: %d\r\nConnection: close\r\n" % (
        status, HTTP_REASONS.get(status, "Error"), len(body))
    if payload is not None:
        head += "Content-Type: application/json\r\n"
    return head.encode() + b"\r\n" + body


def parse_bypass_spec(body):
    """A BypassSpec (JSON) -> (the spec as JSON-able values, ignore values, publish specs,
    ignore_bind); ApiError(400) naming what is wrong.  A port mapping's childIP is accepted
    and not used: a published port is the container port, on whatever address it binds."""
    try:
        spec = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "malformed JSON: %s" % e) from None
    if not isinstance(spec, dict):
        raise ApiError(400, "a BypassSpec is a JSON object")
    unknown = sorted(set(spec) - SPEC_FIELDS)
    if unknown:
        raise ApiError(400, "unknown field(s) %s" % ", ".join(map(repr, unknown)))
    sid = spec.get("id")
    if not isinstance(sid, str) or not sid or "/" in sid:
        raise ApiError(400, "id: a non-empty string without '/' is needed")
    for field in ("socketPath", "pidFilePath", "logFilePath"):
        if not isinstance(spec.get(field) or "", str):
            raise ApiError(400, "%s: not a string" % field)
    if not os.path.isabs(spec.get("socketPath") or ""):
        raise ApiError(400, "socketPath: an absolute path is needed")
    if not isinstance(spec.get("ignoreBind", False), bool):
        raise ApiError(400, "ignoreBind: not a boolean")
    ignore = spec.get("ignoreSubnets") or []
    if not (isinstance(ignore, list) and all(isinstance(item, str) for item in ignore)):
        raise ApiError(400, "ignoreSubnets: not a list of strings")
    try:
        parse_ignore(ignore)
    except Error as e:
        raise ApiError(400, "ignoreSubnets: %s" % e) from None
    publish = []
    mappings = spec.get("portMapping") or []
    if not isinstance(mappings, list):
        raise ApiError(400, "portMapping: not a list")
    for mapping in mappings:
        publish.extend(port_spec_to_publish(mapping))
    try:
        build_publish_table(publish)
    except Error as e:
        raise ApiError(400, "portMapping: %s" % e) from None
    return spec, ignore, publish, spec.get("ignoreBind", False)


def port_spec_to_publish(mapping):
    """One PortSpec -> its -p values, one per protocol."""
    if not isinstance(mapping, dict) or set(mapping) - PORT_SPEC_FIELDS:
        raise ApiError(400, "portMapping: an entry is not a PortSpec: %s" % json.dumps(mapping)[:200])
    protos = mapping.get("protos") or ["tcp"]
    host_ip = mapping.get("parentIP") or ""
    ports = (mapping.get("parentPort"), mapping.get("childPort"))
    if not (isinstance(protos, list) and all(p in ("tcp", "udp") for p in protos)):
        raise ApiError(400, "portMapping: protos must be a list of tcp and udp")
    if not (isinstance(host_ip, str) and isinstance(mapping.get("childIP") or "", str)
            and all(isinstance(port, int) and not isinstance(port, bool) for port in ports)):
        raise ApiError(400, "portMapping: parentIP and childIP are strings, parentPort and childPort numbers")
    if host_ip in ("0.0.0.0", "::"):
        host_ip = ""
    if ":" in host_ip:
        host_ip = "[%s]" % host_ip
    specs = ["%s%s%d:%d/%s" % (host_ip, ":" if host_ip else "", ports[0], ports[1], proto) for proto in protos]
    try:
        for spec in specs:
            parse_publish(spec)
    except Error as e:
        raise ApiError(400, "portMapping: %s" % e) from None
    return specs


class Bypass:
    """A BypassSpec the API started: its socket, and what containers that come through it get."""

    __slots__ = ("spec", "listener", "settings")

    def __init__(self, spec, settings):
        self.spec = spec            # as posted, for GET
        self.settings = settings    # as ContainerRegistry.container_settings() gives them
        self.listener = None


class ApiFrontEnd:
    """The bypass4netnsd API (nerdctl's: HTTP/1.1 over a unix socket, above): its socket, and
    the Bypasses it started, each a runtimes' socket whose containers get its ports and
    subnets.  Its sockets are accepted and read by the RuntimeListener.  A Bypass started or
    stopped changes the keeper's snapshot (a socket, claimed ports): the keeper link is told.
    Routes are not: a Bypass's ports are its containers' settings, routed as theirs."""

    def __init__(self, runtime, reservations, keeper):
        self.runtime, self.reservations, self.keeper = runtime, reservations, keeper
        self.listener = None        # the API socket's Listener, once it listens
        self.bypasses = {}          # BypassSpec id -> Bypass

    def listen(self, api_path):
        self.listener = self.runtime.add_listener(api_path, self.on_api_data)

    def adopt(self, sock, path):
        """A previous daemon's API socket (--take-over)."""
        self.listener = self.runtime.adopt(sock, path, self.on_api_data)

    def adopt_bypass(self, sock, path, spec, settings):
        """A previous daemon's Bypass, its socket listening (--take-over)."""
        self.bypasses[spec["id"]] = bypass = Bypass(spec, settings)
        bypass.listener = self.runtime.adopt(sock, path, self.runtime.on_runtime_data, bypass)

    def listeners(self):
        return [listener for listener in [self.listener] + [bypass.listener for bypass in self.bypasses.values()]
                if listener is not None]

    def on_api_data(self, message):
        """An HTTP request on the API socket: answered once complete, then the connection closed."""
        ended = False
        try:
            while not ended:
                data = message.conn.recv(1 << 16)
                ended = not data
                message.data += data
                if len(message.data) > API_HEAD_MAX + API_BODY_MAX:
                    raise ApiError(413, "a request longer than %d bytes" % (API_HEAD_MAX + API_BODY_MAX))
        except (BlockingIOError, InterruptedError):
            pass
        except ApiError as e:
            self.answer_api(message, e.status, {"message": str(e)})
            return
        except OSError as e:
            self.runtime.end_message(message, "API client: %s" % e.strerror)
            return
        try:
            request = parse_http_request(message.data)
            if request is None:
                if not ended:
                    return  # more to come
                if not message.data:
                    self.runtime.end_message(message, None)  # connected and said nothing
                    return
                raise ApiError(400, "the request ended before it was complete")
            status, payload = self.api_call(*request)
        except ApiError as e:
            status, payload = e.status, {"message": str(e)}
        except Exception as e:  # a bug: this request fails, the daemon serves on
            log.exception("API request failed")
            status, payload = 500, {"message": "internal error: %s" % e}
        self.answer_api(message, status, payload)

    def answer_api(self, message, status, payload):
        reply = format_http_response(status, payload)
        try:
            sent = message.conn.send(reply)
        except OSError:
            sent = 0
        self.runtime.end_message(message, None if sent == len(reply) else "API client: the answer was cut")

    def api_call(self, method, path, body):
        """(HTTP status, JSON payload or None) of one API request."""
        if path == "/v1/bypass":
            if method == "GET":
                return 200, [self.bypass_status(bypass) for bypass in self.bypasses.values()]
            if method == "POST":
                return 201, self.bypass_status(self.start_bypass(*parse_bypass_spec(body)))
            raise ApiError(405, "%s %s: GET or POST" % (method, path))
        if path.startswith("/v1/bypass/"):
            if method != "DELETE":
                raise ApiError(405, "%s %s: DELETE" % (method, path))
            sid = path[len("/v1/bypass/"):]
            if sid not in self.bypasses:
                raise ApiError(400, "no bypass with id %r" % sid)
            self.stop_bypass(sid)
            return 200, None
        raise ApiError(404, "no such path: %s" % path)

    def bypass_status(self, bypass):
        return {"id": bypass.spec["id"], "pid": self.keeper.main_pid, "spec": bypass.spec}

    def start_bypass(self, spec, ignore, publish, ignore_bind):
        """A BypassSpec's socket, listening before this returns (the runtime connects at once):
        containers that come through it get its ports and subnets, held until it is stopped."""
        sid = spec["id"]
        if sid in self.bypasses:
            raise ApiError(400, "a bypass with id %r exists" % sid)
        directory = os.path.dirname(spec["socketPath"])
        if not os.path.isdir(directory):
            raise ApiError(400, "socketPath: no directory %s" % directory)
        owner = "bypass " + sid
        own, in_use, unreserved = self.reservations.claim(owner, [m for p in publish for m in parse_publish(p)])
        if in_use:
            self.reservations.release(owner)
            raise ApiError(400, "portMapping: host port %s published already" % ", ".join(
                "%d/%s" % (m.host_port, m.proto) for m, _holder in in_use))
        for mapping, why in unreserved:
            log.warning("bypass %s: %r: host port cannot be reserved yet (%s): retried every second", sid, mapping, why)
        bypass = Bypass(spec, settings_json(ignore, own, (), ignore_bind))
        try:
            bypass.listener = self.runtime.add_listener(spec["socketPath"], self.runtime.on_runtime_data, bypass)
            if spec.get("pidFilePath"):
                with open(spec["pidFilePath"], "w") as f:
                    f.write("%d\n" % self.keeper.main_pid)
        except (OSError, Error) as e:
            if bypass.listener is not None:
                self.runtime.close_listener(bypass.listener)
            self.reservations.release(owner)
            raise ApiError(400, "socketPath %s: %s" % (spec["socketPath"], getattr(e, "strerror", None) or e)) from None
        self.bypasses[sid] = bypass
        self.keeper.changed()       # a socket and ports to hold
        log.info("bypass %s: listening on %s%s", sid, spec["socketPath"],
                 "; publishing " + ", ".join(map(repr, own)) if own else "")
        return bypass

    def stop_bypass(self, sid):
        """Close a Bypass's socket, remove its pid file, free its ports; its containers' calls
        go on being answered (the daemon holds their notify fds already)."""
        bypass = self.bypasses.pop(sid)
        self.runtime.close_listener(bypass.listener)
        if bypass.spec.get("pidFilePath"):
            try:
                os.unlink(bypass.spec["pidFilePath"])
            except FileNotFoundError:
                pass
        self.reservations.release("bypass " + sid)
        self.keeper.changed()       # a socket and ports no more
        log.info("bypass %s: stopped", sid)

    def close(self):
        """Stop every Bypass, then listen no more."""
        for sid in list(self.bypasses):
            self.stop_bypass(sid)
        if self.listener is not None:
            self.runtime.close_listener(self.listener)


class HandOver:
    """The daemon's state as a next daemon takes it over: every listening socket, notify fd,
    held port and container.  Sent (send_state) to a --take-over successor that asks on the
    runtimes' socket, or left to the keeper (SIGUSR2; and each KeeperLink snapshot); received
    (receive_state) by adopt_sockets() and adopt_containers() in the daemon that takes over."""

    def __init__(self, runtime, api, registry, pool, reservations, table, keeper):
        self.runtime, self.api, self.registry, self.pool = runtime, api, registry, pool
        self.reservations, self.table, self.keeper = reservations, table, keeper

    def listeners(self):
        return [listener for listener in [self.runtime.listener] + self.api.listeners() if listener is not None]

    def snapshot(self, ref, for_keeper=False):
        """What a next daemon needs to serve on, as JSON-able values; each fd in it is
        ref(fd, ident)'s answer, ident naming the fd for as long as it is open here.  For the
        keeper, the published ports held are named, not their sockets (a duplicate of one
        would keep it bound when a container is lent it), and the counters are left to the
        table it shares."""
        def ref_socket(sock):
            return ref(sock.fileno(), "s%d" % os.fstat(sock.fileno()).st_ino)  # an inode per socket
        return {
            "listeners": [{"fd": ref_socket(listener.sock), "path": listener.path,
                           "api": listener is self.api.listener, "bypass": None if listener.bypass is None else {
                               "spec": listener.bypass.spec, "settings": listener.bypass.settings}}
                          for listener in self.listeners()],
            "filters": [{"fd": ref(notify_fd, "f%d" % handed.key), "key": handed.key, "cid": handed.cid,
                         "pid": handed.pid, "metadata": handed.metadata}
                        for notify_fd, handed in self.registry.filters.items()],
            "containers": {cid: {"settings": hosted.settings, "slot": hosted.slot,
                                 "counters": None if for_keeper else self.table.totals(hosted.slot)}
                           for cid, hosted in self.registry.containers.items()},
            "claims": [{"mapping": mapping_to_json(mapping), "owner": owner,
                        "binder": self.reservations.bound.get(self.reservations.key(mapping)),
                        "fd": ref_socket(sock) if sock is not None and not for_keeper else None}
                       for mapping, owner, sock in self.reservations.export()],
        }

    def send(self, conn):
        """A new daemon asks for everything on `conn`: stop serving, send it every socket, notify
        fd, held port and container; whether it took them (then this daemon exits, leaving all
        of them to it).  A blocking connect under way, and a call a namespace helper was
        making, is answered EINTR (a connection goes on); other calls wait in the kernel
        meanwhile."""
        log.warning("handing over to a new daemon")
        listeners = self.stop_everything()
        fds = []

        def ref(fd, _ident):
            fds.append(fd)
            return len(fds) - 1
        try:
            conn.settimeout(30)
            send_state(conn, self.snapshot(ref), fds)
            if conn.recv(len(HANDED_OVER)) != HANDED_OVER:
                raise OSError(errno.EPIPE, "the new daemon did not confirm")
        except OSError as e:
            log.error("hand-over failed (%s): serving on", e.strerror or e)
            conn.close()
            self.resume(listeners)
            return False
        conn.close()
        log.warning("handed over: %d containers, %d sockets and ports; exiting", len(self.registry.containers),
                    len(fds))
        return True

    def leave_to_keeper(self):
        """SIGUSR2: stop serving and leave everything to the keeper, which runs the script anew;
        whether it took it."""
        if self.keeper.sock is None:
            log.error("SIGUSR2: nothing to reload to: this daemon runs without a keeper (--no-keeper); "
                      "start the new version with --take-over")
            return False
        log.warning("reloading: handing everything to the keeper")
        listeners = self.stop_everything()
        if not self.keeper.sync():
            self.resume(listeners)
            return False
        return True

    def stop_everything(self):
        """Before a hand-over: accept nothing more and answer nothing more; returns the listeners."""
        listeners = self.listeners()
        self.runtime.pause(listeners)
        self.pool.stop()
        return listeners

    def resume(self, listeners):
        """After a failed hand-over: serve again, as if the workers had died."""
        self.pool.start()
        self.registry.rehome()
        for listener in listeners:
            self.runtime.watch_listener(listener)

    def adopt_sockets(self, state, fds, api_path):
        """--take-over, before the workers start: the previous daemon's sockets and ports."""
        for entry in state["listeners"]:
            sock = socket.socket(fileno=fds[entry["fd"]])
            sock.setblocking(False)
            bypass = entry["bypass"]
            if bypass is not None:
                self.api.adopt_bypass(sock, entry["path"], bypass["spec"], bypass["settings"])
            elif entry["api"] and entry["path"] != api_path:
                sock.close()  # this daemon serves no API there
                try:
                    os.unlink(entry["path"])
                except FileNotFoundError:
                    pass
            elif entry["api"]:
                self.api.adopt(sock, entry["path"])
            else:
                self.runtime.listener = self.runtime.adopt(sock, entry["path"], self.runtime.on_runtime_data)
        reservations = self.reservations
        adopted = set()
        for entry in state["claims"]:
            sock = None if entry["fd"] is None else socket.socket(fileno=fds[entry["fd"]])
            mapping = mapping_from_json(entry["mapping"])
            reservations.adopt(mapping, entry["owner"], sock, entry.get("binder"))
            adopted.add(reservations.key(mapping))
        for mapping in reservations.wanted:
            key = reservations.key(mapping)
            reservations.take(mapping)  # an adopted port a container has bound is not free: fine
            if key not in reservations.held and key not in adopted:
                log.warning("cannot reserve published port %r yet: retried every second", mapping)
        if self.runtime.listener is None:
            self.runtime.listen()
        if api_path is not None and self.api.listener is None:
            self.api.listen(api_path)

    def adopt_containers(self, state, fds):
        """--take-over, once the workers run: the previous daemon's containers and their counters."""
        containers = state["containers"]
        keys = {}           # the previous daemon's filter keys -> this one's
        for entry in state["filters"]:
            container = containers[entry["cid"]]
            self.registry.host_filter(fds[entry["fd"]], entry["cid"], entry["pid"], entry["metadata"],
                                      lambda c=container: c["settings"], container["counters"])
            keys[entry["key"]] = self.registry.serial
        for key, notif in state.get("anew", ()):
            if key in keys:
                self.registry.handle_anew(keys[key], base64.b64decode(notif))
        log.warning("took over %d containers from the previous daemon", len(containers))


class Daemon:
    """Accepts the runtimes' messages and has their notifications served: the wiring of its
    parts, and the loop they run on.

    - runtime: the RuntimeListener (its sockets, each client's message);
    - registry: the ContainerRegistry (containers, their filters, their settings);
    - pool: the WorkerPool serving the filters (one Server on this loop with
      --workers 1, else forked workers, one replaced when it dies);
    - api: the ApiFrontEnd (bypass4netnsd's API and its Bypasses);
    - hand_over: the HandOver (to a --take-over successor, to the keeper, and
      taken from either);
    - keeper: the KeeperLink, told by each part what it changed;
    - routes: Routes (--handle-c2c-connections, --multinode), told likewise.

    The daemon keeps every notify fd, the containers' counters and the
    published ports; itself it acts on signals and --exit-fd, and answers
    `status`.
    """

    def __init__(self, socket_path, ignore, auto, publish, debug=False, reserve_ports=True, workers=1,
                 table=None, inflight=None, keeper=None, c2c=False, probe_peers=True,
                 multinode=None, swap_guard=True, udp_guard=True):
        self.socket_path = socket_path
        self.events = Events()
        self.reservations = Reservations(publish.values(), reserve_ports)
        base = Settings(compile_networks(ignore), auto, publish, swap_guard=swap_guard,
                        udp_guard=udp_guard)  # every container's
        # A keeper's tables, when it has one: it reads them after this process dies.
        table = self.table = CounterTable(workers) if table is None else table
        inflight = self.inflight = InflightTable(workers) if inflight is None else inflight
        self.keeper = KeeperLink() if keeper is None else keeper
        self.exit_status = 0
        self.running = True
        self.handed_over = False
        self.signal_pipe = None
        loans = PortLoans(self.reservations, self.ports_changed)
        if workers == 1:
            self.pool = LocalPool(self.events, base, table, inflight, loans, debug)
        else:
            self.pool = ProcessPool(self.events, base, table, inflight, workers, loans, debug, lambda: self.running)
        self.routes = Routes(self.events, lambda: self.registry.containers, lambda: self.pool.workers,
                             self.reservations.bound_by, c2c, probe_peers, multinode)
        self.registry = self.pool.registry = ContainerRegistry(self.events, base, table, self.reservations,
                                                               self.pool, self.keeper, self.routes)
        self.runtime = RuntimeListener(self.events, socket_path, self.registry.on_container_process,
                                       self.on_take_over, self.status)
        self.api = ApiFrontEnd(self.runtime, self.reservations, self.keeper)
        self.hand_over = HandOver(self.runtime, self.api, self.registry, self.pool, self.reservations, table,
                                  self.keeper)
        self.keeper.attach(self.events, self.hand_over.snapshot)

    def check_kernel(self):
        sizes = get_notif_sizes()
        if sizes is None:
            return
        for struct_type, got in ((SeccompNotif, sizes.seccomp_notif),
                                 (SeccompNotifResp, sizes.seccomp_notif_resp),
                                 (SeccompData, sizes.seccomp_data)):
            if got != ctypes.sizeof(struct_type):
                raise Error("kernel's struct %s is %d bytes, this daemon knows %d"
                            % (struct_type.__name__, got, ctypes.sizeof(struct_type)))

    def listen(self, api_path=None):
        """The runtimes' socket, and the bypass4netnsd API's if asked for."""
        self.runtime.listen()
        if api_path is not None:
            self.api.listen(api_path)

    def ports_changed(self):
        """A container bound a published port, or let one go: the keeper's snapshot (who bound
        it) and Routes' rows (the daemon's -p ports a container has) change."""
        self.keeper.changed()
        self.routes.update()

    def on_take_over(self, conn):
        if self.hand_over.send(conn):
            self.handed_over = True
            self.stop()

    def hand_back(self):
        """SIGUSR2: everything to the keeper, which runs the script anew; then exit."""
        if self.hand_over.leave_to_keeper():
            self.handed_over = True
            self.exit_status = EXIT_RELOAD
            self.stop()

    def status(self):
        """The daemon, its workers and every container it serves, as JSON-able values."""
        return {"pid": self.keeper.main_pid, "daemon": os.getpid(),
                "version": __version__, "socket": self.socket_path,
                "workers": self.pool.pids(),
                "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "out_of_fds": self.runtime.out_of_fds,
                "routes": self.routes.status(),
                "containers": self.registry.status()}

    def log_counters(self):
        self.registry.log_counters()
        if self.runtime.out_of_fds:
            log.warning("daemon: out of file descriptors %d times (runtimes' connections and fds)",
                        self.runtime.out_of_fds)

    # -- signals and the loop ------------------------------------------------

    def stop(self):
        self.running = False

    def on_signal(self, signum):
        if signum == signal.SIGUSR1:
            self.log_counters()
        elif signum == signal.SIGUSR2:
            self.hand_back()
        elif signum == signal.SIGHUP:
            self.pool.refresh_auto()
        else:
            self.stop()

    def watch_exit_fd(self, exit_fd):
        """--exit-fd: stop when it reaches end of file."""
        def on_exit_fd(_events):
            try:
                if os.read(exit_fd, 4096):
                    return
            except BlockingIOError:
                return
            except OSError:
                pass
            self.stop()
        self.events.watch(exit_fd, select.EPOLLIN | select.EPOLLHUP, on_exit_fd)

    def watch_signals(self):
        self.signal_pipe = watch_signals(self.events, self.on_signal, (signal.SIGUSR2,))

    def run(self):
        def housekeeping():
            self.pool.sweep()
            if self.reservations.retry():
                self.ports_changed()  # a container let a port go
        run_loop(self.events, lambda: self.running, housekeeping,
                 lambda: self.pool.due() or self.reservations.unheld())

    def close(self):
        self.stop()
        self.routes.stop(EtcdClient.TIMEOUT + 1, end=not self.handed_over)
        self.pool.stop()
        self.registry.close()
        self.reservations.close()
        close_signal_pipe(self.signal_pipe)
        if self.handed_over:  # every socket, path and pid file is the new daemon's now
            for listener in self.hand_over.listeners():
                listener.sock.close()
        else:
            self.api.close()
            self.runtime.close()
        self.keeper.close()
        self.events.close()


# ---------------------------------------------------------------------------
# The workers: a Server each, for the filters the daemon hands it
# (Worker.hand: JSON + the notify fd over SCM_RIGHTS; ParentChannel: JSON requests back)
# ---------------------------------------------------------------------------

RECV_GUARD = 0.002      # seconds a RECV on a shared filter may wait for a notification another took


class Server:
    """Answers the notifications of the filters it is given, in one process.

    A single-process daemon has one, on its own loop; with --workers, each
    worker process runs one.  A container's filters go to one server, its
    home, until that server finds one of them busy: many threads of the
    container taking turns at trapped calls.  Then every server receives
    on them (the kernel gives each notification to one receiver), each
    counting in its own row of the container's counters.
    """

    def __init__(self, events, switcher, table, index=0, on_busy=None):
        self.events, self.switcher = events, switcher
        self.table, self.index = table, index
        self.inflight = switcher.inflight
        self.on_busy = on_busy      # callable(Container) once a filter is found busy; None: never shared
        self.containers = {}        # OCI id -> Container
        self.filters = {}           # notify fd -> Filter
        self.keys = {}              # the daemon's key of a filter -> notify fd here

    def add_filter(self, notify_fd, key, cid, slot, pid, shared=False, settings=None):
        """Serve a notify fd (ours from now on) of container `cid`, first loaded by process `pid`.

        `settings`: what the daemon found in the container's annotations
        (ContainerRegistry.container_settings), None for nothing.
        """
        container = self.containers.get(cid)
        if container is None:
            container = self.containers[cid] = Container(cid, self.table, slot, self.index,
                                                         self.switcher.base.with_container(settings))
        container.notify_fds.add(notify_fd)
        seccomp_filter = self.filters[notify_fd] = Filter(key, notify_fd, container, shared)
        self.keys[key] = notify_fd
        self.wake_ups(notify_fd, crowded=shared)
        os.set_blocking(notify_fd, False)
        self.watch(seccomp_filter)
        if not shared:
            log.info("container %s: process %s registered", container.short_id, pid)

    def watch(self, seccomp_filter):
        notify_fd = seccomp_filter.notify_fd
        # Shared, EPOLLEXCLUSIVE: a notification wakes one idle server, not all.
        mask = select.EPOLLIN | (select.EPOLLEXCLUSIVE if seccomp_filter.shared else 0)
        self.events.watch(notify_fd, mask, lambda events: self.on_notify(notify_fd, events))

    def share(self, container):
        """Receive on `container`'s filters as one of several servers."""
        for notify_fd in container.notify_fds:
            seccomp_filter = self.filters[notify_fd]
            if not seccomp_filter.shared:
                seccomp_filter.shared = seccomp_filter.turns.crowded = True
                self.wake_ups(notify_fd, crowded=True)
                self.events.unwatch(notify_fd)  # EPOLLEXCLUSIVE is set when added, never by a change
                self.watch(seccomp_filter)

    def drop(self, key):
        """The daemon saw this filter go: a shared one may never wake this server to say so."""
        notify_fd = self.keys.get(key)
        if notify_fd is not None:
            self.drop_filter(notify_fd)

    def drop_filter(self, notify_fd):
        """Every process of this filter has exited: free what it held."""
        seccomp_filter = self.filters.pop(notify_fd)
        del self.keys[seccomp_filter.key]
        container = seccomp_filter.container
        self.events.unwatch(notify_fd)
        self.switcher.pending.forget_notify_fd(notify_fd)
        os.close(notify_fd)
        container.notify_fds.discard(notify_fd)
        if not container.notify_fds:
            self.switcher.helpers.end_all(container)
            del self.containers[container.id]

    def on_notify(self, notify_fd, events):
        """One notification per wake-up (epoll is level-triggered: the next one wakes us
        again), which keeps the loop fair between containers."""
        if events & select.EPOLLIN:
            seccomp_filter = self.filters[notify_fd]
            try:
                if seccomp_filter.shared:
                    # Another server may have taken what epoll reported, and RECV
                    # ignores O_NONBLOCK: the timer's signal ends the wait.
                    signal.setitimer(signal.ITIMER_REAL, RECV_GUARD)
                    try:
                        fields = self.inflight.receive(seccomp_filter.key, notify_fd)
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                else:
                    fields = self.inflight.receive(seccomp_filter.key, notify_fd)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                # ENOENT: the target was interrupted or died before we read it.
                # Never RECV again here: with no target left it would
                # answer ENOENT forever (RECV ignores O_NONBLOCK).
                if e.errno != errno.ENOENT:
                    raise
            else:
                notif_id, tid, _flags, nr, arch, _ip, *args = fields
                turns = seccomp_filter.turns
                if tid != turns.last_tid or turns.crowded:
                    change = turns.note(tid)
                    if change is not None:
                        self.on_turns(seccomp_filter, change)
                self.inflight.begin(seccomp_filter.key, notif_id)
                self.switcher.handle(Call(seccomp_filter, notif_id, tid, args), arch, nr)
                self.inflight.end()
        if events & (select.EPOLLHUP | select.EPOLLERR):
            self.drop_filter(notify_fd)

    def handle_anew(self, key, notif):
        """A notification (struct seccomp_notif) that a dead process had taken and not answered:
        handled as if received now (Switcher.handle).  What the dead one did of it is found done
        (Call.retried: a connect already made, a bind already published)."""
        notify_fd = self.keys.get(key)
        if notify_fd is None:
            return
        notif_id, tid, _flags, nr, arch, _ip, *args = _NOTIF.unpack(notif)
        if not notif_id_valid(notify_fd, notif_id):
            return  # answered before it died, or the target stopped waiting
        self.inflight.begin(key, notif_id)
        call = Call(self.filters[notify_fd], notif_id, tid, args)
        call.retried = True
        self.switcher.handle(call, arch, nr)
        self.inflight.end()

    def on_turns(self, seccomp_filter, crowded):
        """A filter became crowded (its threads queue for this server) or calm again (Turns)."""
        if self.wake_ups(seccomp_filter.notify_fd, crowded):
            log.debug("container %s: filter %d %s", seccomp_filter.container.short_id, seccomp_filter.key,
                      "crowded: answers wake its threads where they last ran" if crowded
                      else "calm: answers wake its threads on the server's CPU")
        if crowded and self.on_busy is not None and not seccomp_filter.shared:
            self.share(seccomp_filter.container)
            self.on_busy(seccomp_filter.container)

    @staticmethod
    def wake_ups(notify_fd, crowded):
        """How answers wake the filter's threads: on this server's CPU (SYNC_WAKE_UP) while it
        is calm, where each last ran while it is crowded (Turns says why).  False on kernels
        before 6.6, which know only the latter."""
        try:
            _ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, 0 if crowded else SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
        except OSError:
            return False
        return True

    def refresh_auto(self):
        for container in self.containers.values():
            container.auto_read = -1e9

    def close(self):
        self.switcher.close(self.containers.values())  # first: its calls under way are answered
        for fd in list(self.filters):
            self.events.unwatch(fd)
            os.close(fd)
        self.filters.clear()
        self.keys.clear()


class Handed:
    """A filter the daemon serves: it keeps the notify fd, to hand it to servers (again)."""

    __slots__ = ("key", "notify_fd", "cid", "pid", "metadata")

    def __init__(self, key, notify_fd, cid, pid, metadata):
        self.key, self.notify_fd, self.cid, self.pid, self.metadata = key, notify_fd, cid, pid, metadata


class Hosted:
    """A container as the daemon sees it: its counters' slot, its filters, who serves them."""

    __slots__ = ("cid", "slot", "home", "shared", "filters", "settings", "pid", "addresses")

    def __init__(self, cid, slot, home, settings, pid=None):
        self.cid, self.slot, self.home = cid, slot, home
        self.settings = settings    # ContainerRegistry.container_settings()
        self.pid = pid              # its first process, as the runtime named it (an int, or None)
        self.addresses = ()         # its own IP addresses (Routes: --handle-c2c-connections, --multinode)
        self.shared = False         # served by every worker, not just its home
        self.filters = set()        # the daemon's notify fds


class WorkerWire:
    """The two channels between the daemon and a worker process, declared once for both ends:
    SOCK_SEQPACKET pairs, one JSON array a message, [op, *arguments].

    handoff, daemon -> worker (Worker sends, WorkerProcess.on_handoff reads):
    FILTER (filter key, container id, counters slot (CounterTable), pid, shared, settings; the
    notify fd rides along, SCM_RIGHTS), DROP (key), ANEW (key, a struct
    seccomp_notif in base64), PEERS (rows, probe, nodes: PeerRoutes.set).
    An empty read: the daemon is gone.

    requests, worker -> daemon (ParentChannel asks, ProcessPool.on_worker_request
    answers OK): LEND (a mapping), BOUND or UNBOUND (a mapping, its binder),
    SHARE (a container id).  A worker's first message is READY.
    """

    __slots__ = ()

    FILTER, DROP, ANEW, PEERS = "filter", "drop", "anew", "peers"
    LEND, BOUND, UNBOUND, SHARE = "lend", "bound", "unbound", "share"
    READY = b"ready"    # every fd the worker holds at rest is open: it holds nothing of its parent's
    OK = b"ok"

    @staticmethod
    def encode(op, *arguments):
        return json.dumps([op, *arguments]).encode()

    @staticmethod
    def decode(data):
        """(op, [arguments]) of a message."""
        op, *arguments = json.loads(data)
        return op, arguments


class Worker:
    """The daemon's handle on one worker process and what it serves (WorkerWire's daemon end)."""

    __slots__ = ("index", "pid", "pidfd", "handoff", "requests", "containers")

    def __init__(self, index, pid, pidfd, handoff, requests):
        self.index, self.pid, self.pidfd = index, pid, pidfd
        self.handoff = handoff      # filters go to the worker here (SCM_RIGHTS)
        self.requests = requests    # the worker's ParentChannel asks here
        self.containers = set()     # OCI ids it is home to

    def hand(self, handed, hosted):
        message = WorkerWire.encode(WorkerWire.FILTER, handed.key, handed.cid, hosted.slot, handed.pid,
                                    hosted.shared, hosted.settings)
        self.handoff.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", handed.notify_fd))])

    def drop(self, key):
        self.handoff.send(WorkerWire.encode(WorkerWire.DROP, key))

    def handle_anew(self, key, notif):
        self.handoff.send(WorkerWire.encode(WorkerWire.ANEW, key, base64.b64encode(notif).decode()))

    def set_peers(self, rows, probe, nodes):
        self.handoff.send(WorkerWire.encode(WorkerWire.PEERS, rows, probe, nodes))

    def close(self):
        for channel in (self.handoff, self.requests):
            channel.close()
        os.close(self.pidfd)


class ParentChannel:
    """A worker's requests to its parent: the published ports it holds, and busy containers.

    Requests are synchronous (a published bind waits for the parent's
    answer): they happen once per server socket or container, not per
    connection.
    """

    def __init__(self, channel):
        self.channel = channel

    def lend(self, mapping):
        self.ask(WorkerWire.LEND, mapping_to_json(mapping))

    def end_loan(self, mapping, bound, binder):
        self.ask(WorkerWire.BOUND if bound else WorkerWire.UNBOUND, mapping_to_json(mapping), binder)

    def share(self, container):
        self.ask(WorkerWire.SHARE, container.id)

    def ask(self, op, *arguments):
        self.channel.sendall(WorkerWire.encode(op, *arguments))
        if self.channel.recv(16) != WorkerWire.OK:
            raise OSError(errno.EPIPE, "the parent process is gone")


class LocalWorker:
    """A single-process daemon's own Server, as the daemon's workers are handled."""

    __slots__ = ("index", "server", "containers")

    def __init__(self, server):
        self.index, self.server = 0, server
        self.containers = set()

    def hand(self, handed, hosted):
        self.server.add_filter(os.dup(handed.notify_fd), handed.key, handed.cid, hosted.slot, handed.pid,
                               hosted.shared, hosted.settings)

    def drop(self, key):
        self.server.drop(key)

    def handle_anew(self, key, notif):
        self.server.handle_anew(key, notif)

    def set_peers(self, rows, probe, nodes):
        self.server.switcher.routes.set(rows, probe, nodes)


HOUSEKEEPING = 1.0  # seconds between sweeps of interrupted connects and unheld ports
WORKER_START_TIMEOUT = 10.0  # seconds the daemon waits for that at start


class WorkerProcess:
    """A worker's own side: a Server for the filters its parent hands over, and its loop."""

    def __init__(self, base, debug, table, inflight, index, handoff, requests):
        self.handoff, self.requests = handoff, requests
        self.events = Events()
        parent = ParentChannel(requests)
        self.server = Server(self.events, Switcher(self.events, base, parent, inflight.writer(index), debug),
                             table, index, parent.share)
        self.running = True
        self.orphaned = False

    def on_handoff(self, _events):
        data, fds = recv_with_fds(self.handoff, 1)
        if not data:
            # The parent is gone, and PR_SET_PDEATHSIG's SIGKILL on its way (the
            # kernel closes a dying process's fds first).  Answer nothing: the
            # keeper answers what is left from the Inflight table, or, with no
            # keeper left either, the kernel does (ENOSYS).
            self.running = False
            self.orphaned = True
            return
        op, arguments = WorkerWire.decode(data)
        if op == WorkerWire.FILTER:
            self.server.add_filter(fds[0], *arguments)
        elif op == WorkerWire.DROP:
            self.server.drop(*arguments)
        elif op == WorkerWire.ANEW:
            key, notif = arguments
            self.server.handle_anew(key, base64.b64decode(notif))
        elif op == WorkerWire.PEERS:
            self.server.switcher.routes.set(*arguments)

    def on_signal(self, signum):
        if signum == signal.SIGHUP:
            self.server.refresh_auto()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.running = False

    def run(self):
        self.events.watch(self.handoff.fileno(), select.EPOLLIN, self.on_handoff)
        signal_pipe = watch_signals(self.events, self.on_signal)
        switcher = self.server.switcher
        self.requests.send(WorkerWire.READY)
        try:
            run_loop(self.events, lambda: self.running, switcher.pending.sweep, lambda: bool(switcher.pending))
        finally:
            if not self.orphaned:
                self.server.close()
            close_signal_pipe(signal_pipe)


class WorkerPool:
    """Who serves the containers' filters: the contract the daemon's parts rely on.

    `workers` are the servers, each with `index`, `containers` (the OCI ids
    it is home to) and hand(Handed, Hosted), drop(key), handle_anew(key,
    notif), set_peers(rows, probe, nodes).  A LocalPool is one Server on the
    daemon's own loop (--workers 1), a ProcessPool forked worker processes:
    nothing outside a pool asks which it is.  `registry` is the
    ContainerRegistry whose filters it serves (the Daemon sets it once both
    exist): a pool whose worker dies asks it what to hand the next one.
    """

    workers = ()
    registry = None

    def least_busy(self):
        """The server a new container's filters go to: its home."""
        return min(self.workers, key=lambda w: len(w.containers))

    def start(self):
        """Serve: before the first container, and again after stop() (a hand-over that failed)."""
        raise NotImplementedError

    def stop(self):
        """Serve nothing more (a hand-over, the end): no filter kept, no call left waiting here."""
        raise NotImplementedError

    def refresh_auto(self):
        """SIGHUP: every server reads the containers' `auto` subnets anew."""
        raise NotImplementedError

    def due(self):
        """Whether sweep() has something to do: the loop's housekeeping runs while it has."""
        raise NotImplementedError

    def sweep(self):
        """Housekeeping, every HOUSEKEEPING seconds while due()."""
        raise NotImplementedError

    def index_of(self, worker):
        """A container's home as `status` names it: the worker's index, None in one process."""
        raise NotImplementedError

    def pids(self):
        """The worker processes' pids: none in one process."""
        raise NotImplementedError


class LocalPool(WorkerPool):
    """--workers 1: one Server on the daemon's own loop, its Switcher borrowing published ports
    from the PortLoans directly."""

    def __init__(self, events, base, table, inflight, loans, debug):
        self.server = Server(events, Switcher(events, base, loans, inflight.writer(0), debug), table)
        self.workers = [LocalWorker(self.server)]

    def start(self):
        pass  # the server serves from the start: nothing to fork

    def stop(self):
        self.server.close()

    def refresh_auto(self):
        self.server.refresh_auto()

    def due(self):
        return bool(self.server.switcher.pending)

    def sweep(self):
        self.server.switcher.pending.sweep()  # interrupted connects left waiting in this loop

    def index_of(self, worker):
        return None

    def pids(self):
        return []


class ProcessPool(WorkerPool):
    """--workers N: N forked WorkerProcesses.  It answers their ParentChannel requests (a busy
    container: registry.share(); a published port: PortLoans) and replaces one that dies,
    answering what it left under way; the registry hands the new one its filters."""

    def __init__(self, events, base, table, inflight, count, loans, debug, running):
        self.events, self.base, self.table, self.inflight = events, base, table, inflight
        self.count, self.loans, self.debug = count, loans, debug
        self.running = running      # callable: False once the daemon stops (a dead worker stays dead)
        self.workers = []           # Worker

    def start(self):
        """Fork the workers and wait till each has dropped what is the parent's."""
        self.workers = [self.spawn(index) for index in range(self.count)]
        for worker in self.workers:
            if select.select([worker.requests], [], [], WORKER_START_TIMEOUT)[0]:
                worker.requests.recv(64)  # WorkerWire.READY, or nothing: a dead one is replaced

    def spawn(self, index):
        handoff, handoff_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        requests, requests_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = fork_child(lambda: self.become_worker(index, handoff_end, requests_end), "worker %d" % index,
                         keep=[handoff_end.fileno(), requests_end.fileno()])
        handoff_end.close()
        requests_end.close()
        worker = Worker(index, pid, os.pidfd_open(pid), handoff, requests)
        self.events.watch(worker.pidfd, select.EPOLLIN, lambda _events: self.on_worker_exit(worker))
        self.events.watch(requests.fileno(), select.EPOLLIN, lambda _events: self.on_worker_request(worker))
        log.info("worker %d: pid %d", index, pid)
        return worker

    def become_worker(self, index, handoff, requests):
        """In a forked worker (holding only its two channels): serve what the parent hands over."""
        WorkerProcess(self.base, self.debug, self.table, self.inflight, index, handoff, requests).run()

    def on_worker_exit(self, worker):
        """A worker died: reap it and, unless stopping, have a new one serve what it served."""
        _pid, status = os.waitpid(worker.pid, 0)
        self.forget(worker)
        if not self.running():
            return
        log.error("worker %d (pid %d) %s: replacing it", worker.index, worker.pid, describe_exit(status))
        answered, anew = answer_orphans(self.inflight, worker.index, self.registry.notify_fds())
        if answered:
            log.warning("worker %d: %d call(s) it left under way answered EINTR", worker.index, answered)
        new = self.workers[worker.index] = self.spawn(worker.index)
        new.containers = worker.containers
        self.registry.worker_replaced(worker, new, anew)

    def on_worker_request(self, worker):
        """A worker's ParentChannel: a published port to lend it or take back, a busy container."""
        try:
            data = worker.requests.recv(4096)
        except OSError:
            return
        if not data:
            return  # the worker is gone: its pidfd says so
        if data == WorkerWire.READY:
            return  # a replacement's: nobody waits for it
        op, arguments = WorkerWire.decode(data)
        if op == WorkerWire.SHARE:
            self.registry.share(*arguments)
        else:
            self.loans.answer(op, *arguments)
        worker.requests.send(WorkerWire.OK)

    def forget(self, worker):
        self.events.unwatch(worker.pidfd)
        self.events.unwatch(worker.requests.fileno())
        worker.close()

    def stop(self):
        for worker in self.workers:
            try:
                os.kill(worker.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for worker in self.workers:
            if not select.select([worker.pidfd], [], [], 5)[0]:
                os.kill(worker.pid, signal.SIGKILL)
            os.waitpid(worker.pid, 0)
            self.forget(worker)
        self.workers = []

    def refresh_auto(self):
        for worker in self.workers:
            os.kill(worker.pid, signal.SIGHUP)

    def due(self):
        return False  # a worker sweeps its own loop

    def sweep(self):
        pass

    def index_of(self, worker):
        return worker.index

    def pids(self):
        return [worker.pid for worker in self.workers]


# ---------------------------------------------------------------------------
# The namespace helpers: calls on sockets that are not IP, made as the caller
# (HelperWire: REQUEST/REPLY structs + SCM_RIGHTS)
# ---------------------------------------------------------------------------

class HelperWire:
    """The wire between a worker and a namespace helper, declared once for both ends: the
    daemon's (NamespaceHelper) and the helper's (HelperProcess).

    A SOCK_SEQPACKET pair; one message per request, one per answer.
    - READY: the helper's first words, once it has joined the namespaces: its
      root's (st_dev, st_ino), so that the daemon knows whether a caller's
      root is the helper's.
    - A request: REQUEST, the caller's groups (`count` of them, 4 bytes
      each), then the sockaddr (none for LISTEN) -- encode_call(),
      encode_ask(), decode().  SCM_RIGHTS: the socket, the caller's root if
      WITH_ROOT, its working directory if WITH_CWD, and the filter's notify
      fd if WITH_NOTIFY_FD (the first time a filter is named: the helper
      keeps it by the filter key); at most MAX_FDS.
    - A request with a notification id is a call (OPS): the helper makes it
      as the caller, answers the notification itself and sends nothing back;
      then it frees the call's Inflight slot (if not 0) by zeroing the slot's
      first cell, in memory shared with the daemon.
    - A request with none is an ask (PROBE, STAND_IN, END_STAND_IN; no
      caller's ids): the helper sends back a REPLY, 0 or -errno.  Asks are
      answered in the order they were sent.
    """

    __slots__ = ()

    OPS = {trap.name: trap.helper_op for trap in TRAPS if trap.helper_op}  # a call on the socket, as the caller
    PROBE = 4               # a TCP connect from the container's network, to see that it gets through
    STAND_IN = 5            # a listener at an address and port of the container's, for a probe
    END_STAND_IN = 6
    WITH_ROOT, WITH_CWD, WITH_NOTIFY_FD = 1, 2, 4   # REQUEST's flags: which fds ride along
    # op, flags, Inflight slot, filter key, notification id, euid, egid, umask, backlog, effective
    # capabilities, group count
    REQUEST = struct.Struct("=BBxxIQQIIIiQH")
    REPLY = struct.Struct("=i")         # an ask's answer: 0 or -errno
    READY = struct.Struct("=QQ")        # the helper's first words: its root's st_dev and st_ino
    MAX_GROUPS = 4096
    MAX_FDS = 4                         # the socket, the caller's root and working directory, a notify fd
    REQUEST_MAX = REQUEST.size + 4 * MAX_GROUPS + MAX_SOCKADDR

    @staticmethod
    def pack_groups(groups):
        """A caller's groups as a request carries them (encode_call's ids)."""
        return struct.pack("=%dI" % len(groups), *groups)

    @classmethod
    def encode_call(cls, op, flags, slot, key, notif_id, ids, backlog, raw):
        """The request for call `op` (a trapped call's name) as ids (euid, egid, umask, groups
        packed, effective capabilities) would make it."""
        euid, egid, umask, groups, caps = ids
        return (cls.REQUEST.pack(cls.OPS[op], flags, slot, key, notif_id, euid, egid, umask, backlog, caps,
                                 len(groups) // 4) + groups + raw)

    @classmethod
    def encode_ask(cls, op, raw):
        """The request for ask `op` about sockaddr `raw`."""
        return cls.REQUEST.pack(op, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0) + raw

    @classmethod
    def decode(cls, data):
        """A request -> (REQUEST's fields, the groups, the sockaddr)."""
        fields = cls.REQUEST.unpack_from(data)
        start = cls.REQUEST.size
        count = fields[-1]
        return fields, struct.unpack_from("=%dI" % count, data, start), data[start + 4 * count:]


class NamespaceHelper(HelperWire):
    """A process in a container's user, mount and network namespaces that makes the calls on its
    sockets that are not IP (connect, bind and listen on unix sockets above all), and answers
    the container's notification itself: the daemon's side of it.

    What such a call does depends on who makes it (the credentials a peer
    reads with SO_PEERCRED, the permissions on a socket file, the owner and
    mode of a new one) and where (the caller's root, working directory and
    mount namespace).  The daemon has none of that, and a CONTINUE lets the
    kernel look the fd number up again, where another thread may have put a
    host socket.  So the helper joins the namespaces once, and for each call
    takes on the caller's ids, groups and umask (and, where they matter, its
    root and working directory), makes the call on the daemon's duplicate of
    the socket, and answers the notification (SECCOMP_IOCTL_NOTIF_SEND on its
    own duplicate of the notify fd): no hop back through the daemon.  It
    keeps the caller's ids until a call needs others, which saves six
    syscalls per call for a caller that keeps its ids.  It frees the call's
    Inflight slot, in memory shared with the daemon, once it has answered.

    It is forked before it joins and is not dumpable: its memory belongs to
    the host's user namespace, so the container's root can neither ptrace it
    nor read it.  Peers see its pid (0 in the container's pid namespace)
    instead of the caller's.  For --handle-c2c-connections it also probes,
    from the container's network, whether a peer is reachable (ask()).

    This class is what the daemon keeps of a helper: its pid, its end of the
    channel (HelperWire), the container's id maps and the calls and asks it
    has not answered yet.  The helper process itself is HelperProcess.
    """

    START_TIMEOUT = 10.0    # seconds a new helper has to join the namespaces
    IDENTITIES_KEPT = 256   # callers' ids mapped into the container, by status_id_fields()

    __slots__ = ("pid", "channel", "uid_map", "gid_map", "root", "filters", "answering", "asked", "identities")

    def __init__(self, pid, channel, uid_map, gid_map, root):
        self.pid, self.channel = pid, channel
        self.uid_map, self.gid_map = uid_map, gid_map   # the container's, to name the caller's ids there
        self.root = root                                # (st_dev, st_ino) of the helper's root
        self.filters = set()                            # keys of the filters whose notify fd it has
        self.answering = collections.deque()            # (Call, Inflight slot) it answers, in order
        self.asked = collections.deque()                # on_result(0 or -errno) of each ask(), in order
        self.identities = {}                            # status_id_fields() -> inside()

    @classmethod
    def start(cls, tid, joins, cells):
        """A helper in thread `tid`'s namespaces `joins` ((name, CLONE_NEW*), ...); `cells`, the
        Inflight row it frees the slots of."""
        ns_fds = []
        ours = theirs = None
        try:
            for name, nstype in joins:
                ns_fds.append((os.open("/proc/%d/ns/%s" % (tid, name), os.O_RDONLY | os.O_CLOEXEC), nstype))
            maps = []
            for name in ("uid_map", "gid_map"):
                with open("/proc/%d/%s" % (tid, name)) as f:
                    maps.append(parse_id_map(f.read()))
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = fork_child(lambda: HelperProcess.serve(theirs, ns_fds, cells), "a namespace helper",
                             keep=[theirs.fileno(), *(fd for fd, _nstype in ns_fds)], signals=signal.SIG_DFL)
            theirs.close()
            theirs = None
            ours.settimeout(cls.START_TIMEOUT)
            ready = ours.recv(cls.READY.size)
            if len(ready) != cls.READY.size:
                raise OSError(errno.EIO, "the namespace helper did not start")
        except BaseException:
            if ours is not None:
                ours.close()
            raise
        finally:
            for fd, _nstype in ns_fds:
                os.close(fd)
            if theirs is not None:
                theirs.close()
        ours.setblocking(False)  # a helper stuck in a call must not stop the daemon's loop
        return cls(pid, ours, *maps, cls.READY.unpack(ready))

    def request(self, op, call, raw, sock_fd, thread, slot):
        """Have the helper make `op` (CONNECT, BIND or LISTEN) on `sock_fd` with sockaddr `raw`,
        as thread call.tid (its ThreadHandle if the daemon keeps one) would, and answer `call`."""
        if thread is None:
            with open("/proc/%d/status" % call.tid, "rb") as f:
                fields = status_id_fields(f.read())
        else:
            fields = thread.ids()
        ids = self.identities.get(fields)
        if ids is None:
            ids = self.inside(fields)
        fds, flags = [sock_fd], 0
        opened = []
        try:
            if raw[2:3] not in (b"", b"\0") and _FAMILY.unpack_from(raw)[0] == socket.AF_UNIX:
                # A path: resolved from the caller's root, and its working directory if relative.
                root = os.stat("/proc/%d/root" % call.tid)
                if (root.st_dev, root.st_ino) != self.root:
                    flags |= self.WITH_ROOT
                    opened.append(os.open("/proc/%d/root" % call.tid, os.O_PATH | os.O_CLOEXEC))
                if raw[2:3] != b"/":
                    flags |= self.WITH_CWD
                    opened.append(os.open("/proc/%d/cwd" % call.tid, os.O_PATH | os.O_CLOEXEC))
            fds += opened
            key = call.filter.key
            if key not in self.filters:
                flags |= self.WITH_NOTIFY_FD
                fds.append(call.notify_fd)
            request = self.encode_call(op, flags, slot, key, call.id, ids, ctypes.c_int(call.args[1]).value, raw)
            self.channel.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        finally:
            for fd in opened:
                os.close(fd)
        self.filters.add(key)
        self.answering.append((call, slot))

    def inside(self, fields):
        """The ids of status_id_fields() as the container names them: (euid, egid, umask, groups
        packed, effective capabilities), kept for the next call with the same ones."""
        euid, egid, groups, umask, caps = parse_status_ids(fields)
        if len(groups) > self.MAX_GROUPS:
            raise OSError(errno.EINVAL, "too many groups")
        inside = [map_into(self.uid_map, euid), map_into(self.gid_map, egid)]
        inside += [map_into(self.gid_map, g) for g in groups]
        if None in inside:
            raise OSError(errno.EPERM, "the caller's ids are not the container's")
        if len(self.identities) >= self.IDENTITIES_KEPT:
            self.identities.clear()
        ids = self.identities[fields] = (inside[0], inside[1], umask, self.pack_groups(inside[2:]), caps)
        return ids

    def reclaim(self, inflight):
        """Give back the Inflight slots of the calls the helper has answered (it zeroes them)."""
        answering, cells = self.answering, inflight.cells
        while answering and not cells[answering[0][1] * InflightTable.FIELDS]:
            inflight.free_slot(answering.popleft()[1])

    def ask(self, op, raw, on_result):
        """Ask for PROBE (does a TCP connect to `raw` from the container's network get through?),
        STAND_IN (a listener at `raw` in that network) or END_STAND_IN; on_result(0 or -errno)
        when it answers.  No caller's ids needed."""
        self.channel.send(self.encode_ask(op, raw))
        self.asked.append(on_result)

    def stop(self, inflight, error):
        """End the helper (ours: by its pid); the calls it had not answered get `error`, the asks
        -EIO."""
        self.channel.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        cells = inflight.cells
        for call, slot in self.answering:
            if not slot or cells[slot * InflightTable.FIELDS]:
                try:
                    notif_send(call.notify_fd, call.id, 0, -error, 0)  # ENOENT if it had answered
                except OSError:
                    pass
                inflight.end_pending(slot)
            else:
                inflight.free_slot(slot)
        self.answering.clear()
        while self.asked:
            self.asked.popleft()(-errno.EIO)


class Identity:
    """The ids a HelperProcess makes its calls with: its own, or its last caller's.

    Ids are (euid, egid, sorted groups, effective capabilities as a bit
    mask).  It keeps a caller's after a call (its real and saved ids, and
    its permitted capabilities, stay its own, so it can always take its own
    back) and changes them only when a call needs other ones.  The
    capabilities matter as much as the ids: the helper has every capability
    in the container's user namespace, and a caller whose root lacks some
    (podman's defaults, --cap-drop) must meet the same refusals through it.
    """

    __slots__ = ("own", "current", "umask", "permitted")

    def __init__(self):
        self.permitted = capabilities()[1]
        self.own = self.current = (os.geteuid(), os.getegid(), tuple(sorted(os.getgroups())), self.permitted)
        self.umask = os.umask(0o022)
        os.umask(self.umask)

    def become(self, ids):
        """Take on `ids`; OSError if the caller's cannot be taken.  A failure to take its own
        back is fatal: the helper must not go on (SystemExit)."""
        if ids == self.current:
            return
        if self.current != self.own:
            try:
                set_capabilities(self.permitted, self.permitted)  # first: what the rest takes
                os.setresuid(-1, self.own[0], -1)
                os.setresgid(-1, self.own[1], -1)
                os.setgroups(self.own[2])
            except OSError:
                raise SystemExit("a namespace helper cannot take its own ids back")
            self.current = self.own
        if ids != self.own:
            euid, egid, groups, caps = ids
            os.setgroups(groups)
            os.setresgid(-1, egid, -1)
            os.setresuid(-1, euid, -1)
            set_capabilities(caps & self.permitted, self.permitted)  # last: the ids took some
            self.current = ids

    def set_umask(self, umask):
        if umask != self.umask:
            os.umask(umask)
            self.umask = umask


class HelperProcess(HelperWire):
    """A namespace helper's own side, in the process NamespaceHelper.start forks: it joins the
    namespaces, then makes the daemon's calls as their callers and answers them, and its asks
    (stand-ins and probes), till the daemon hangs up (serve())."""

    PROBE_TIMEOUT = 0.2     # seconds

    __slots__ = ("channel", "cells", "top", "identity", "notify_fds", "stand_ins")

    def __init__(self, channel, cells, top):
        self.channel = channel
        self.cells = cells              # the worker's Inflight row, whose slots it frees
        self.top = top                  # its own root (O_PATH), to go back to after a chroot
        self.identity = Identity()
        self.notify_fds = {}            # filter key -> our duplicate of its notify fd
        self.stand_ins = {}             # sockaddr -> listener (--handle-c2c-connections' probes)

    @classmethod
    def serve(cls, channel, ns_fds, cells):
        """A helper's life: join the namespaces ns_fds ((fd, CLONE_NEW*), ...), say READY, then
        answer the requests on `channel` till the daemon hangs up; 0."""
        # Before joining: ptrace and /proc/PID/mem then need CAP_SYS_PTRACE in the
        # host's user namespace, where this process's memory was made.
        _retry(_libc.prctl, PR_SET_DUMPABLE, 0, 0, 0, 0)
        host_groups = os.getgroups()   # the daemon's, as the host names them
        for fd, nstype in ns_fds:
            setns(fd, nstype)
            os.close(fd)
        # The daemon's supplementary groups are the host's: unmapped in the container (a
        # caller sees 65534 for each), they would still open what the host's groups open
        # for a caller whose ids look like the helper's own.  None are kept; where the
        # namespace denies setgroups, only groups it maps all (so that they are what they
        # look like).
        try:
            os.setgroups([])
        except PermissionError:
            with open("/proc/self/gid_map") as f:
                gid_map = parse_id_map(f.read())
            if any(map_into(gid_map, group) is None for group in host_groups):
                raise SystemExit("a namespace helper cannot drop the host's groups") from None
        channel.setblocking(True)
        top = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        top_stat = os.fstat(top)
        helper = cls(channel, cells, top)
        channel.sendall(cls.READY.pack(top_stat.st_dev, top_stat.st_ino))
        return helper.answer_requests()

    def answer_requests(self):
        channel, cells, notify_fds = self.channel, self.cells, self.notify_fds
        while True:
            data, fds = recv_with_fds(channel, self.MAX_FDS, self.REQUEST_MAX)
            if not data:
                return 0
            request, groups, raw = self.decode(data)
            op, flags, slot, key, notif_id = request[:5]
            if flags & self.WITH_NOTIFY_FD:
                notify_fds[key] = fds.pop()
            try:
                if op == self.PROBE:
                    result = self.make_probe(raw)
                elif op == self.STAND_IN:
                    result = self.make_stand_in(raw)
                elif op == self.END_STAND_IN:
                    stand_in = self.stand_ins.pop(raw, None)
                    result = 0 if stand_in is None else stand_in.close() or 0
                elif fds and key in notify_fds:
                    result = self.make_call(request, groups, raw, fds)
                else:
                    result = -errno.EINVAL
            finally:
                for fd in fds:
                    os.close(fd)
            if not notif_id:
                channel.sendall(self.REPLY.pack(result))
                continue
            try:
                notif_send(notify_fds[key], notif_id, 0 if result < 0 else result, min(result, 0), 0)
            except (OSError, KeyError):
                pass  # gone, or never named: the daemon answers what is left
            if slot:
                cells[slot * InflightTable.FIELDS] = 0

    def make_call(self, request, groups, raw, fds):
        """One call as its caller (decode()'s request, groups and sockaddr; the fds that came with
        it); 0 or -errno."""
        op, flags, _slot, _key, _notif_id, euid, egid, umask, backlog, caps, _count = request
        identity = self.identity
        fds = iter(fds)
        sock = next(fds)
        root = next(fds) if flags & self.WITH_ROOT else None
        cwd = next(fds) if flags & self.WITH_CWD else None
        chrooted = False
        try:
            try:
                if root is not None:
                    identity.become(identity.own)  # chroot takes the helper's own capabilities
                    os.fchdir(root)
                    os.chroot(".")
                    chrooted = True
                if cwd is not None:
                    os.fchdir(cwd)
                identity.become((euid, egid, tuple(sorted(groups)), caps))
                identity.set_umask(umask)
            except OSError as e:
                return -(e.errno or errno.EPERM)
            if op == self.OPS[CONNECT]:
                return sock_call(_libc.connect, sock, raw, len(raw))
            if op == self.OPS[BIND]:
                return sock_call(_libc.bind, sock, raw, len(raw))
            return sock_call(_libc.listen, sock, ctypes.c_int(backlog))
        finally:
            if chrooted:
                identity.become(identity.own)
                os.fchdir(self.top)
                os.chroot(".")

    def make_stand_in(self, raw):
        """Listen at sockaddr `raw` (kept in stand_ins); 0 or -errno."""
        listener = socket.socket(_FAMILY.unpack_from(raw)[0], socket.SOCK_STREAM)
        result = sock_call(_libc.bind, listener.fileno(), raw, len(raw))
        if result == 0:
            listener.listen(8)
            old = self.stand_ins.pop(raw, None)
            if old is not None:
                old.close()
            self.stand_ins[raw] = listener
        else:
            listener.close()
        return result

    def make_probe(self, raw):
        """0 if a TCP connect to sockaddr `raw` succeeds within PROBE_TIMEOUT, else -errno."""
        try:
            with socket.socket(_FAMILY.unpack_from(raw)[0], socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as probe:
                result = sock_call(_libc.connect, probe.fileno(), raw, len(raw))
                if result == -errno.EINPROGRESS:
                    if not select.select([], [probe], [], self.PROBE_TIMEOUT)[1]:
                        return -errno.ETIMEDOUT
                    result = -probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                return result
        except OSError as e:
            return -(e.errno or errno.EIO)


# ---------------------------------------------------------------------------
# The multinode agent: etcd, so that the daemon never waits for it
# (JSON: the keys down, the routes up)
# ---------------------------------------------------------------------------

class EtcdClient:
    """etcd's v3 HTTP/JSON gateway (/v3/kv/*, /v3/lease/*), keys and values base64: urllib only."""

    TIMEOUT = 2.0   # seconds a request may take

    def __init__(self, url):
        self.url = url.rstrip("/")
        # No proxy: a daemon started with http_proxy set must still reach etcd itself.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post(self, path, body):
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with self.opener.open(request, timeout=self.TIMEOUT) as response:
            return json.loads(response.read() or b"{}")

    @staticmethod
    def b64(text):
        return base64.b64encode(text.encode()).decode()

    def grant(self, ttl):
        return int(self.post("/v3/lease/grant", {"TTL": ttl})["ID"])

    def keep_alive(self, lease):
        """Whether the lease still lives."""
        return int(self.post("/v3/lease/keepalive", {"ID": lease}).get("result", {}).get("TTL", 0)) > 0

    def revoke(self, lease):
        self.post("/v3/lease/revoke", {"ID": lease})

    def put(self, key, value, lease):
        self.post("/v3/kv/put", {"key": self.b64(key), "value": self.b64(value), "lease": lease})

    def delete(self, key):
        self.post("/v3/kv/deleterange", {"key": self.b64(key)})

    def prefix(self, prefix):
        """[(key, value)] of every key under `prefix`."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        kvs = self.post("/v3/kv/range", {"key": self.b64(prefix), "range_end": self.b64(end)}).get("kvs", ())
        return [(base64.b64decode(kv["key"]).decode(), base64.b64decode(kv.get("value", "")).decode())
                for kv in kvs]


class MultinodeAgent:
    """--multinode's process: it alone waits for etcd, so that the daemon never does.

    The daemon sends it the keys its containers should have (JSON {key:
    value}, whenever they change); it puts them under a lease it keeps alive,
    deletes those gone, and every REFRESH seconds reads every node's keys and
    sends back multinode_routes() when they change.  etcd down or slow: the
    daemon is sent no routes (connects go their normal way), once, with one
    warning; it is tried again every REFRESH seconds.  When the daemon stops
    (END) it revokes its lease: the keys go with it.  When the daemon dies it
    exits (it hangs up, or PR_SET_PDEATHSIG): the keys expire with the lease,
    unless the keeper's next daemon puts them again first.
    """

    END = b"end"            # the daemon's last message: it stops
    LEASE_TTL = 15          # seconds, as the Go tool's
    KEEPALIVE = 10.0        # seconds between keepalives
    REFRESH = 2.0           # seconds between reads of the other nodes' keys

    def __init__(self, channel, url, own_host):
        self.channel, self.etcd, self.own_host = channel, EtcdClient(url), own_host
        self.wanted, self.put = {}, {}  # key -> value: what the daemon wants, what etcd has of it
        self.lease = None
        self.routes = None
        self.failing = False

    def run(self):
        next_refresh = next_keepalive = 0.0
        while True:
            timeout = max(0.0, min(next_refresh, next_keepalive) - time.monotonic())
            if select.select([self.channel], [], [], timeout)[0]:
                data = self.channel.recv(1 << 20)
                if data == self.END:
                    self.end()
                    return
                if not data:
                    return  # the daemon died: its keys expire, unless a new daemon puts them again
                self.wanted = json.loads(data)
            now = time.monotonic()
            try:
                if self.lease is not None and now >= next_keepalive:
                    next_keepalive = now + self.KEEPALIVE
                    if not self.etcd.keep_alive(self.lease):
                        self.lease, self.put = None, {}  # expired (etcd was away): put anew
                self.register()
                if now >= next_refresh:
                    next_refresh = now + self.REFRESH
                    self.send_routes(multinode_routes(self.etcd.prefix(MULTINODE_PREFIX), self.own_host))
                    if self.failing:
                        self.failing = False
                        log.warning("etcd at %s answers again", self.etcd.url)
            except (OSError, ValueError, KeyError) as e:
                next_refresh = now + self.REFRESH
                if not self.failing:
                    self.failing = True
                    log.warning("etcd at %s: %s: connects to other nodes' containers go their normal way",
                                self.etcd.url, getattr(e, "reason", e))
                self.send_routes([])

    def register(self):
        if self.wanted and self.lease is None:
            self.lease, self.put = self.etcd.grant(self.LEASE_TTL), {}
        for key in [key for key in self.put if key not in self.wanted]:
            self.etcd.delete(key)
            del self.put[key]
        for key, value in self.wanted.items():
            if self.put.get(key) != value:
                self.etcd.put(key, value, self.lease)
                self.put[key] = value

    def send_routes(self, routes):
        if routes != self.routes:
            self.routes = routes
            self.channel.send(json.dumps(routes).encode())

    def end(self):
        if self.lease is not None:
            try:
                self.etcd.revoke(self.lease)
            except (OSError, ValueError):
                pass


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="bypass4netns.py",
        description="Host-speed networking for rootless containers: containers started with a "
                    "seccomp profile whose listenerPath is --socket get their TCP and UDP sockets "
                    "switched to the host network namespace, each pinned to its host interface; no "
                    "trapped call that decides where a socket goes is ever run as the container made it.",
        epilog="`bypass4netns.py status [--socket PATH] [--json]` shows what a running daemon "
               "serves.  Signals: SIGUSR1 logs each container's counters (at warning level, so "
               "without --debug too); SIGHUP re-reads the 'auto' subnets; SIGUSR2 reloads: the "
               "script file runs anew in the same process and takes everything over (systemd: "
               "ExecReload=kill -USR2 $MAINPID); SIGTERM and SIGINT remove the socket and the pid "
               "file and exit 0.  A keeper process (the pid in --pid-file) starts the daemon again "
               "if it dies.")
    parser.add_argument("--socket", metavar="PATH",
                        help="listener socket (default: $XDG_RUNTIME_DIR/bypass4netns.sock)")
    parser.add_argument("--ignore", action="append", default=[], metavar="CIDR[,CIDR...]",
                        help="destinations that stay in the container: CIDRs, or 'auto' for the "
                             "container's own interface subnets (repeatable; default 127.0.0.0/8; "
                             "loopback and unspecified addresses are never bypassed)")
    parser.add_argument("-p", "--publish", action="append", default=[],
                        metavar="[HOSTIP:]HOSTPORT[-END]:CONTAINERPORT[-END][/tcp|/udp]",
                        help="publish container ports on the host: a bind to CONTAINERPORT in a "
                             "container listens on HOSTIP:HOSTPORT of the host (IPv6 HOSTIP in "
                             "brackets; repeatable)")
    parser.add_argument("--api", action="store_true",
                        help="serve the bypass4netnsd API that nerdctl speaks (HTTP on "
                             "$XDG_RUNTIME_DIR/bypass4netnsd.sock, or --api-socket)")
    parser.add_argument("--api-socket", metavar="PATH", help="the API's socket (implies --api)")
    parser.add_argument("--take-over", action="store_true",
                        help="take every container, socket and port over from the daemon serving "
                             "--socket, which then exits (an upgrade or a new configuration with no "
                             "container restarted)")
    parser.add_argument("--no-keeper", dest="keeper", action="store_false",
                        help="no keeper process: if the daemon dies, its running containers' trapped calls "
                             "fail with ENOSYS, and SIGUSR2 does not reload")
    parser.add_argument("--no-reserve-ports", dest="reserve_ports", action="store_false",
                        help="do not hold the published host ports while no container binds them")
    parser.add_argument("--workers", type=positive_int, default=default_workers(), metavar="N",
                        help="processes that answer notifications, each serving its share of the "
                             "containers and all of them a busy one (default: one more than the CPUs this process "
                             "may run on, at most %d: %%(default)s here; 1: one process does everything)"
                             % MAX_DEFAULT_WORKERS)
    parser.add_argument("--pid-file", metavar="PATH", help="write the pid to signal here (the keeper's; the daemon's with --no-keeper)")
    parser.add_argument("--log-file", metavar="PATH", help="log here instead of stderr")
    parser.add_argument("--multinode", action="store_true",
                        help="register the ports containers publish themselves in etcd, and connect to other "
                             "nodes' containers through their hosts (README: Multi-node)")
    parser.add_argument("--multinode-etcd-address", metavar="URL",
                        help="etcd's client URL, e.g. http://198.18.0.1:2379 (with --multinode)")
    parser.add_argument("--multinode-host-address", metavar="IP",
                        help="this node's address that the other nodes reach (with --multinode)")
    parser.add_argument("--handle-c2c-connections", action="store_true",
                        help="a connect to another served container's address and port that it publishes itself "
                             "goes to that port's host side (README: Container to container)")
    parser.add_argument("--no-policy-check", dest="policy_check", action="store_false",
                        help="with --handle-c2c-connections: do not first check that the caller's own network "
                             "reaches the peer")
    parser.add_argument("--tracer", action="store_true",
                        help="accepted for the Go tool's sake: the policy check it turns on is on by default")
    parser.add_argument("--strict", action="store_true",
                        help="accepted, and changes nothing: what it asked for, that the kernel never runs a "
                             "trapped call on a socket as made, is how the daemon always works unless "
                             "--no-fd-swap-guard (README: swapping the fd)")
    parser.add_argument("--no-udp-loopback-guard", dest="udp_guard", action="store_false",
                        help="switch connected IPv4 UDP sockets too (IPv4 lookups at host speed), giving up the "
                             "guard that keeps containers' datagrams off the host's loopback: a pinned IPv4 UDP "
                             "socket sends past its pin with IP_PKTINFO (README: UDP)")
    parser.add_argument("--no-fd-swap-guard", dest="swap_guard", action="store_false",
                        help="let the kernel run connect, bind and listen on unix and netlink sockets as the "
                             "container made them (several times faster), giving up the guard against swapping "
                             "a published port's host socket in at the same fd: a hostile container can then "
                             "reach the host's loopback through it (README: swapping the fd)")
    parser.add_argument("--debug", action="store_true", help="log every decision")
    parser.add_argument("--ready-fd", type=int, metavar="FD",
                        help="write one byte to FD once the socket accepts, then close it")
    parser.add_argument("--exit-fd", type=int, metavar="FD", help="exit when FD reaches end of file")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


MAX_DEFAULT_WORKERS = 8


def default_workers():
    """One worker more than the CPUs: ADDFD sleeps until the container's thread has installed the
    fd, and another worker serves meanwhile (2 CPUs, 3 workers against 2: 20 processes of one
    container 18% faster, in each of 5 interleaved rounds; the other connect workloads level)."""
    return min(len(os.sched_getaffinity(0)) + 1, MAX_DEFAULT_WORKERS)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("%r is not a positive integer" % text)
    return value


def socket_path(parser, args):
    """--socket, or the default under $XDG_RUNTIME_DIR."""
    if args.socket is not None:
        return args.socket
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime_dir:
        parser.error("XDG_RUNTIME_DIR is not set: give --socket PATH")
    return os.path.join(runtime_dir, "bypass4netns.sock")


def format_status(status):
    """`bypass4netns.py status` as a person reads it."""
    workers = status["workers"]
    daemon = status.get("daemon", status["pid"])
    lines = ["bypass4netns.py %s, pid %d%s, on %s: %s; fd limit %d%s" % (
        status["version"], status["pid"], "" if daemon == status["pid"] else " (daemon %d)" % daemon,
        status["socket"],
        "workers %s" % " ".join(map(str, workers)) if workers else "one process", status["fd_limit"],
        ", out of fds %d times" % status["out_of_fds"] if status["out_of_fds"] else "")]
    routes = status.get("routes")
    if routes:
        parts = []
        if routes["peers"] is not None:
            parts.append("%d peer port(s) routed" % routes["peers"])
        if routes["etcd"] is not None:
            parts.append("multinode: this node %s, %d key(s) registered, %d port(s) of other nodes, etcd %s%s"
                         % (routes["host_address"], routes["registered"], routes["nodes"], routes["etcd"],
                            "" if routes["agent"] else " (agent gone)"))
        lines.append("; ".join(parts))
    if not status["containers"]:
        return "\n".join(lines + ["no containers"])
    rows = [("CONTAINER", "PROCESSES", "WORKER", "BYPASSED", "CONTAINER-NET", "REFUSED", "ERRORS", "PUBLISHED")]
    for container in status["containers"]:
        counters = container["counters"]
        worker = "all" if container["shared"] else "-" if container["worker"] is None else str(container["worker"])
        published = ",".join(container["published"] + ["%s in use" % port for port in container["port_in_use"]])
        rows.append((container["id"][:12], str(len(container["processes"])), worker, str(counters["bypassed"]),
                     str(counters["container"]), str(counters["refused"]), str(counters["errors"]), published or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def status_main(argv):
    """bypass4netns.py status [--socket PATH] [--json]: ask a running daemon what it serves."""
    parser = argparse.ArgumentParser(prog="bypass4netns.py status",
                                     description="Show the containers a running bypass4netns.py serves, "
                                                 "their published ports and counters.")
    parser.add_argument("--socket", metavar="PATH",
                        help="the daemon's socket (default: $XDG_RUNTIME_DIR/bypass4netns.sock)")
    parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    args = parser.parse_args(argv)
    path = socket_path(parser, args)
    chunks = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(path)
            client.sendall(STATUS_REQUEST)
            client.shutdown(socket.SHUT_WR)
            while True:
                chunk = client.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError as e:
        print("bypass4netns.py status: error: no daemon answers on %s: %s" % (path, e.strerror or e),
              file=sys.stderr)
        return 1
    try:
        status = json.loads(b"".join(chunks))
    except ValueError:
        print("bypass4netns.py status: error: the daemon on %s gave no status (a version without it?)" % path,
              file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    resumed = take_resume()
    if resumed is not None:  # run anew by its keeper (SIGUSR2): what was handed over, not --take-over
        args.take_over, args.ready_fd = False, None
    try:
        ignore, auto = parse_ignore(args.ignore or ["127.0.0.0/8"])
        publish = build_publish_table(args.publish)
    except Error as e:
        parser.error(str(e))
    path = socket_path(parser, args)
    api_path = args.api_socket
    if args.api and api_path is None:
        if not os.environ.get("XDG_RUNTIME_DIR"):
            parser.error("XDG_RUNTIME_DIR is not set: give --api-socket PATH")
        api_path = os.path.join(os.environ["XDG_RUNTIME_DIR"], "bypass4netnsd.sock")
    for name in ("ready_fd", "exit_fd"):
        fd = getattr(args, name)
        if fd is not None:
            try:
                os.fstat(fd)
            except OSError:
                parser.error("argument --%s: %d is not an open file descriptor" % (name.replace("_", "-"), fd))

    multinode = None
    if args.multinode:
        if not (args.multinode_etcd_address and args.multinode_host_address):
            parser.error("--multinode needs --multinode-etcd-address and --multinode-host-address")
        if not args.multinode_etcd_address.startswith(("http://", "https://")):
            parser.error("argument --multinode-etcd-address: %r is not an http:// or https:// URL"
                         % args.multinode_etcd_address)
        try:
            host = ipaddress.ip_address(args.multinode_host_address)
        except ValueError:
            parser.error("argument --multinode-host-address: %r is not an IP address" % args.multinode_host_address)
        if host.is_loopback or host.is_unspecified or host.is_multicast:
            parser.error("argument --multinode-host-address: %s is not an address other nodes reach" % host)
        multinode = (args.multinode_etcd_address, host)
    handler = logging.FileHandler(args.log_file) if args.log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.debug else logging.WARNING)
    old_limit, fd_limit = raise_fd_limit()
    log.info("file descriptor limit %d (was %d)", fd_limit, old_limit)
    if not args.swap_guard:
        log.warning("--no-fd-swap-guard: the kernel runs containers' unix and netlink calls as made; a hostile "
                    "container can reach the host's loopback through a published port's socket "
                    "(README: swapping the fd)")
    if not args.udp_guard:
        log.warning("--no-udp-loopback-guard: containers' connected IPv4 UDP sockets are switched; a hostile "
                    "container can send datagrams to the host's loopback with IP_PKTINFO (README: UDP)")

    def new_daemon(table=None, inflight=None, keeper=None):
        return Daemon(path, ignore, auto, publish, debug=args.debug, reserve_ports=args.reserve_ports,
                      workers=args.workers, table=table, inflight=inflight, keeper=keeper,
                      c2c=args.handle_c2c_connections, probe_peers=args.policy_check,
                      multinode=multinode, swap_guard=args.swap_guard, udp_guard=args.udp_guard)

    def serve(daemon, handed):
        return serve_daemon(daemon, args, api_path, handed, None)  # the keeper tells --ready-fd

    if not args.keeper:
        return serve_daemon(new_daemon(), args, api_path, None, args.ready_fd)
    keeper = Keeper(argv, args.workers, new_daemon, serve, args.pid_file)
    try:
        return keeper.run(resumed, args.ready_fd)
    finally:
        keeper.close()
        if args.pid_file:
            remove_pid_file(args.pid_file)


def serve_daemon(daemon, args, api_path, handed, ready_fd):
    """Run `daemon` till it stops: from `handed` (a keeper's), from the daemon serving its socket
    (--take-over), or anew; the exit status."""
    try:
        daemon.check_kernel()
        if handed is None and args.take_over:
            try:
                handed = receive_hand_over(daemon.socket_path)
            except OSError as e:
                raise Error("no daemon to take over from on %s: %s" % (daemon.socket_path, e.strerror or e)) from None
        if handed is not None:
            daemon.hand_over.adopt_sockets(*handed, api_path)
        else:
            daemon.reservations.reserve_all()
            daemon.listen(api_path)
    except (Error, OSError) as e:
        print("bypass4netns.py: error: %s" % e, file=sys.stderr)
        return 1
    own_pid_file = args.pid_file if daemon.keeper.sock is None else None  # else the keeper's pid is in it
    if own_pid_file:
        write_pid_file(own_pid_file)
    try:
        daemon.pool.start()
        daemon.routes.start()
        if handed is not None:
            daemon.hand_over.adopt_containers(*handed)
        daemon.watch_signals()  # before --ready-fd: from then on a signal is an event
        if args.exit_fd is not None:
            daemon.watch_exit_fd(args.exit_fd)
        daemon.keeper.sync()  # the keeper holds every fd before anyone is told it is ready
        if ready_fd is not None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
        if daemon.keeper.sock is None:
            sd_notify("READY=1\nMAINPID=%d" % os.getpid())
        log.info("listening on %s", daemon.socket_path)
        daemon.run()
    finally:
        daemon.close()
        if own_pid_file:
            remove_pid_file(own_pid_file)
    return daemon.exit_status


def write_pid_file(path):
    with open(path, "w") as f:
        f.write("%d\n" % os.getpid())


def remove_pid_file(path):
    """Remove the pid file if it still names this process (not the next daemon's, --take-over)."""
    try:
        with open(path) as f:
            ours = f.read().strip() == str(os.getpid())
        if ours:
            os.unlink(path)
    except FileNotFoundError:
        pass


if __name__ == "__main__":
    sys.exit(main())


