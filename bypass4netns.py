#!/usr/bin/env python3
"""bypass4netns.py: host-speed networking for rootless containers.

A container started with a seccomp profile whose listenerPath names this
daemon's socket hands the daemon its seccomp user-notification fd.  The daemon
then answers the few syscalls that decide where a socket goes (connect, bind,
and the sends that carry a destination): for a destination that is not
ignored it creates a socket in the host's network namespace, connects or binds
it itself with the address it validated, and installs it at the container's
fd number (SECCOMP_IOCTL_NOTIF_ADDFD).  From then on the data path is the host
kernel's.  Everything else proceeds in the container's own network namespace.

Single file, standard library only, Linux >= 5.9, Python >= 3.9.
"""

import argparse
import ctypes
import errno
import fcntl
import heapq
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import time

__version__ = "0.1.0"

log = logging.getLogger("bypass4netns")

# ---------------------------------------------------------------------------
# Kernel ABI (include/uapi/linux/seccomp.h, audit.h, socket.h)
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
SO_ATTACH_FILTER = 26
SO_LOCK_FILTER = 44                         # a socket filter nobody can change or remove


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


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


for _struct, _size in ((SeccompData, 64), (SeccompNotif, 80), (SeccompNotifResp, 24),
                       (SeccompNotifAddfd, 24), (SeccompNotifSizes, 6), (SockFilter, 8)):
    assert ctypes.sizeof(_struct) == _size, _struct.__name__

# A classic BPF socket filter that drops every packet from a loopback source
# (127.0.0.0/8, ::1).  Locked onto each switched client socket, it keeps the
# host's loopback services out of its reach whatever address the socket is
# later pointed at (a handshake never completes, no reply arrives).
BPF_LDB_ABS, BPF_LDW_ABS, BPF_AND_K, BPF_JEQ_K, BPF_RET_K = 0x30, 0x20, 0x54, 0x15, 0x06
SKF_NET_OFF = 0xFFF00000                    # -0x100000: offsets from the network header
_DROP, _ACCEPT = 0, 0xFFFFFFFF
NO_LOOPBACK_FILTER = (
    # (code, jt, jf, k)                                     # instruction index
    (BPF_LDB_ABS, 0, 0, SKF_NET_OFF),                       # 0  version << 4 | IHL
    (BPF_AND_K, 0, 0, 0xF0),                                # 1
    (BPF_JEQ_K, 3, 0, 0x60),                                # 2  IPv6: to 6
    (BPF_LDW_ABS, 0, 0, SKF_NET_OFF + 12),                  # 3  IPv4 source
    (BPF_AND_K, 0, 0, 0xFF000000),                          # 4
    (BPF_JEQ_K, 8, 9, 0x7F000000),                          # 5  127/8: drop, else accept
    (BPF_LDW_ABS, 0, 0, SKF_NET_OFF + 8),                   # 6  IPv6 source, word 0
    (BPF_JEQ_K, 0, 7, 0),                                   # 7
    (BPF_LDW_ABS, 0, 0, SKF_NET_OFF + 12),                  # 8  word 1
    (BPF_JEQ_K, 0, 5, 0),                                   # 9
    (BPF_LDW_ABS, 0, 0, SKF_NET_OFF + 16),                  # 10 word 2
    (BPF_JEQ_K, 0, 3, 0),                                   # 11
    (BPF_LDW_ABS, 0, 0, SKF_NET_OFF + 20),                  # 12 word 3
    (BPF_JEQ_K, 0, 1, 1),                                   # 13 ::1: drop, else accept
    (BPF_RET_K, 0, 0, _DROP),                               # 14
    (BPF_RET_K, 0, 0, _ACCEPT),                             # 15
)

# Trapped syscalls by (audit arch, number).  A notification of any other
# arch or number is never decoded: it continues untouched.
CONNECT, BIND, SENDTO, SENDMSG, SENDMMSG = "connect", "bind", "sendto", "sendmsg", "sendmmsg"
SOCKETCALL = "socketcall"
_GENERIC_NUMBERS = {CONNECT: 203, BIND: 200, SENDTO: 206, SENDMSG: 211, SENDMMSG: 269}
SYSCALL_NUMBERS = {
    # arch: ({name: nr}, pointer size of the ABI)
    AUDIT_ARCH_X86_64: ({CONNECT: 42, BIND: 49, SENDTO: 44, SENDMSG: 46, SENDMMSG: 307}, 8),
    AUDIT_ARCH_I386: ({CONNECT: 362, BIND: 361, SENDTO: 369, SENDMSG: 370, SENDMMSG: 345}, 4),
    AUDIT_ARCH_AARCH64: (_GENERIC_NUMBERS, 8),
    AUDIT_ARCH_RISCV64: (_GENERIC_NUMBERS, 8),
    AUDIT_ARCH_ARM: ({CONNECT: 283, BIND: 282, SENDTO: 290, SENDMSG: 296, SENDMMSG: 374}, 4),
}
X32_NUMBERS = {CONNECT: 42, BIND: 49, SENDTO: 44, SENDMSG: 518, SENDMMSG: 538}
# i386's socketcall(2) multiplexer, which libseccomp traps along with the
# direct calls: call number -> (syscall, argument count).
SYS_SOCKETCALL_I386 = 102
SOCKETCALLS = {2: (BIND, 3), 3: (CONNECT, 3), 11: (SENDTO, 6), 16: (SENDMSG, 3), 20: (SENDMMSG, 4)}

# seccomp(2) itself, for SECCOMP_GET_NOTIF_SIZES, by `uname -m`.
SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "riscv64": 277, "i686": 354,
               "i386": 354, "armv7l": 383, "armv8l": 383}

# What the daemon answers: syscall name -> OCI seccomp "args" filters (all
# must match).  seccomp-gen.py reads this table.
SECCOMP_NOTIFY_RULES = (
    (CONNECT, ()),
    (BIND, ()),
    (SENDTO, ({"index": 4, "value": 0, "op": "SCMP_CMP_NE"},)),  # only with a destination
    (SENDMSG, ()),
    (SENDMMSG, ()),
    (SOCKETCALL, ()),  # i386 only: its calls carry their arguments in memory
)

# struct msghdr of a 64-bit and of a 32-bit ABI: name, namelen, iov, iovlen,
# control, controllen, flags; then mmsghdr.msg_len right after it.
MSGHDR_LAYOUT = {8: struct.Struct("=QI4xQQQQi4x"), 4: struct.Struct("=IIIIIIi")}
IOVEC_LAYOUT = {8: struct.Struct("=QQ"), 4: struct.Struct("=II")}
CMSGHDR_LAYOUT = {8: struct.Struct("=Qii"), 4: struct.Struct("=Iii")}
UIO_MAXIOV = 1024
MAX_DATAGRAM = 1 << 18                      # a UDP send this long is refused by any kernel
MAX_SOCKADDR = 128                          # sizeof(struct sockaddr_storage)

_SOCKADDR_IN = struct.Struct("!HH4s")       # family is host order: read separately
_SOCKADDR_IN6 = struct.Struct("!HHI16s")     # then sin6_scope_id, host order
_TIMEVAL = struct.Struct("=qq")
_U64 = struct.Struct("=Q")
_FAMILY = struct.Struct("=H")               # sa_family_t, host order
_AF_UNSPEC = _FAMILY.pack(socket.AF_UNSPEC)

# ---------------------------------------------------------------------------
# Thin syscall wrappers: OSError with errno, EINTR retried
# ---------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t


def _retry(call, *args):
    """Run a libc call until it is not interrupted; raise OSError on failure."""
    while True:
        ret = call(*args)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def _ioctl(fd, request, arg):
    """fcntl.ioctl, retried on EINTR; a writable `arg` gets what the kernel writes back."""
    while True:
        try:
            return fcntl.ioctl(fd, request, arg)
        except InterruptedError:
            continue


def pidfd_getfd(pidfd, targetfd):
    """A duplicate, close-on-exec, of fd `targetfd` of the process `pidfd` names."""
    return _retry(_libc.syscall, ctypes.c_long(SYS_pidfd_getfd), ctypes.c_int(pidfd),
                  ctypes.c_int(targetfd), ctypes.c_uint(0))


def read_memory(pid, address, length):
    """Read `length` bytes at `address` in process `pid`; EFAULT when short."""
    buf = ctypes.create_string_buffer(length)
    local = IoVec(ctypes.cast(buf, ctypes.c_void_p), length)
    remote = IoVec(address, length)
    got = _retry(_libc.process_vm_readv, ctypes.c_int(pid), ctypes.byref(local), ctypes.c_ulong(1),
                 ctypes.byref(remote), ctypes.c_ulong(1), ctypes.c_ulong(0))
    if got != length:
        raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
    return buf.raw


class SockaddrReader:
    """read_memory for the hot path: one preallocated buffer, no per-call allocations."""

    def __init__(self, size=MAX_SOCKADDR):
        self.buffer = ctypes.create_string_buffer(size)
        self.local = IoVec(ctypes.cast(self.buffer, ctypes.c_void_p), size)
        self.remote = IoVec(0, 0)
        self.args = (ctypes.byref(self.local), ctypes.c_ulong(1), ctypes.byref(self.remote),
                     ctypes.c_ulong(1), ctypes.c_ulong(0))

    def read(self, pid, address, length):
        self.local.iov_len = self.remote.iov_len = length
        self.remote.iov_base = address
        if _retry(_libc.process_vm_readv, pid, *self.args) != length:
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        return self.buffer.raw[:length]


def write_memory(pid, address, data):
    buf = ctypes.create_string_buffer(data, len(data))
    local = IoVec(ctypes.cast(buf, ctypes.c_void_p), len(data))
    remote = IoVec(address, len(data))
    _retry(_libc.process_vm_writev, ctypes.c_int(pid), ctypes.byref(local), ctypes.c_ulong(1),
           ctypes.byref(remote), ctypes.c_ulong(1), ctypes.c_ulong(0))


def sock_call(call, fd, *args):
    """connect/bind/sendto with a raw sockaddr, exactly as validated; returns -errno or result."""
    while True:
        ret = call(fd, *args)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            return -err


class SocketFilter:
    """A classic BPF program ready for setsockopt(SO_ATTACH_FILTER), then locked."""

    def __init__(self, program):
        self.instructions = (SockFilter * len(program))(*(SockFilter(*i) for i in program))
        self.fprog = bytes(SockFprog(len(program), self.instructions))  # points into self.instructions

    def attach(self, sock):
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, self.fprog)
        sock.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)


def get_notif_sizes():
    """The kernel's struct sizes, or None where seccomp(2)'s number is unknown."""
    nr = SYS_SECCOMP.get(os.uname().machine)
    if nr is None:
        return None
    sizes = SeccompNotifSizes()
    _retry(_libc.syscall, ctypes.c_long(nr), ctypes.c_uint(SECCOMP_GET_NOTIF_SIZES),
           ctypes.c_uint(0), ctypes.byref(sizes))
    return sizes


def recv_with_fds(sock, maxfds=16):
    """One recvmsg: (data, [fds]).  Every received fd is ours to close."""
    data, ancdata, _flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_SPACE(maxfds * 4))
    fds = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack("%di" % (len(payload) // 4), payload[:len(payload) // 4 * 4]))
    return data, fds


# ---------------------------------------------------------------------------
# Address policy: pure functions, no syscalls
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


def decode_sockaddr(raw):
    """A sockaddr as read from the target -> (ip_address, port), or None.

    None means the bytes name no IP destination the daemon can judge
    (AF_UNSPEC, another family, too short); v4-mapped IPv6 addresses come
    back as the IPv4 address they carry.
    """
    if len(raw) < 2:
        return None
    family = int.from_bytes(raw[:2], sys.byteorder)
    if family == socket.AF_INET and len(raw) >= 16:
        _fam, port, addr = _SOCKADDR_IN.unpack_from(raw)
        return ipaddress.IPv4Address(addr), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        _fam, port, _flow, addr = _SOCKADDR_IN6.unpack_from(raw)
        if addr[:12] == _MAPPED_PREFIX:
            return ipaddress.IPv4Address(addr[12:]), port
        return ipaddress.IPv6Address(addr), port
    return None


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


def sockaddr_to_tuple(raw):
    """A raw sockaddr_in/in6 -> the address tuple Python's socket calls take."""
    family = int.from_bytes(raw[:2], sys.byteorder)
    if family == socket.AF_INET and len(raw) >= 16:
        _fam, port, addr = _SOCKADDR_IN.unpack_from(raw)
        return socket.inet_ntop(socket.AF_INET, addr), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        scope = struct.unpack_from("=I", raw, 24)[0] if len(raw) >= 28 else 0
        _fam, port, flow, addr = _SOCKADDR_IN6.unpack_from(raw)
        return socket.inet_ntop(socket.AF_INET6, addr), port, flow, scope
    return None


def parse_cmsgs(control, ptr):
    """A control buffer of a `ptr`-byte ABI -> [(level, type, data)] for socket.sendmsg."""
    layout = CMSGHDR_LAYOUT[ptr]
    items, offset = [], 0
    while offset + layout.size <= len(control):
        length, level, kind = layout.unpack_from(control, offset)
        if length < layout.size or offset + length > len(control):
            break
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            raise OSError(errno.EINVAL, "SCM_RIGHTS on an IP socket")
        items.append((level, kind, control[offset + layout.size:offset + length]))
        offset += (length + ptr - 1) // ptr * ptr
    return items


def container_only(ip):
    """Why `ip` always means the container itself (never bypassed), or None."""
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if ip.version == 6 and ip.is_link_local:
        return "link-local"
    return None


def ignore_reason(ip, networks):
    """Why a connect to `ip` must stay in the container, or None to bypass it."""
    reason = container_only(ip)
    if reason:
        return reason
    for net in networks:
        if ip in net:
            return "ignored %s" % net
    return None


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


def parse_proc_if_inet6(text):
    """/proc/PID/net/if_inet6 -> the IPv6 networks of the interfaces' global addresses."""
    nets = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[5] == "lo":
            continue
        addr = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        if addr.is_link_local or addr.is_loopback:
            continue
        nets.append(ipaddress.IPv6Network("%s/%d" % (addr, int(fields[2], 16)), strict=False))
    return nets


# ---------------------------------------------------------------------------
# Socket switching: one handler per trapped syscall
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
    """

    __slots__ = ("options",)

    def __init__(self, family, kind, proto):
        tag = _TCP if kind == socket.SOCK_STREAM else _UDP
        table = CARRIED_OPTIONS + (CARRIED_OPTIONS_V6 if family == socket.AF_INET6 else ())
        self.options = []
        with socket.socket(family, kind, proto) as fresh:
            for level, name, size, which in table:
                if which not in (_ANY, tag):
                    continue
                try:
                    default = fresh.getsockopt(level, name, size) if size else fresh.getsockopt(level, name)
                except OSError:
                    continue
                self.options.append((level, name, size, default))

    def differences(self, sock):
        """[(level, name, value)] where `sock` differs from a fresh socket."""
        diffs = []
        for level, name, size, default in self.options:
            value = sock.getsockopt(level, name, size) if size else sock.getsockopt(level, name)
            if value != default:
                if level == _SOL and name in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    value //= 2  # the kernel doubles what it is given
                diffs.append((level, name, value))
        return diffs


class HostSocket(socket.socket):
    """A socket in the daemon's (the host's) network namespace, about to be installed."""

    result = 0            # what its connect returned: 0 or -errno
    nonblocking = False   # what the target's socket was
    own_service = False   # connected to the container's own published port on the host's loopback


class Reservations:
    """Published host ports held open so no other host process takes them.

    A port is released just before the container's bind takes it, and taken
    again once it is free (tried by the loop every second: there is no close
    trap to tell when the container let it go).
    """

    def __init__(self, mappings, enabled):
        self.enabled = enabled
        self.held = {}                              # PortMapping key -> socket
        self.wanted = list(mappings) if enabled else []

    @staticmethod
    def key(mapping):
        return mapping.proto, mapping.host_port, mapping.host_ip

    def reserve_all(self):
        """Take every port at start; a port that cannot be taken is an Error."""
        for mapping in self.wanted:
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

    def release(self, mapping):
        sock = self.held.pop(self.key(mapping), None)
        if sock is not None:
            sock.close()

    def take(self, mapping):
        """Reserve the port again if it is free (and reservation is on)."""
        if self.enabled and self.key(mapping) not in self.held:
            try:
                self.held[self.key(mapping)] = self.bind(mapping)
            except OSError:
                pass

    def retry(self):
        for mapping in self.wanted:
            self.take(mapping)

    def unheld(self):
        return len(self.held) < len(self.wanted)

    def close(self):
        for sock in self.held.values():
            sock.close()
        self.held.clear()


class NotSwitched(Exception):
    """The socket stays in the container; the message says why (debug log)."""


def own_netns_id():
    """An id of the daemon's network namespace: its cookie (Linux >= 5.14), else its inode."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            return ("cookie", probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))
        except OSError:
            return ("inode", os.stat("/proc/self/ns/net").st_ino)


class Switcher:
    """The handlers of the trapped syscalls, one per syscall, and what they share.

    The daemon loop (Daemon, below) feeds it notifications and provides
    watch/unwatch for the fds it wants to hear about.
    """

    def __init__(self, ignore, auto, publish, debug=False, reserve_ports=True):
        self.ignore, self.auto, self.publish = ignore, auto, publish
        self.reservations = Reservations(publish.values(), reserve_ports)
        self.published_udp_ports = {m.host_port for m in publish.values() if m.proto == _UDP}
        self.no_loopback = SocketFilter(NO_LOOPBACK_FILTER)
        self.debug = debug
        self.threads = {}           # tid -> ThreadHandle, while the thread lives
        self.pending = {}           # our socket fd -> Pending
        self.timers = []            # heap of (deadline, fd) for SO_SNDTIMEO
        self.templates = {}         # (family, type, proto) -> Template
        self.pidfd_flags = PIDFD_THREAD
        self.own_netns = own_netns_id()
        self.resp = SeccompNotifResp()
        self.addfd = SeccompNotifAddfd()
        self.sockaddr = SockaddrReader()
        self.poller = select.poll()
        self.args = ()              # the arguments of the notification being handled
        self.args_in_memory = False # whether they came from the target's memory (socketcall)
        self.switched = False       # whether the notification being handled got a host socket
        handlers = {CONNECT: self.on_connect, BIND: self.on_bind, SENDTO: self.on_sendto,
                    SENDMSG: self.on_sendmsg, SENDMMSG: self.on_sendmmsg}
        self.dispatch = {}          # (arch, nr) -> (handler, pointer size)
        for arch, (numbers, ptr) in SYSCALL_NUMBERS.items():
            for name, nr in numbers.items():
                self.dispatch[(arch, nr)] = (handlers[name], ptr)
        for name, nr in X32_NUMBERS.items():
            self.dispatch[(AUDIT_ARCH_X86_64, nr | X32_SYSCALL_BIT)] = (handlers[name], 4)

    def handle(self, notify_fd, notif, container):
        """Answer one notification, exactly once, whatever happens in its handler."""
        data = notif.data
        entry = self.dispatch.get((data.arch, data.nr))
        self.args, self.args_in_memory, self.switched = data.args, False, False
        if entry is None and data.arch == AUDIT_ARCH_I386 and data.nr == SYS_SOCKETCALL_I386:
            entry = self.socketcall_args(notify_fd, notif)
            if entry is None:
                return
        if entry is None:
            self.reply(notify_fd, notif.id, flags=SECCOMP_USER_NOTIF_FLAG_CONTINUE)
            return
        handler, ptr = entry
        try:
            handler(notify_fd, notif, container, ptr)
        except Exception as e:
            container.counters["errors"] += 1
            log.exception("container %s: %s(fd %d) failed: %s", container.id[:12], handler.__name__[3:],
                          ctypes.c_int(self.args[0]).value, e)
            # Fail open, unless a host socket is in place: the kernel would
            # then run the syscall on it with whatever the memory holds now.
            try:
                if self.switched:
                    self.reply(notify_fd, notif.id, error=-errno.EIO)
                else:
                    self.let_run(notify_fd, notif, container)
            except OSError as e:
                log.error("container %s: cannot answer: %s", container.id[:12], e)

    def socketcall_args(self, notify_fd, notif):
        """i386 socketcall(2): its arguments are in the target's memory; read them once.

        Returns the (handler, pointer size) entry with self.args set to the
        copy, or None once the notification is answered here.
        """
        call = notif.data.args[0] & 0xFFFFFFFF
        name_count = SOCKETCALLS.get(call)
        if name_count is None:
            self.reply(notify_fd, notif.id, flags=SECCOMP_USER_NOTIF_FLAG_CONTINUE)
            return None
        name, count = name_count
        try:
            raw = read_memory(notif.pid, notif.data.args[1], 4 * count)
        except OSError as e:
            self.reply(notify_fd, notif.id, error=-(e.errno or errno.EFAULT))
            return None
        self.args = struct.unpack("=%dI" % count, raw) + (0,) * (6 - count)
        self.args_in_memory = True
        return self.dispatch[(AUDIT_ARCH_I386, SYSCALL_NUMBERS[AUDIT_ARCH_I386][0][name])]

    def let_run(self, notify_fd, notif, container):
        """Let the syscall run untouched in the container: the decision read nothing from memory.

        An i386 socketcall is the exception: the kernel reads its arguments,
        fd included, from memory again, so another thread could put a
        switched socket there.  It runs only in a container that holds none.
        """
        if self.args_in_memory and container.counters["bypassed"] + container.counters["published"]:
            if not container.warned_socketcall:
                container.warned_socketcall = True
                log.warning("container %s: refusing socketcall(2) on a socket the daemon cannot handle, "
                            "since the container holds switched sockets", container.id[:12])
            self.reply(notify_fd, notif.id, error=-errno.ENOSYS)
            return
        self.reply(notify_fd, notif.id, flags=SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    def reply(self, notify_fd, notif_id, val=0, error=0, flags=0):
        resp = self.resp
        resp.id, resp.val, resp.error, resp.flags = notif_id, val, error, flags
        try:
            _ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_SEND, resp)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the target gave up waiting
                raise

    def reply_result(self, notify_fd, notif_id, result):
        """Answer with a sock_call result: >= 0 is the value, < 0 an -errno."""
        if result < 0:
            self.reply(notify_fd, notif_id, error=result)
        else:
            self.reply(notify_fd, notif_id, val=result)

    def id_valid(self, notify_fd, notif_id):
        try:
            _ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_ID_VALID, _U64.pack(notif_id))
            return True
        except OSError:
            return False

    def netns_id(self, sock):
        """The same kind of id as own_netns_id's, for the namespace a socket lives in."""
        if self.own_netns[0] == "cookie":
            return ("cookie", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))
        try:
            nsfd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
        except PermissionError:
            # SIOCGSKNS needs CAP_NET_ADMIN over the socket's namespace: the
            # daemon has it over its containers' (it owns their user
            # namespaces), so a namespace it cannot open is the host's.
            return self.own_netns
        try:
            return ("inode", os.fstat(nsfd).st_ino)
        finally:
            os.close(nsfd)

    def target_socket(self, tid, fd):
        """(socket object on a duplicate of the target's fd, its family), or (None, 0).

        None when the thread is gone or the fd is not a socket.  The object's
        type and proto attributes are placeholders: the values read with
        getsockopt are used (that skips Python's slower detection).
        """
        try:
            dup = self.target_fd(tid, fd)
        except OSError:
            return None, 0
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, dup)
        try:
            family = sock.getsockopt(_SOL, socket.SO_DOMAIN)
        except OSError:  # ENOTSOCK
            sock.close()
            return None, 0
        if family != socket.AF_INET:  # Python decodes addresses by the object's family
            sock = socket.socket(family, socket.SOCK_STREAM, 0, sock.detach())
        return sock, family

    def target_fd(self, tid, fd):
        """pidfd_getfd of the target's `fd`, through the thread's cached pidfd if any."""
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
        """A ThreadHandle for `tid`, cached until the thread exits where the kernel allows."""
        if self.pidfd_flags:
            try:
                pidfd = os.pidfd_open(tid, self.pidfd_flags)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.pidfd_flags = 0  # kernel < 6.9: no thread pidfds
            else:
                thread = self.threads[tid] = ThreadHandle(tid, pidfd)
                self.watch(pidfd, select.EPOLLIN, lambda ev: self.forget_thread(tid))
                return thread
        try:
            return ThreadHandle(tid, os.pidfd_open(tid))  # only a thread-group leader has one
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        with open("/proc/%d/status" % tid) as f:
            tgid = next(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
        return ThreadHandle(tid, os.pidfd_open(tgid))

    def forget_thread(self, tid):
        thread = self.threads.pop(tid, None)
        if thread is not None:
            self.unwatch(thread.pidfd)
            thread.close()

    def template(self, family, kind, proto):
        key = (family, kind, proto)
        template = self.templates.get(key)
        if template is None:
            template = self.templates[key] = Template(family, kind, proto)
        return template

    def read_sockaddr(self, notif, addr_arg, len_arg):
        """The sockaddr the syscall names, as (raw bytes, -errno or 0)."""
        length = ctypes.c_int(self.args[len_arg]).value
        if length < 0 or length > MAX_SOCKADDR:
            return b"", -errno.EINVAL
        try:
            return self.sockaddr.read(notif.pid, self.args[addr_arg], length), 0
        except OSError as e:
            return b"", -(e.errno or errno.EFAULT)

    def judge(self, container, tid, raw):
        """(decoded destination, reason it stays in the container or None)."""
        dest = decode_sockaddr(raw)
        if dest is None:
            return None, "not an IP address"
        ip = dest[0]
        reason = ignore_reason(ip, self.ignore)
        if reason is None and self.auto:
            for net in container.auto_networks(tid, time.monotonic()):
                if ip.version == net.version and ip in net:
                    return dest, "auto-ignored %s" % net
        return dest, reason

    def debug_decision(self, container, notif, what, dest, outcome):
        if dest is None:
            where = "-"
        else:
            where = ("%s:%d" if dest[0].version == 4 else "[%s]:%d") % dest
        log.debug("container %s pid %d fd %d %s %s: %s", container.id[:12], notif.pid,
                  ctypes.c_int(self.args[0]).value, what, where, outcome)

    # -- connect -----------------------------------------------------------

    def with_address(self, notify_fd, notif, container, then):
        """connect's and bind's common start: on an IP socket, read the sockaddr once,
        check the notification is still valid, then call `then(..., sock, family,
        raw sockaddr, fd)`; anything else is answered here."""
        fd = ctypes.c_int(self.args[0]).value
        sock, family = self.target_socket(notif.pid, fd)
        if family not in (socket.AF_INET, socket.AF_INET6):
            # Not an IP socket: nothing was read from the target, so letting it run is safe.
            if sock is not None:
                sock.close()
            self.let_run(notify_fd, notif, container)
            return
        with sock:
            raw, err = self.read_sockaddr(notif, 1, 2)
            if err:
                self.reply(notify_fd, notif.id, error=err)
            elif self.id_valid(notify_fd, notif.id):
                then(notify_fd, notif, container, sock, family, raw, fd)

    def on_connect(self, notify_fd, notif, container, _ptr):
        self.with_address(notify_fd, notif, container, self.connect_checked)

    def connect_checked(self, notify_fd, notif, container, sock, family, raw, fd):
        """Switch the socket to the host and connect it there, or connect it where it is."""
        kind = sock.getsockopt(_SOL, socket.SO_TYPE)
        dest, reason = self.judge(container, notif.pid, raw)
        rewritten = reason == "loopback" and self.own_published_service(family, kind, dest)
        if rewritten:
            raw, dest = rewritten
            reason = None
        if self.netns_id(sock) == self.own_netns:
            # Already switched: it can only go where the host goes, and
            # only with the address validated here.
            if reason and dest is not None:
                container.counters["refused"] += 1
                if self.debug:
                    self.debug_decision(container, notif, "connect", dest, "refused: switched (%s)" % reason)
                self.reply(notify_fd, notif.id, error=-errno.ENETUNREACH)
                return
            self.start_connect(notify_fd, notif, container, sock, raw, dest, "switched already")
            return
        if reason is None:
            proto = sock.getsockopt(_SOL, socket.SO_PROTOCOL)
            if (kind, proto) not in _BYPASSABLE:
                reason = "not TCP or UDP"
            else:
                try:
                    host = self.switch(notify_fd, notif, fd, sock, family, kind, proto, raw,
                                       own_service=bool(rewritten))
                except NotSwitched as why:
                    reason = str(why)
                else:
                    if host is not None:
                        container.counters["bypassed"] += 1
                        if self.debug:
                            self.debug_decision(container, notif, "connect", dest, "bypassed")
                        self.answer_connect(notify_fd, notif.id, host, host.result,
                                            host.nonblocking)
                    return
        container.counters["container"] += 1
        self.start_connect(notify_fd, notif, container, sock, raw, dest, "container (%s)" % reason)

    def own_published_service(self, family, kind, dest):
        """(raw, dest) of the host side of the published port a loopback `dest` names, or None.

        A container that reaches its own published service on its loopback
        must find it where the daemon put it: on the host.
        """
        mapping = self.publish.get((_TCP if kind == socket.SOCK_STREAM else _UDP, dest[1]))
        if mapping is None:
            return None
        host_ip = mapping.host_ip or (_LOOPBACK_IP4 if dest[0].version == 4 else _LOOPBACK_IP6)
        raw = encode_sockaddr(family, host_ip, mapping.host_port)
        return None if raw is None else (raw, (host_ip, mapping.host_port))

    def switch(self, notify_fd, notif, fd, sock, family, kind, proto, raw, own_service=False):
        """A host socket like `sock`, connecting to `raw`, installed at the target's `fd`.

        It drops whatever comes from the host's loopback, unless it goes to
        the container's own published service there (`own_service`).

        Returns the host socket (with .result, the connect's, and
        .nonblocking, what the target asked), or None if the target went
        away.  Raises NotSwitched when the socket must stay in the container.
        """
        if sock.getsockopt(_SOL, socket.SO_BINDTODEVICE, 16).strip(b"\0"):
            raise NotSwitched("bound to a container device")
        bound_ip, bound_port = sock.getsockname()[:2]
        if bound_ip not in ("0.0.0.0", "::"):
            raise NotSwitched("bound to a container address")
        host = HostSocket(family, kind, proto)
        host.own_service = own_service
        try:
            self.copy_options(sock, host, family, kind, proto)
            if kind == socket.SOCK_DGRAM:
                self.deafen(host)  # a UDP socket can be pointed elsewhere at any time
            if bound_port:
                try:
                    host.bind((bound_ip, bound_port))
                except OSError as e:
                    raise NotSwitched("bound port %d not free on the host: %s"
                                      % (bound_port, e.strerror)) from None
            host.setblocking(False)
            host.result = sock_call(_libc.connect, host.fileno(), raw, len(raw))
            if host.result < 0 and host.result != -errno.EINPROGRESS:
                raise NotSwitched("host connect failed: %s" % os.strerror(-host.result))
            host.nonblocking = bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
            if not self.install(notify_fd, notif.id, host, fd, notif.pid):
                host.close()
                return None
            return host
        except BaseException:
            host.close()
            raise

    def deafen(self, host):
        """Lock the no-loopback filter onto a switched socket, where the kernel lets us.

        Defence in depth for the sockets a later connect could point anywhere:
        UDP ones, and TCP ones whose connect failed.  Not on every TCP socket:
        attaching costs a filter compilation (~30 us here, as root).
        """
        if self.no_loopback is None or not isinstance(host, HostSocket) or host.own_service:
            return
        try:
            self.no_loopback.attach(host)
        except PermissionError:
            # Some kernels refuse socket filters to unprivileged users: the
            # daemon's own checks then stand alone.
            log.info("socket filters are not permitted here: switched sockets are not filtered")
            self.no_loopback = None

    def copy_options(self, sock, host, family, kind, proto):
        for level, name, value in self.template(family, kind, proto).differences(sock):
            try:
                host.setsockopt(level, name, value)
            except OSError as e:
                raise NotSwitched("option %d/%d not settable on the host: %s"
                                  % (level, name, e.strerror)) from None

    def install(self, notify_fd, notif_id, host, fd, tid):
        """Put `host` at the target's `fd`, close-on-exec if the fd it replaces was."""
        addfd = self.addfd
        addfd.id, addfd.flags, addfd.srcfd, addfd.newfd = notif_id, SECCOMP_ADDFD_FLAG_SETFD, host.fileno(), fd
        addfd.newfd_flags = O_CLOEXEC if self.cloexec(tid, fd) else 0
        try:
            _ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_ADDFD, addfd)
            self.switched = True
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise NotSwitched("ADDFD failed: %s" % e.strerror) from None
        return True

    def cloexec(self, tid, fd):
        """Whether the target's fd is close-on-exec (only /proc tells)."""
        thread = self.threads.get(tid)
        try:
            if thread is not None:
                info_fd = os.open(str(fd), os.O_RDONLY | os.O_CLOEXEC, dir_fd=thread.fdinfo_dir())
            else:
                info_fd = os.open("/proc/%d/fdinfo/%d" % (tid, fd), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            info = os.read(info_fd, 256)
        finally:
            os.close(info_fd)
        start = info.find(b"flags:")
        return start >= 0 and bool(int(info[start + 6:info.index(b"\n", start)], 8) & O_CLOEXEC)

    def start_connect(self, notify_fd, notif, container, sock, raw, dest, outcome):
        """Connect the target's own socket to the validated `raw`, as the target asked."""
        if self.debug:
            self.debug_decision(container, notif, "connect", dest, outcome)
        nonblocking = not os.get_blocking(sock.fileno())
        if not nonblocking:
            os.set_blocking(sock.fileno(), False)
        result = sock_call(_libc.connect, sock.fileno(), raw, len(raw))
        self.answer_connect(notify_fd, notif.id, sock, result, nonblocking, borrowed=True)

    def answer_connect(self, notify_fd, notif_id, sock, result, nonblocking, borrowed=False):
        """Answer a connect that `sock` (ours, non-blocking now) started: now or when it ends.

        Takes `sock` over (closes it once answered) unless it is `borrowed`:
        then a duplicate waits for the end of the handshake.
        """
        fd = sock.fileno()
        if result == -errno.EINPROGRESS and not nonblocking and not self.writable_now(fd):
            # A blocking connect still under way: answer when the handshake
            # ends, never block the loop.
            seconds, micros = _TIMEVAL.unpack(sock.getsockopt(_SOL, socket.SO_SNDTIMEO, 16))
            deadline = time.monotonic() + seconds + micros / 1e6 if seconds or micros else None
            if borrowed:
                sock = sock.dup()
                fd = sock.fileno()
            self.pending[fd] = Pending(notify_fd, notif_id, sock)
            self.watch(fd, select.EPOLLOUT | select.EPOLLONESHOT, lambda ev: self.finish_connect(fd))
            if deadline is not None:
                heapq.heappush(self.timers, (deadline, fd))
            return
        if not nonblocking:
            os.set_blocking(fd, True)
            if result == -errno.EINPROGRESS:
                result = -sock.getsockopt(_SOL, socket.SO_ERROR)
        if not borrowed:
            if result < 0:
                self.deafen(sock)
            sock.close()
        self.reply_result(notify_fd, notif_id, result)

    def writable_now(self, fd):
        """Whether a connect under way on `fd` has ended already (loopback often has)."""
        self.poller.register(fd, select.POLLOUT)
        try:
            return bool(self.poller.poll(0))
        finally:
            self.poller.unregister(fd)

    def finish_connect(self, fd, timed_out=False):
        pending = self.pending.pop(fd, None)
        if pending is None:
            return
        self.unwatch(fd)
        with pending.sock as sock:
            os.set_blocking(fd, True)
            result = -errno.EINPROGRESS if timed_out else -sock.getsockopt(_SOL, socket.SO_ERROR)
            if result < 0:
                self.deafen(sock)
        self.reply_result(pending.notify_fd, pending.notif_id, result)

    # -- bind --------------------------------------------------------------

    def on_bind(self, notify_fd, notif, container, _ptr):
        self.with_address(notify_fd, notif, container, self.bind_checked)

    def bind_checked(self, notify_fd, notif, container, sock, family, raw, fd):
        """Bind a published port on the host, anything else where the socket is."""
        if self.netns_id(sock) == self.own_netns:
            # A switched socket is bound already; binding it anew on the
            # host would let the container pick host addresses.
            self.reply(notify_fd, notif.id, error=-errno.EINVAL)
            return
        dest = decode_sockaddr(raw)
        kind = sock.getsockopt(_SOL, socket.SO_TYPE)
        mapping = None
        if dest is not None and not dest[0].is_loopback:
            mapping = self.publish.get((_TCP if kind == socket.SOCK_STREAM else _UDP, dest[1]))
        if mapping is not None:
            proto = sock.getsockopt(_SOL, socket.SO_PROTOCOL)
            if (kind, proto) in _BYPASSABLE:
                try:
                    result = self.publish_bind(notify_fd, notif, fd, sock, family, kind, proto, mapping)
                except NotSwitched as why:
                    outcome = "container (%s)" % why
                else:
                    if result is not None:
                        container.counters["published"] += result == 0
                        if self.debug:
                            self.debug_decision(container, notif, "bind", dest, "published as %r: %s"
                                                % (mapping, os.strerror(-result) if result else "ok"))
                        self.reply_result(notify_fd, notif.id, result)
                    return
        else:
            outcome = "container"
        result = sock_call(_libc.bind, sock.fileno(), raw, len(raw))
        if self.debug:
            self.debug_decision(container, notif, "bind", dest, outcome)
        self.reply_result(notify_fd, notif.id, result)

    def publish_bind(self, notify_fd, notif, fd, sock, family, kind, proto, mapping):
        """Bind a host socket at the mapping's host side and install it at `fd`.

        Returns 0 or -errno (the host's answer, EADDRINUSE as the kernel says
        it), or None if the target went away.
        """
        raw = encode_sockaddr(family, mapping.host_ip, mapping.host_port)
        if raw is None:
            raise NotSwitched("%r cannot be bound by an IPv4 socket" % mapping)
        host = HostSocket(family, kind, proto)
        with host:
            self.copy_options(sock, host, family, kind, proto)
            self.reservations.release(mapping)
            result = sock_call(_libc.bind, host.fileno(), raw, len(raw))
            if result < 0:
                self.reservations.take(mapping)
                return result
            os.set_blocking(host.fileno(), not fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
            if not self.install(notify_fd, notif.id, host, fd, notif.pid):
                return None
            return 0

    # -- sends with a destination -------------------------------------------

    def host_datagram_socket(self, notify_fd, notif, container, flags_arg):
        """The target's socket if it is a switched UDP socket (its sends need us), else None.

        Every other case is answered here.  A socket still in the container
        runs the syscall untouched: it can reach only the container's network.
        So does a switched stream socket, whose destination argument the
        kernel ignores, except for a TCP Fast Open send, which would connect
        it anew and is refused.
        """
        sock, family = self.target_socket(notif.pid, ctypes.c_int(self.args[0]).value)
        if sock is None:
            self.let_run(notify_fd, notif, container)
            return None
        if family in (socket.AF_INET, socket.AF_INET6) and self.netns_id(sock) == self.own_netns:
            if sock.getsockopt(_SOL, socket.SO_TYPE) == socket.SOCK_DGRAM:
                return sock
            if self.args[flags_arg] & MSG_FASTOPEN:
                sock.close()
                self.reply(notify_fd, notif.id, error=-errno.EOPNOTSUPP)
                return None
        sock.close()
        self.let_run(notify_fd, notif, container)
        return None

    def refuse_send(self, container, notif, sock, raw):
        """Why a switched datagram socket may not send to `raw`, or None if it may."""
        if raw[:2] == _AF_UNSPEC:
            # IPv4 UDP sends to the address of an AF_UNSPEC sockaddr too.
            raw = _FAMILY.pack(socket.AF_INET) + raw[2:]
        dest, reason = self.judge(container, notif.pid, raw)
        if reason is None or dest is None:
            return None
        if reason == "loopback" and sock.getsockname()[1] in self.published_udp_ports:
            return None  # a published server answers its clients, wherever they are
        container.counters["refused"] += 1
        if self.debug:
            self.debug_decision(container, notif, "send", dest, "refused (%s)" % reason)
        return reason

    def on_sendto(self, notify_fd, notif, container, _ptr):
        sock = self.host_datagram_socket(notify_fd, notif, container, 3)
        if sock is None:
            return
        with sock:
            args = self.args
            length = args[2]
            if length > MAX_DATAGRAM:
                self.reply(notify_fd, notif.id, error=-errno.EMSGSIZE)
                return
            raw, err = self.read_sockaddr(notif, 4, 5)
            if not err:
                try:
                    payload = read_memory(notif.pid, args[1], length) if length else b""
                except OSError as e:
                    err = -(e.errno or errno.EFAULT)
            if err:
                self.reply(notify_fd, notif.id, error=err)
                return
            if not self.id_valid(notify_fd, notif.id):
                return
            if self.refuse_send(container, notif, sock, raw):
                self.reply(notify_fd, notif.id, error=-errno.ENETUNREACH)
                return
            result = sock_call(_libc.sendto, sock.fileno(), payload, len(payload),
                               ctypes.c_int(args[3] & 0xFFFFFFFF), raw, len(raw))
            container.counters["emulated_sends"] += 1
            self.reply_result(notify_fd, notif.id, result)

    def on_sendmsg(self, notify_fd, notif, container, ptr):
        self.send_message(notify_fd, notif, container, ptr, self.args[1], 2, None)

    def on_sendmmsg(self, notify_fd, notif, container, ptr):
        # Send the first message only: sendmmsg may send fewer than asked, and
        # callers loop on what is left.
        if self.args[2] == 0:
            self.let_run(notify_fd, notif, container)
            return
        mmsg = self.args[1]
        self.send_message(notify_fd, notif, container, ptr, mmsg, 3, mmsg + MSGHDR_LAYOUT[ptr].size)

    def send_message(self, notify_fd, notif, container, ptr, msg_addr, flags_arg, msg_len_addr):
        """sendmsg, or sendmmsg's first message, on a switched UDP socket: done here."""
        sock = self.host_datagram_socket(notify_fd, notif, container, flags_arg)
        if sock is None:
            return
        flags = self.args[flags_arg]
        with sock:
            try:
                raw, payload, ancillary = self.read_msghdr(notif.pid, msg_addr, ptr)
            except OSError as e:
                self.reply(notify_fd, notif.id, error=-(e.errno or errno.EFAULT))
                return
            if not self.id_valid(notify_fd, notif.id):
                return
            if raw:
                if self.refuse_send(container, notif, sock, raw):
                    self.reply(notify_fd, notif.id, error=-errno.ENETUNREACH)
                    return
                address = sockaddr_to_tuple(raw)
                if address is None:
                    self.reply(notify_fd, notif.id, error=-errno.EINVAL)
                    return
            try:
                if raw:
                    sent = sock.sendmsg([payload], ancillary, flags & 0xFFFFFFFF, address)
                else:
                    sent = sock.sendmsg([payload], ancillary, flags & 0xFFFFFFFF)
            except OSError as e:
                self.reply(notify_fd, notif.id, error=-(e.errno or errno.EIO))
                return
            container.counters["emulated_sends"] += 1
            if msg_len_addr is None:
                self.reply(notify_fd, notif.id, val=sent)
                return
            try:
                write_memory(notif.pid, msg_len_addr, struct.pack("=I", sent))
            except OSError:
                pass
            self.reply(notify_fd, notif.id, val=1)

    @staticmethod
    def read_msghdr(tid, address, ptr):
        """A target's struct msghdr -> (raw name, joined payload, [(level, type, data)])."""
        layout = MSGHDR_LAYOUT[ptr]
        name, namelen, iov, iovlen, control, controllen, _flags = layout.unpack(
            read_memory(tid, address, layout.size))
        raw = b""
        if name and namelen:
            if namelen > MAX_SOCKADDR:
                raise OSError(errno.EINVAL, "msg_namelen")
            raw = read_memory(tid, name, namelen)
        if iovlen > UIO_MAXIOV:
            raise OSError(errno.EMSGSIZE, "msg_iovlen")
        iov_layout = IOVEC_LAYOUT[ptr]
        chunks, total = [], 0
        if iovlen:
            table = read_memory(tid, iov, iov_layout.size * iovlen)
            for base, length in iov_layout.iter_unpack(table):
                total += length
                if total > MAX_DATAGRAM:
                    raise OSError(errno.EMSGSIZE, "message too long")
                if length:
                    chunks.append(read_memory(tid, base, length))
        ancillary = []
        if control and controllen:
            if controllen > 1 << 16:
                raise OSError(errno.ENOBUFS, "msg_controllen")
            ancillary = parse_cmsgs(read_memory(tid, control, controllen), ptr)
        return raw, b"".join(chunks), ancillary


# ---------------------------------------------------------------------------
# The per-container session
# ---------------------------------------------------------------------------

class Container:
    """One container (by OCI id): its notify fds, its `auto` subnets, counters."""

    AUTO_REFRESH = 2.0  # seconds an `auto` subnet list is trusted

    def __init__(self, cid):
        self.id = cid
        self.notify_fds = set()
        self.counters = dict.fromkeys(("bypassed", "container", "published", "refused",
                                       "emulated_sends", "errors"), 0)
        self.auto_nets = []
        self.auto_read = -1e9
        self.warned_socketcall = False

    def auto_networks(self, tid, now):
        if now - self.auto_read > self.AUTO_REFRESH:
            self.auto_read = now
            nets = []
            for name, parse in (("route", parse_proc_route), ("if_inet6", parse_proc_if_inet6)):
                try:
                    with open("/proc/%d/net/%s" % (tid, name)) as f:
                        nets.extend(parse(f.read()))
                except OSError:
                    pass
            self.auto_nets = nets
        return self.auto_nets


class Pending:
    """A blocking connect answered when its handshake ends (or SO_SNDTIMEO runs out).

    `sock` is the daemon's copy of the connecting socket, closed once answered.
    """

    __slots__ = ("notify_fd", "notif_id", "sock")

    def __init__(self, notify_fd, notif_id, sock):
        self.notify_fd, self.notif_id, self.sock = notify_fd, notif_id, sock


class ThreadHandle:
    """What the daemon keeps open for one thread of a container: its pidfd, its fdinfo dir."""

    __slots__ = ("tid", "pidfd", "_fdinfo")

    def __init__(self, tid, pidfd):
        self.tid, self.pidfd, self._fdinfo = tid, pidfd, None

    def fdinfo_dir(self):
        if self._fdinfo is None:
            self._fdinfo = os.open("/proc/%d/fdinfo" % self.tid, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._fdinfo

    def close(self):
        os.close(self.pidfd)
        if self._fdinfo is not None:
            os.close(self._fdinfo)


# ---------------------------------------------------------------------------
# The daemon loop
# ---------------------------------------------------------------------------

class Daemon(Switcher):
    """Accepts runtimes' messages and feeds every container's notifications to the Switcher."""

    def __init__(self, socket_path, ignore, auto, publish, debug=False, reserve_ports=True):
        super().__init__(ignore, auto, publish, debug, reserve_ports)
        self.socket_path = socket_path
        self.epoll = select.epoll()
        self.handlers = {}          # fd -> callable(events)
        self.containers = {}        # OCI id -> Container
        self.notify_owner = {}      # notify fd -> Container
        self.running = True
        self.listener = None
        self.signal_pipe = None
        self.notif = SeccompNotif()
        self.zero_notif = bytes(ctypes.sizeof(SeccompNotif))

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

    def listen(self):
        path = self.socket_path
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
        finally:
            os.umask(old_umask)
        listener.listen(64)
        self.listener = listener
        self.watch(listener.fileno(), select.EPOLLIN, self.on_accept)

    def watch(self, fd, events, handler):
        self.handlers[fd] = handler
        self.epoll.register(fd, events)

    def unwatch(self, fd):
        self.handlers.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    # -- runtimes' messages ------------------------------------------------

    def on_accept(self, _events):
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.error("accept on %s: %s", self.socket_path, e)
                return
            conn.setblocking(False)
            state = {"data": b"", "fds": []}
            self.watch(conn.fileno(), select.EPOLLIN | select.EPOLLRDHUP,
                       lambda ev, c=conn, s=state: self.on_runtime_data(c, s))

    def on_runtime_data(self, conn, state):
        done = False
        try:
            while True:
                data, fds = recv_with_fds(conn)
                state["fds"].extend(fds)
                if not data:
                    done = True
                    break
                state["data"] += data
                if len(state["data"]) > 1 << 20:
                    raise ValueError("message longer than 1 MiB")
        except (BlockingIOError, InterruptedError):
            pass
        except (OSError, ValueError) as e:
            log.error("dropping a runtime message: %s", e)
            done, state["data"] = True, b""
        if not done:
            try:
                json.loads(state["data"])
            except ValueError:
                return  # not complete yet
            except RecursionError:
                pass  # complete enough to be refused below
        self.unwatch(conn.fileno())
        conn.close()
        self.on_container_process(state["data"], state["fds"])

    def on_container_process(self, data, fds):
        """A runtime's message: container state JSON + SCM_RIGHTS fds."""
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
            log.error("dropping a malformed runtime message: %s", e)
            for fd in fds:
                os.close(fd)
            return
        for fd in fds:
            if fd != notify_fd:
                os.close(fd)
        container = self.containers.get(cid)
        if container is None:
            container = self.containers[cid] = Container(cid)
        container.notify_fds.add(notify_fd)
        self.notify_owner[notify_fd] = container
        try:
            _ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
        except OSError:
            pass  # kernels before 6.6: wake-ups are just slower
        os.set_blocking(notify_fd, False)
        self.watch(notify_fd, select.EPOLLIN, lambda ev, fd=notify_fd: self.on_notify(fd, ev))
        log.info("container %s: process %s registered", cid[:12], message.get("pid"))

    def drop_notify_fd(self, notify_fd):
        """Every process of this filter has exited: free what it held."""
        container = self.notify_owner.pop(notify_fd)
        self.unwatch(notify_fd)
        for fd in [fd for fd, pending in self.pending.items() if pending.notify_fd == notify_fd]:
            self.forget_pending(fd)
        os.close(notify_fd)
        container.notify_fds.discard(notify_fd)
        if not container.notify_fds:
            del self.containers[container.id]
            log.info("container %s: gone (%s)", container.id[:12], self.format_counters(container))

    def on_notify(self, notify_fd, events):
        """One notification per wake-up (epoll is level-triggered: the next one wakes us
        again), which keeps the loop fair between containers."""
        if events & select.EPOLLIN:
            notif = self.notif
            ctypes.memmove(ctypes.addressof(notif), self.zero_notif, len(self.zero_notif))
            try:
                fcntl.ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_RECV, notif, True)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                # ENOENT: the target was interrupted or died before we read it.
                # Never RECV again here: with no target left it would
                # answer ENOENT forever (RECV ignores O_NONBLOCK).
                if e.errno != errno.ENOENT:
                    raise
            else:
                self.handle(notify_fd, notif, self.notify_owner[notify_fd])
        if events & (select.EPOLLHUP | select.EPOLLERR):
            self.drop_notify_fd(notify_fd)

    def sweep_pending(self):
        """Forget blocking connects whose caller was interrupted: the connect goes on, as natively."""
        for fd, pending in list(self.pending.items()):
            if not self.id_valid(pending.notify_fd, pending.notif_id):
                self.forget_pending(fd)

    def forget_pending(self, fd):
        pending = self.pending.pop(fd)
        self.unwatch(fd)
        os.set_blocking(fd, True)
        pending.sock.close()

    # -- signals and the loop ------------------------------------------------

    def format_counters(self, container):
        return " ".join("%s=%d" % item for item in container.counters.items())

    def log_counters(self):
        if not self.containers:
            log.warning("no containers")
        for container in self.containers.values():
            log.warning("container %s: %s", container.id[:12], self.format_counters(container))

    def stop(self):
        self.running = False

    def watch_signals(self, exit_fd=None):
        """Signals and --exit-fd arrive as loop events: handlers run between notifications."""
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.signal_pipe = (rfd, wfd)
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
            signal.signal(signum, lambda *_: None)
        self.watch(rfd, select.EPOLLIN, self.on_signals)
        if exit_fd is not None:
            self.watch(exit_fd, select.EPOLLIN | select.EPOLLHUP, lambda ev: self.on_exit_fd(exit_fd))

    def on_signals(self, _events):
        try:
            signums = os.read(self.signal_pipe[0], 64)
        except BlockingIOError:
            return
        for signum in signums:
            if signum == signal.SIGUSR1:
                self.log_counters()
            elif signum == signal.SIGHUP:
                for container in self.containers.values():
                    container.auto_read = -1e9
            else:
                self.stop()

    def on_exit_fd(self, exit_fd):
        try:
            if os.read(exit_fd, 4096):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self.stop()

    def run(self):
        next_sweep = 0.0
        while self.running:
            timeout = -1
            if self.pending or self.reservations.unheld():
                timeout = 1.0
                if self.timers:
                    timeout = max(0.0, min(timeout, self.timers[0][0] - time.monotonic()))
            try:
                events = self.epoll.poll(timeout)
            except InterruptedError:
                continue
            for fd, mask in events:
                handler = self.handlers.get(fd)
                if handler is not None:
                    try:
                        handler(mask)
                    except Exception:  # a bug must cost one event, never the daemon
                        log.exception("internal error on fd %d", fd)
            if timeout < 0:
                continue
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                self.finish_connect(heapq.heappop(self.timers)[1], timed_out=True)
            if now >= next_sweep:
                next_sweep = now + 1.0
                self.sweep_pending()
                self.reservations.retry()

    def close(self):
        self.reservations.close()
        for pending in self.pending.values():
            pending.sock.close()
        for fd in list(self.notify_owner):
            os.close(fd)
        for thread in self.threads.values():
            thread.close()
        if self.signal_pipe:
            signal.set_wakeup_fd(-1)
            for fd in self.signal_pipe:
                os.close(fd)
        if self.listener is not None:
            self.listener.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        self.epoll.close()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="bypass4netns.py",
        description="Host-speed networking for rootless containers: containers started with a "
                    "seccomp profile whose listenerPath is --socket get their TCP and UDP "
                    "sockets switched to the host network namespace.",
        epilog="Signals: SIGUSR1 logs each container's counters (at warning level, so "
               "without --debug too); SIGHUP re-reads the 'auto' subnets; SIGTERM and SIGINT "
               "remove the socket and the pid file and exit 0.")
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
    parser.add_argument("--no-reserve-ports", dest="reserve_ports", action="store_false",
                        help="do not hold the published host ports while no container binds them")
    parser.add_argument("--pid-file", metavar="PATH", help="write the daemon's pid here")
    parser.add_argument("--log-file", metavar="PATH", help="log here instead of stderr")
    parser.add_argument("--debug", action="store_true", help="log every decision")
    parser.add_argument("--ready-fd", type=int, metavar="FD",
                        help="write one byte to FD once the socket accepts, then close it")
    parser.add_argument("--exit-fd", type=int, metavar="FD", help="exit when FD reaches end of file")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ignore, auto = parse_ignore(args.ignore or ["127.0.0.0/8"])
        publish = build_publish_table(args.publish)
    except Error as e:
        parser.error(str(e))
    path = args.socket
    if path is None:
        runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
        if not runtime_dir:
            parser.error("XDG_RUNTIME_DIR is not set: give --socket PATH")
        path = os.path.join(runtime_dir, "bypass4netns.sock")
    for name in ("ready_fd", "exit_fd"):
        fd = getattr(args, name)
        if fd is not None:
            try:
                os.fstat(fd)
            except OSError:
                parser.error("argument --%s: %d is not an open file descriptor" % (name.replace("_", "-"), fd))

    handler = logging.FileHandler(args.log_file) if args.log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.debug else logging.WARNING)

    daemon = Daemon(path, ignore, auto, publish, debug=args.debug, reserve_ports=args.reserve_ports)
    try:
        daemon.check_kernel()
        daemon.reservations.reserve_all()
        daemon.listen()
    except (Error, OSError) as e:
        print("bypass4netns.py: error: %s" % e, file=sys.stderr)
        return 1
    if args.pid_file:
        with open(args.pid_file, "w") as f:
            f.write("%d\n" % os.getpid())

    daemon.watch_signals(args.exit_fd)
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"1")
        os.close(args.ready_fd)
    log.info("listening on %s", path)
    try:
        daemon.run()
    finally:
        daemon.close()
        if args.pid_file:
            try:
                os.unlink(args.pid_file)
            except FileNotFoundError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
