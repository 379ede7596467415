"""Address policy and command line of bypass4netns.py: pure logic, no root needed."""

import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys

import pytest

from . import ROOT, load

b4ns = load("bypass4netns.py", "bypass4netns")


def sockaddr_in(ip, port):
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", port, socket.inet_aton(ip))


def sockaddr_in6(ip, port, scope=0):
    return (struct.pack("=H", socket.AF_INET6)
            + struct.pack("!HI16s", port, 0, socket.inet_pton(socket.AF_INET6, ip))
            + struct.pack("=I", scope))


def dest(ip, port):
    """parse_sockaddr's tuple for an address written as text."""
    address = ipaddress.ip_address(ip)
    return address.version, int(address), port


def reason(ip, networks=(), auto=()):
    """destination_reason as a log shows it, or None to bypass."""
    why, network = b4ns.destination_reason(dest(ip, 1), b4ns.compile_networks(networks),
                                           b4ns.compile_networks(auto))
    return None if why is None else b4ns.describe_reason(why, network)


# -- sockaddr decoding ------------------------------------------------------

def test_decode_ipv4():
    assert b4ns.parse_sockaddr(sockaddr_in("198.18.0.1", 5201)) == dest("198.18.0.1", 5201)


def test_decode_ipv6():
    assert b4ns.parse_sockaddr(sockaddr_in6("2001:db8::1", 80)) == dest("2001:db8::1", 80)


def test_decode_v4_mapped_is_judged_as_ipv4():
    decoded = b4ns.parse_sockaddr(sockaddr_in6("::ffff:127.0.0.1", 22))
    assert decoded == dest("127.0.0.1", 22)
    assert b4ns.destination_reason(decoded, ())[0] is b4ns.LOOPBACK


@pytest.mark.parametrize("raw", [b"", b"\x02", sockaddr_in("1.2.3.4", 1)[:8],
                                 struct.pack("=H", socket.AF_UNSPEC) + bytes(14),
                                 struct.pack("=H", socket.AF_UNIX) + b"/tmp/x\0",
                                 sockaddr_in6("2001:db8::1", 80)[:20]])
def test_decode_rejects_what_is_not_an_ip_destination(raw):
    assert b4ns.parse_sockaddr(raw) is None


def test_format_destination():
    assert b4ns.format_destination(dest("198.18.0.1", 80)) == "198.18.0.1:80"
    assert b4ns.format_destination(dest("2001:db8::1", 443)) == "[2001:db8::1]:443"
    assert b4ns.format_destination(None) == "-"


# -- what is never bypassed --------------------------------------------------

@pytest.mark.parametrize("addr,why", [("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
                                      ("0.0.0.0", "unspecified"), ("::", "unspecified"),
                                      ("::ffff:127.0.0.1", "loopback"), ("::ffff:0.0.0.0", "unspecified"),
                                      ("fe80::1", "link-local"), ("febf::1", "link-local"),
                                      # pasta's DNS forwarder and host.containers.internal (podman 5)
                                      ("169.254.1.1", "link-local"), ("169.254.1.2", "link-local"),
                                      ("::ffff:169.254.0.1", "link-local")])
def test_container_only_addresses_are_never_bypassed(addr, why):
    raw = sockaddr_in6(addr, 1) if ":" in addr else sockaddr_in(addr, 1)
    assert b4ns.describe_reason(*b4ns.destination_reason(b4ns.parse_sockaddr(raw), ())) == why


@pytest.mark.parametrize("addr", ["198.18.0.1", "2001:db8::1", "fec0::1", "128.0.0.1", "1.0.0.0", "169.253.255.255",
                                  "169.255.0.1"])
def test_other_addresses_are_bypassed(addr):
    assert reason(addr) is None


@pytest.mark.parametrize("layout,subnets,addresses,host,ignored", [
    ("slirp4netns", ["10.0.2.0/24", "fd00::/64"], ["10.0.2.100", "fd00::c8"], [],
     ["10.0.2.0/24", "fd00::/64"]),
    ("podman bridge", ["10.89.7.0/24"], ["10.89.7.2"], ["198.18.0.1"], ["10.89.7.0/24"]),
    # pasta (podman 5's default): copies of the host's addresses and routes
    ("pasta", ["198.18.0.0/24", "198.18.0.0/24", "2001:db8::/64"], ["198.18.0.1", "2001:db8::1"],
     ["198.18.0.1", "2001:db8::1", "198.18.1.1"], ["198.18.0.1/32", "2001:db8::1/128"]),
    # a bridge network next to a copied one: each as it is
    ("pasta and a bridge", ["198.18.0.0/24", "10.89.7.0/24"], ["198.18.0.1", "10.89.7.2"], ["198.18.0.1"],
     ["198.18.0.1/32", "10.89.7.0/24"]),
    ("no network", [], [], ["198.18.0.1"], []),
])
def test_auto_keeps_private_subnets_whole_and_copies_of_the_hosts_addresses_alone(layout, subnets, addresses,
                                                                                 host, ignored):
    host = {ipaddress.ip_address(a).packed for a in host}
    got = b4ns.auto_ignored([ipaddress.ip_network(n) for n in subnets], [ipaddress.ip_address(a) for a in addresses],
                            host.__contains__)
    assert got == [ipaddress.ip_network(n) for n in ignored], layout


def test_ignore_networks():
    nets, auto = b4ns.parse_ignore(["10.0.0.0/8,192.168.0.0/16", "auto", "2001:db8:ff::/48"])
    assert auto
    assert reason("10.0.2.3", nets) == "ignored 10.0.0.0/8"
    assert reason("2001:db8:ff::1", nets) == "ignored 2001:db8:ff::/48"
    assert reason("198.18.0.1", nets) is None
    assert reason("2001:db8::1", nets) is None
    # An IPv6 socket's v4-mapped destination is judged as the IPv4 address it carries.
    assert b4ns.destination_reason(b4ns.parse_sockaddr(sockaddr_in6("::ffff:10.1.2.3", 1)),
                                   b4ns.compile_networks(nets))[0] is b4ns.IGNORED


def test_auto_networks_are_told_apart():
    auto = [ipaddress.ip_network("10.0.2.0/24")]
    assert reason("10.0.2.3", (), auto) == "auto-ignored 10.0.2.0/24"
    assert reason("10.0.3.3", (), auto) is None
    assert reason("10.0.2.3", [ipaddress.ip_network("10.0.0.0/8")], auto) == "ignored 10.0.0.0/8"


@pytest.mark.parametrize("value", ["10.0.0.0/33", "banana", "1.2.3.4/8/9"])
def test_parse_ignore_rejects_bad_values(value):
    with pytest.raises(b4ns.Error, match=repr(value).replace("[", r"\[").replace(".", r"\.")):
        b4ns.parse_ignore([value])


# -- -p syntax ---------------------------------------------------------------

def mappings(spec):
    return [repr(m) for m in b4ns.parse_publish(spec)]


def test_publish_forms():
    assert mappings("8080:80") == ["8080->80/tcp"]
    assert mappings("127.0.0.1:8080:80") == ["127.0.0.1:8080->80/tcp"]
    assert mappings("[::1]:8080:80/tcp") == ["[::1]:8080->80/tcp"]
    assert mappings("5353:53/udp") == ["5353->53/udp"]
    assert mappings("8000-8002:9000-9002") == ["8000->9000/tcp", "8001->9001/tcp", "8002->9002/tcp"]


def test_same_port_for_tcp_and_udp_is_two_mappings():
    table = b4ns.build_publish_table(["53:53/tcp", "53:53/udp"])
    assert sorted(table) == [("tcp", 53), ("udp", 53)]


@pytest.mark.parametrize("spec", ["80", "0:80", "8080:65536", "a:80", "8000-8010:9000-9001", "8080:80/sctp",
                                  "1.2.3:8080:80", "[::1:8080:80", "[zz]:1:2", "1:2:3:4", "9-8:9-8"])
def test_bad_publish_values_name_the_value(spec):
    with pytest.raises(b4ns.Error) as info:
        b4ns.build_publish_table([spec])
    assert repr(spec) in str(info.value)


def test_one_host_port_on_two_host_ips():
    table = b4ns.build_publish_table(["127.0.0.1:8080:80", "198.18.0.1:8080:81"])
    assert sorted(repr(m) for m in table.values()) == ["127.0.0.1:8080->80/tcp", "198.18.0.1:8080->81/tcp"]
    with pytest.raises(b4ns.Error, match="host port 8080/tcp"):
        b4ns.build_publish_table(["127.0.0.1:8080:80", "8080:81"])


def test_conflicting_publish_values():
    with pytest.raises(b4ns.Error, match="host port 8080/tcp"):
        b4ns.build_publish_table(["8080:80", "8080:81"])
    with pytest.raises(b4ns.Error, match="container port 80/tcp"):
        b4ns.build_publish_table(["8080:80", "8081:80"])


# -- `auto`: the container's own subnets from /proc/PID/net ------------------

ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
tap0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0
tap0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""
IF_INET6 = """fd000000000000000000000000000100 02 40 00 80     tap0
fe80000000000000ccaa11fffe223344 02 40 20 80     tap0
00000000000000000000000000000001 01 80 10 80       lo
"""


def test_auto_reads_on_link_routes_and_global_v6_prefixes():
    assert b4ns.parse_proc_route(ROUTE) == [ipaddress.ip_network("10.0.2.0/24")]
    assert b4ns.parse_proc_if_inet6(IF_INET6) == [ipaddress.ip_network("fd00::/64")]


def test_auto_reads_this_machines_own_tables():
    """This kernel's real files give what proc(5) says they hold, read here another way: the
    route table's columns found by its header's names, if_inet6's addresses kept by their
    scope column (0x10 host, 0x20 link) rather than by their kind."""
    with open("/proc/self/net/route") as f:
        route = f.read()
    header, *rows = (line.split() for line in route.splitlines())
    dest, gateway, mask = (header.index(name) for name in ("Destination", "Gateway", "Mask"))
    on_link = [ipaddress.ip_network((ipaddress.IPv4Address(bytes.fromhex(row[dest])[::-1]),
                                     bin(int(row[mask], 16)).count("1")))
               for row in rows if int(row[gateway], 16) == 0 and int(row[mask], 16) != 0]
    assert b4ns.parse_proc_route(route) == on_link

    with open("/proc/self/net/if_inet6") as f:
        if_inet6 = f.read()
    global_networks = [
        ipaddress.ip_network((ipaddress.IPv6Address(bytes.fromhex(address)), int(prefix, 16)), strict=False)
        for address, _index, prefix, scope, _flags, device in (line.split() for line in if_inet6.splitlines())
        if device != "lo" and int(scope, 16) not in (0x10, 0x20)]
    assert b4ns.parse_proc_if_inet6(if_inet6) == global_networks


# -- where switched sockets are pinned ------------------------------------------

def rtattr(kind, data):
    return struct.pack("=HH", 4 + len(data), kind) + data + bytes(-len(data) % 4)


def newaddr(family, index, *attrs):
    body = struct.pack("=BBBBI", family, 24, 0, 0, index) + b"".join(rtattr(*a) for a in attrs)
    return struct.pack("=IHHII", 16 + len(body), b4ns.RTM_NEWADDR, 2, 1, 0) + body


def test_an_rtnetlink_address_dump_is_read_as_address_and_interface():
    v4 = socket.inet_aton("198.18.0.1")
    peer = socket.inet_aton("198.18.0.9")
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    # IPv4's own address is IFA_LOCAL (IFA_ADDRESS is the peer on a point-to-point link).
    data = (newaddr(socket.AF_INET, 1, (b4ns.IFA_LOCAL, socket.inet_aton("127.0.0.1")))
            + newaddr(socket.AF_INET, 5, (b4ns.IFA_ADDRESS, peer), (b4ns.IFA_LOCAL, v4))
            + newaddr(socket.AF_INET6, 6, (b4ns.IFA_ADDRESS, v6)))
    assert b4ns.parse_ifaddr_dump(data) == ([(socket.inet_aton("127.0.0.1"), 1), (v4, 5), (v6, 6)], False)
    done = struct.pack("=IHHII", 20, b4ns.NLMSG_DONE, 2, 1, 0) + bytes(4)
    assert b4ns.parse_ifaddr_dump(data[:0] + done) == ([], True)


def test_the_host_interfaces_table_is_the_kernels(monkeypatch):
    """Read from this process's network namespace: its loopback addresses are never an interface
    to pin to, and an address that is not the host's has none."""
    events = b4ns.Events()
    interfaces = b4ns.HostInterfaces(events)
    try:
        loopback = socket.inet_aton("127.0.0.1")
        assert interfaces.on_loopback(loopback) and interfaces.on_loopback(socket.inet_aton("127.9.9.9"))
        assert interfaces.index_of(loopback) is None
        assert interfaces.index_of(socket.inet_aton("203.0.113.77")) is None  # TEST-NET-3: not ours
        assert not interfaces.on_loopback(socket.inet_aton("203.0.113.77"))
        lo = socket.if_nametoindex("lo")
        assert lo in interfaces.loopback
        for address, index in interfaces.table.items():
            if index not in interfaces.loopback:
                assert interfaces.index_of(address) == index
    finally:
        interfaces.close()
        events.close()


# -- kernel ABI ----------------------------------------------------------------

def test_struct_sizes_match_the_kernel_abi():
    import ctypes
    assert ctypes.sizeof(b4ns.SeccompNotif) == 80
    assert ctypes.sizeof(b4ns.SeccompNotifResp) == 24
    assert ctypes.sizeof(b4ns.SeccompNotifAddfd) == 24


def test_every_rule_has_a_handler_and_every_arch_every_rule():
    names = {name for name, _args in b4ns.SECCOMP_NOTIFY_RULES} - {b4ns.SOCKETCALL}
    assert {name for name, _count in b4ns.SOCKETCALLS.values()} == names
    for numbers, _ptr in b4ns.SYSCALL_NUMBERS.values():
        assert set(numbers) == names
    assert set(b4ns.X32_NUMBERS) == names


# -- command line ---------------------------------------------------------------

def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "bypass4netns.py"), *args], capture_output=True,
                          text=True, env=env, timeout=30)


@pytest.mark.parametrize("args,needle", [(["-p", "70000:80"], "'70000:80'"),
                                         (["--ignore", "nope"], "'nope'"),
                                         (["--ready-fd", "999"], "999"),
                                         (["--bogus"], "--bogus")])
def test_bad_flags_exit_2_with_one_line_error(args, needle):
    result = run_cli(*args, "--socket", "/nonexistent/x.sock")
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and needle in error_lines[0]
    assert "Traceback" not in result.stderr


def test_missing_runtime_dir_is_a_one_line_error():
    result = run_cli(env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "XDG_RUNTIME_DIR" in result.stderr and "Traceback" not in result.stderr


def test_version_and_help():
    assert run_cli("--version").stdout.startswith("bypass4netns.py ")
    help_text = run_cli("--help").stdout
    for flag in ("--socket", "--ignore", "--publish", "--pid-file", "--log-file", "--debug", "--ready-fd",
                 "--exit-fd", "--version"):
        assert flag in help_text


def test_daemon_starts_signals_ready_and_cleans_up_on_sigterm(tmp_path):
    import os
    import signal
    sock, pid_file = tmp_path / "b.sock", tmp_path / "b.pid"
    ready_r, ready_w = os.pipe()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bypass4netns.py"), "--socket", str(sock),
                             "--pid-file", str(pid_file), "--ready-fd", str(ready_w)], pass_fds=[ready_w])
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        assert sock.exists() and int(pid_file.read_text()) == proc.pid
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(str(sock))
        conn.sendall(b"{not json")
        conn.close()
        proc.send_signal(signal.SIGUSR1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not sock.exists() and not pid_file.exists()
    finally:
        os.close(ready_r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_exit_fd_stops_the_daemon(tmp_path):
    import os
    exit_r, exit_w = os.pipe()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bypass4netns.py"), "--socket", str(tmp_path / "s"),
                             "--exit-fd", str(exit_r)], pass_fds=[exit_r])
    os.close(exit_r)
    os.close(exit_w)
    assert proc.wait(timeout=10) == 0


# -- what a switched socket carries over ------------------------------------------

def test_encode_sockaddr_round_trips_and_maps_ipv4_into_ipv6():
    for family, ip in ((socket.AF_INET, "198.18.0.1"), (socket.AF_INET6, "2001:db8::1")):
        raw = b4ns.encode_sockaddr(family, ipaddress.ip_address(ip), 8080)
        assert b4ns.parse_sockaddr(raw) == dest(ip, 8080)
    mapped = b4ns.encode_sockaddr(socket.AF_INET6, ipaddress.ip_address("127.0.0.1"), 80)
    assert mapped[8:24] == b"\0" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1])
    assert b4ns.parse_sockaddr(mapped) == dest("127.0.0.1", 80)
    assert b4ns.encode_sockaddr(socket.AF_INET, ipaddress.ip_address("::1"), 80) is None
    assert b4ns.encode_sockaddr(socket.AF_INET, None, 53) == sockaddr_in("0.0.0.0", 53)


def test_template_lists_exactly_the_options_an_application_changed():
    template = b4ns.Template(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        assert template.differences(sock) == []
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        diffs = {(level, name): value for level, name, value in template.differences(sock)}
    assert diffs == {(socket.SOL_SOCKET, socket.SO_KEEPALIVE): 1,
                     (socket.SOL_SOCKET, socket.SO_RCVBUF): 32768,  # what to set, not the doubled value read
                     (socket.IPPROTO_TCP, socket.TCP_NODELAY): 1,
                     (socket.IPPROTO_IPV6, socket.IPV6_V6ONLY): 1}


def test_a_published_port_that_cannot_be_reserved_stops_the_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = run_cli("--socket", str(tmp_path / "s"), "-p", "127.0.0.1:%d:80" % port)
    assert result.returncode == 1
    assert "cannot reserve published port 127.0.0.1:%d->80/tcp" % port in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "s").exists()


def test_a_port_lent_to_a_bind_is_left_alone_until_the_bind_reports():
    """Regression: with workers, the parent's once-a-second retry took a port back between its
    release and the worker's bind, which then failed with EADDRINUSE."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reservations = b4ns.Reservations(b4ns.build_publish_table(["127.0.0.1:%d:80" % port]).values(), True)
    reservations.reserve_all()
    (mapping,) = reservations.wanted
    try:
        reservations.lend(mapping)
        reservations.retry()
        with socket.socket() as container_side:
            container_side.bind(("127.0.0.1", port))  # the bind the port was lent to
            reservations.end_loan(mapping, bound=True)
            reservations.retry()  # in use by the container: not taken
            assert not reservations.held
        reservations.retry()  # the container let it go: held again
        assert len(reservations.held) == 1
        reservations.lend(mapping)
        reservations.end_loan(mapping, bound=False)  # a failed bind: taken back at once
        assert len(reservations.held) == 1
    finally:
        reservations.close()


# -- per-container settings (OCI annotations) ------------------------------------------

@pytest.mark.parametrize("annotations,expected", [
    (None, ([], [], False)),
    ({}, ([], [], False)),
    ({"org.opencontainers.image.title": "x"}, ([], [], False)),
    ({"bypass4netns.publish": "8080:80, 127.0.0.1:8443:443/tcp"}, ([], ["8080:80", "127.0.0.1:8443:443/tcp"], False)),
    ({"bypass4netns.publish": "8080:80 [::1]:5353:53/udp"}, ([], ["8080:80", "[::1]:5353:53/udp"], False)),
    ({"bypass4netns.ignore": "10.0.0.0/8,auto"}, (["10.0.0.0/8", "auto"], [], False)),
    ({"bypass4netns.ignore": "10.0.0.0/8 auto"}, (["10.0.0.0/8", "auto"], [], False)),
    ({"nerdctl/bypass4netns-ignore-subnets": '["192.168.0.0/16", "auto"]', "bypass4netns.ignore": "10.0.0.0/8"},
     (["10.0.0.0/8", "192.168.0.0/16", "auto"], [], False)),
    ({"nerdctl/bypass4netns-ignore-bind": "true"}, ([], [], True)),
    ({"nerdctl/bypass4netns-ignore-bind": "false"}, ([], [], False)),
])
def test_annotations_a_container_adds(annotations, expected):
    assert b4ns.parse_annotations(annotations) == expected


@pytest.mark.parametrize("annotations,needle", [
    ({"bypass4netns.publish": "8080"}, "bypass4netns.publish"),
    ({"bypass4netns.publish": "8080:80,8080:81"}, "host port 8080/tcp is already published"),
    ({"bypass4netns.ignore": "banana"}, "bypass4netns.ignore"),
    ({"nerdctl/bypass4netns-ignore-subnets": "10.0.0.0/8"}, "not a JSON list"),
    ({"nerdctl/bypass4netns-ignore-subnets": "[1, 2]"}, "not a JSON list"),
])
def test_bad_annotations_name_the_annotation(annotations, needle):
    with pytest.raises(b4ns.Error, match=needle):
        b4ns.parse_annotations(annotations)


def test_container_settings_add_to_the_daemons():
    base = b4ns.Settings(b4ns.compile_networks([ipaddress.ip_network("10.0.0.0/8")]), False,
                         b4ns.build_publish_table(["8000:80", "5353:53/udp"]))
    own = b4ns.parse_publish("9000:80") + b4ns.parse_publish("9001:81")
    settings = base.for_container(["192.168.0.0/16,auto"], own, [("tcp", 82)], False)
    assert [n[3] for n in settings.networks] == [ipaddress.ip_network("10.0.0.0/8"),
                                                  ipaddress.ip_network("192.168.0.0/16")]
    assert settings.auto and not base.auto
    assert {key: repr(m) for key, m in settings.publish.items()} == {
        ("tcp", 80): "9000->80/tcp", ("tcp", 81): "9001->81/tcp", ("udp", 53): "5353->53/udp"}
    assert settings.in_use == {("tcp", 82)}
    assert len(base.publish) == 2, "the daemon's own table is left as it was"
    assert base.for_container([], [], [], True).publish == {}, "ignore-bind: nothing published"


def test_mappings_cross_to_workers_as_json():
    for spec in ["8080:80", "127.0.0.1:8443:443/tcp", "[::1]:5353:53/udp"]:
        (mapping,) = b4ns.parse_publish(spec)
        assert b4ns.mapping_from_json(b4ns.mapping_to_json(mapping)) == mapping


def test_containers_claim_host_ports_first_come_and_release_them():
    free = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free.append(s.getsockname()[1])
    daemon_own = b4ns.parse_publish("127.0.0.1:%d:80" % free[0])
    reservations = b4ns.Reservations(daemon_own, True)
    reservations.reserve_all()
    try:
        first = b4ns.parse_publish("127.0.0.1:%d:80" % free[1])
        assert reservations.claim("a" * 64, first) == (first, [], [])
        with socket.socket() as s:  # held: nobody else on the host gets it
            assert s.connect_ex(("127.0.0.1", free[1])) != 0
            with pytest.raises(OSError):
                s.bind(("127.0.0.1", free[1]))
        # All addresses overlap 127.0.0.1: the second container and the daemon's -p both hold it.
        held, in_use, refused = reservations.claim("b" * 64, b4ns.parse_publish("%d:81" % free[1])
                                                   + b4ns.parse_publish("%d:82" % free[0]))
        assert held == [] and refused == [] and [(repr(m), who) for m, who in in_use] == [
            ("%d->81/tcp" % free[1], "a" * 64), ("%d->82/tcp" % free[0], None)]
        reservations.release("a" * 64)
        with socket.socket() as s:
            s.bind(("127.0.0.1", free[1]))  # free again
            # taken by the host meanwhile: the next claim has it, not reserved yet
            assert reservations.claim("c" * 64, first) == (first, [], [(first[0], "Address already in use")])
            assert reservations.key(first[0]) not in reservations.held
        reservations.retry()
        assert reservations.key(first[0]) in reservations.held, "reserved once the host let it go"
    finally:
        reservations.close()


def test_status_reads_as_a_table():
    status = {"version": "0.1.0", "pid": 42, "socket": "/run/user/1000/bypass4netns.sock", "workers": [43, 44],
              "fd_limit": 524288, "out_of_fds": 0, "containers": [
                  {"id": "3f3419b83dca" + "0" * 52, "processes": [100, 200], "worker": 1, "shared": False,
                   "published": ["8080->80/tcp"], "port_in_use": ["8443/tcp"], "ignore": [],
                   "counters": dict(zip(b4ns.COUNTERS, range(1, 8)))}]}
    lines = b4ns.format_status(status).splitlines()
    assert lines[0] == ("bypass4netns.py 0.1.0, pid 42, on /run/user/1000/bypass4netns.sock: workers 43 44; "
                        "fd limit 524288")
    assert lines[1].split() == ["CONTAINER", "PROCESSES", "WORKER", "BYPASSED", "CONTAINER-NET", "REFUSED",
                                "ERRORS", "PUBLISHED"]
    assert lines[2].split() == ["3f3419b83dca", "2", "1", "1", "2", "4", "5", "8080->80/tcp,8443/tcp", "in", "use"]
    status["containers"] = []
    assert b4ns.format_status(status).splitlines()[1] == "no containers"


# -- the bypass4netnsd API: requests and specs ------------------------------------------------

def test_http_request_parsed_once_complete():
    head = b"POST /v1/bypass HTTP/1.1\r\nHost: bypass4netnsd\r\nContent-Length: 7\r\n\r\n"
    assert b4ns.parse_http_request(head[:20]) is None
    assert b4ns.parse_http_request(head + b'{"id"') is None
    assert b4ns.parse_http_request(head + b'{"id":1}extra') == ("POST", "/v1/bypass", b'{"id":1')
    assert b4ns.parse_http_request(b"DELETE /v1/bypass/abc?x=1 HTTP/1.1\r\n\r\n") == ("DELETE", "/v1/bypass/abc", b"")


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /v1/bypass\r\n\r\n", 400),
    (b"GET /v1/bypass HTTP/1.1\r\nno colon\r\n\r\n", 400),
    (b"POST /v1/bypass HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
    (b"POST /v1/bypass HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (10 << 20), 413),
    (b"POST /v1/bypass HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
    (b"GET /" + b"x" * (20 << 10), 400),
])
def test_http_requests_refused_with_their_status(request_bytes, status):
    with pytest.raises(b4ns.ApiError) as refused:
        b4ns.parse_http_request(request_bytes)
    assert refused.value.status == status


def test_http_response_closes_the_connection():
    assert b4ns.format_http_response(200) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    response = b4ns.format_http_response(400, {"message": "no"})
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n") and response.endswith(b'\r\n\r\n{"message": "no"}')


NERDCTL_SPEC = {"id": "0123456789abcdef", "socketPath": "/run/user/1000/bypass4netns/0123456789abcde.sock",
                "pidFilePath": "/run/user/1000/bypass4netns/0123456789abcde.pid", "logFilePath": "",
                "portMapping": [{"protos": ["tcp", "udp"], "parentIP": "", "parentPort": 8080, "childIP": "",
                                 "childPort": 80},
                                {"protos": ["tcp"], "parentIP": "::1", "parentPort": 8443, "childIP": "10.4.0.2",
                                 "childPort": 443}],
                "ignoreSubnets": ["127.0.0.0/8", "10.4.0.0/24", "auto"], "ignoreBind": False}


def test_a_spec_as_nerdctl_posts_it():
    spec, ignore, publish, ignore_bind = b4ns.parse_bypass_spec(json.dumps(NERDCTL_SPEC).encode())
    assert spec == NERDCTL_SPEC and ignore == ["127.0.0.0/8", "10.4.0.0/24", "auto"] and not ignore_bind
    assert publish == ["8080:80/tcp", "8080:80/udp", "[::1]:8443:443/tcp"]
    go_nulls = dict(NERDCTL_SPEC, portMapping=None, ignoreSubnets=None)  # Go marshals nil slices as null
    del go_nulls["ignoreBind"]  # bypass4netns 0.4's spec has no ignoreBind
    assert b4ns.parse_bypass_spec(json.dumps(go_nulls).encode())[1:] == ([], [], False)


@pytest.mark.parametrize("change,needle", [
    ({"extra": 1}, "unknown field"),
    ({"id": ""}, "id:"),
    ({"id": None}, "id:"),
    ({"id": "a/b"}, "id:"),
    ({"socketPath": "relative.sock"}, "socketPath"),
    ({"ignoreBind": "yes"}, "ignoreBind"),
    ({"ignoreSubnets": "10.0.0.0/8"}, "ignoreSubnets"),
    ({"ignoreSubnets": ["banana"]}, "ignoreSubnets"),
    ({"portMapping": [{"parentPort": 8080}]}, "portMapping"),
    ({"portMapping": [{"protos": ["sctp"], "parentPort": 1, "childPort": 1}]}, "protos"),
    ({"portMapping": [{"parentPort": 70000, "childPort": 80}]}, "portMapping"),
    ({"portMapping": [{"parentPort": 8080, "childPort": 80, "hostIP": "x"}]}, "not a PortSpec"),
    ({"portMapping": [{"parentPort": 8080, "childPort": 80}, {"parentPort": 8080, "childPort": 81}]},
     "already published"),
])
def test_bad_specs_are_400_naming_the_field(change, needle):
    with pytest.raises(b4ns.ApiError, match=needle) as refused:
        b4ns.parse_bypass_spec(json.dumps(dict(NERDCTL_SPEC, **change)).encode())
    assert refused.value.status == 400
    for body in (b"{", b"[]", b'"x"'):
        with pytest.raises(b4ns.ApiError):
            b4ns.parse_bypass_spec(body)


def test_take_over_with_no_daemon_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bypass4netns.py"), "--take-over", "--socket",
                             str(tmp_path / "nobody.sock")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "bypass4netns.py: error: no daemon to take over from on %s: No such file or directory"
        % (tmp_path / "nobody.sock")]


# -- the --strict helper's pure parts -----------------------------------------

STATUS = b"""Name:\tpython3
Umask:\t0027
State:\tS (sleeping)
Tgid:\t42
Uid:\t101000\t101001\t101002\t101001
Gid:\t101000\t101003\t101000\t101003
FDSize:\t64
Groups:\t101003 100000 \nNStgid:\t42\nCapInh:\t0000000000000000\nCapPrm:\t00000000a80425fb
CapEff:\t00000000a80425fb\nCapBnd:\t00000000a80425fb\n"""


def test_parse_status_ids_takes_the_effective_ids_the_umask_and_the_effective_capabilities():
    fields = b4ns.status_id_fields(STATUS)
    assert b4ns.parse_status_ids(fields) == (101001, 101003, (101003, 100000), 0o027, 0xa80425fb)


def test_parse_status_ids_with_no_groups():
    assert b4ns.parse_status_ids(b4ns.status_id_fields(STATUS.replace(b"101003 100000 ", b"")))[2] == ()


def test_status_ids_of_a_real_process():
    with open("/proc/self/status", "rb") as f:
        euid, egid, groups, umask, caps = b4ns.parse_status_ids(b4ns.status_id_fields(f.read()))
    old = os.umask(0o022)
    os.umask(old)
    assert (euid, egid, umask, caps) == (os.geteuid(), os.getegid(), old, b4ns.capabilities()[0])
    assert sorted(groups) == sorted(os.getgroups())


ROOTLESS_MAP = b4ns.parse_id_map("         0       1001          1\n         1     100000      65536\n")


@pytest.mark.parametrize("outside,inside", [(1001, 0), (100000, 1), (101000, 1001), (165535, 65536),
                                            (165536, None), (0, None), (1000, None)])
def test_map_into_a_rootless_containers_user_namespace(outside, inside):
    assert b4ns.map_into(ROOTLESS_MAP, outside) == inside


def test_request_ops_are_the_trapped_calls_it_makes():
    assert set(b4ns.NamespaceHelper.OPS) == {b4ns.CONNECT, b4ns.BIND, b4ns.LISTEN}


# -- container addresses (--handle-c2c-connections) ----------------------------

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.89.71.0/24 2 0 2
        +-- 10.89.71.0/30 2 0 2
           |-- 10.89.71.0
              /24 link UNICAST
           |-- 10.89.71.3
              /32 host LOCAL
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.89.71.3
        /32 host LOCAL
     |-- 10.89.71.255
        /32 link BROADCAST
"""

IF_INET6 = """00000000000000000000000000000001 01 80 10 80       lo
fd00000000000000000000000000000a 02 40 00 00     eth0
fe80000000000000d4c7e8fffe2a1b3c 02 40 20 80     eth0
"""


def test_parse_fib_trie_addresses_finds_the_local_ones_but_loopback():
    assert b4ns.parse_fib_trie_addresses(FIB_TRIE) == [ipaddress.IPv4Address("10.89.71.3")]


def test_parse_if_inet6_addresses_leaves_out_loopback_and_link_local():
    assert b4ns.parse_if_inet6_addresses(IF_INET6) == [ipaddress.IPv6Address("fd00::a")]
    assert b4ns.parse_proc_if_inet6(IF_INET6) == [ipaddress.IPv6Network("fd00::/64")]


# -- --multinode's etcd keys ----------------------------------------------------

@pytest.mark.parametrize("text,parsed", [
    ("198.18.0.1:80", (ipaddress.ip_address("198.18.0.1"), 80)),
    ("[2001:db8::1]:8080", (ipaddress.ip_address("2001:db8::1"), 8080)),
    ("198.18.0.1", None), ("198.18.0.1:0", None), ("198.18.0.1:65536", None), ("banana:80", None),
    ("[2001:db8::1]", None), ("", None)])
def test_parse_host_port(text, parsed):
    assert b4ns.parse_host_port(text) == parsed


def test_format_host_port_reads_back():
    for ip in ("198.18.0.1", "2001:db8::1"):
        address = ipaddress.ip_address(ip)
        assert b4ns.parse_host_port(b4ns.format_host_port(address, 443)) == (address, 443)


def test_multinode_routes_keep_only_other_nodes_published_ports():
    own = ipaddress.ip_address("198.18.1.1")
    prefix = b4ns.MULTINODE_PREFIX
    entries = [(prefix + "10.89.71.5:80", "198.18.0.1:34567"),
               (prefix + "[fd00::5]:80", "[2001:db8::1]:34568"),
               (prefix + "10.89.72.5:80", "198.18.1.1:40000"),     # this node's own
               (prefix + "10.89.71.6:80", "127.0.0.1:40001"),      # loopback: never
               (prefix + "10.89.71.7:80", "0.0.0.0:40002"),        # unspecified: never
               (prefix + "10.89.71.8:80", "[::ffff:127.0.0.1]:40003"),
               (prefix + "10.89.71.9:80", "169.254.0.1:40004"),    # link-local
               (prefix + "garbage", "198.18.0.1:1"),
               ("other/10.89.71.10:80", "198.18.0.1:2")]
    assert b4ns.multinode_routes(entries, own) == [
        [4, int(ipaddress.ip_address("10.89.71.5")), 80, "198.18.0.1", 34567],
        [6, int(ipaddress.ip_address("fd00::5")), 80, "2001:db8::1", 34568]]


def test_status_says_what_is_routed():
    status = {"version": "0.1.0", "pid": 42, "socket": "/run/b.sock", "workers": [], "fd_limit": 1024,
              "out_of_fds": 0, "containers": [],
              "routes": {"peers": 2, "nodes": 3, "registered": 1, "etcd": "http://198.18.0.1:2379",
                         "host_address": "198.18.1.1", "agent": 77}}
    lines = b4ns.format_status(status).splitlines()
    assert lines[0] == "bypass4netns.py 0.1.0, pid 42, on /run/b.sock: one process; fd limit 1024"
    assert lines[1] == ("2 peer port(s) routed; multinode: this node 198.18.1.1, 1 key(s) registered, "
                        "3 port(s) of other nodes, etcd http://198.18.0.1:2379")
    assert lines[2] == "no containers"


def test_decision_lines_are_read_back_by_the_daemons_own_parser():
    """--debug's decision line is a declared format (DECISION_FORMAT), and parse_decisions()
    reads it back: the e2e tests assert on its fields, not on a regex of their own."""
    v6 = (6, int(ipaddress.ip_address("2001:db8::1")), 80)
    lines = ["2026-12-07 12:00:00,000 INFO container abc: namespace helper pid 9",
             "2026-12-07 12:00:00,001 DEBUG " + b4ns.DECISION_FORMAT % (
                 "abc", 42, 7, "connect", b4ns.format_destination(v6), "container (ignored 2001:db8::/32)"),
             "2026-12-07 12:00:00,002 DEBUG " + b4ns.DECISION_FORMAT % (
                 "abc", 43, -1, "listen", b4ns.format_destination(None), "refused: switched, not a published port")]
    assert b4ns.parse_decisions("\n".join(lines) + "\n") == [
        ("abc", 42, 7, "connect", "[2001:db8::1]:80", "container (ignored 2001:db8::/32)"),
        ("abc", 43, -1, "listen", "-", "refused: switched, not a published port")]


class Clock:
    """A clock the test moves."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def take_turns(turns, clock, tids, step):
    """Each tid in turn, `step` seconds apart: the changes note() reported, in order."""
    changes = []
    for tid in tids:
        clock.now += step
        change = turns.note(tid, clock)
        if change is not None:
            changes.append(change)
    return changes


def test_turns_crowded_when_threads_keep_taking_turns_and_calm_after_a_streak():
    turns, clock = b4ns.Turns(), Clock()
    busy = b4ns.Turns.BUSY_TID_CHANGES
    # One thread at a time: never crowded, whatever the rate.
    assert take_turns(turns, clock, [7] * 10 * busy, 1e-5) == []
    # Four threads in turn, fast: crowded once the second window of changes ends.
    changes = take_turns(turns, clock, [1, 2, 3, 4] * busy, 1e-5)
    assert changes == [True] and turns.crowded
    # Still in turn: nothing more to say.
    assert take_turns(turns, clock, [1, 2, 3, 4] * busy, 1e-5) == []
    # One thread again: calm after CALM_STREAK calls in a row, said once.
    assert take_turns(turns, clock, [5] * (b4ns.Turns.CALM_STREAK - 1), 1e-5) == [] and turns.crowded
    assert take_turns(turns, clock, [5] * 10, 1e-5) == [False] and not turns.crowded


def test_turns_slow_changes_never_crowd():
    """Threads changing less than BUSY_TID_CHANGES times within BUSY_WINDOW: one server keeps up."""
    turns, clock = b4ns.Turns(), Clock()
    step = 2 * b4ns.Turns.BUSY_WINDOW / b4ns.Turns.BUSY_TID_CHANGES
    assert take_turns(turns, clock, [1, 2] * 5 * b4ns.Turns.BUSY_TID_CHANGES, step) == []


def test_turns_streaks_broken_by_another_thread_keep_a_crowded_filter_crowded():
    turns, clock = b4ns.Turns(), Clock()
    take_turns(turns, clock, [1, 2] * 2 * b4ns.Turns.BUSY_TID_CHANGES, 1e-5)
    assert turns.crowded
    streak = [3] * (b4ns.Turns.CALM_STREAK - 1)
    assert take_turns(turns, clock, (streak + [4]) * 5, 1e-5) == [] and turns.crowded
