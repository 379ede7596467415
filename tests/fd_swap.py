#!/usr/bin/env python3
"""The fd-swapping race, tried: `sudo python3 tests/fd_swap.py [--vector bind|connect] [--seconds N] [DAEMON FLAGS]`.

When a trapped call is answered "continue", the kernel runs it as made and
looks its fd number up again; another thread of the container may have put a
different socket there in the meantime, with dup2().  If that is a host
socket, the call runs in the host's network namespace, to whatever address
the container wrote: its loopback too.  The daemon never answers "continue"
to such a call (README: swapping the fd); this script tries to make it.

A container thread keeps swapping a unix socket and a host socket at one fd
number while another connects that number to 127.0.0.1, where a server of
the test bed's namespace (the daemon's "host": nothing leaves it) prints the
connections it accepts.  The host socket is, by --vector:
  bind     a published port's bound host socket (the daemon installs it at
           the container's bind);
  connect  a bypassed connection, disconnected with connect(AF_UNSPEC)
           before each attempt inside the same race.
The script prints how many attempts the container made and whether it got in
(tests/e2e/test_strict.py runs it so, asserting it never does).
"""

import os
import subprocess
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import testbed as tb  # noqa: E402
from e2e.daemon import Daemon, run  # noqa: E402

LOOPBACK_SERVER = textwrap.dedent("""
    import selectors, socket, sys
    sel = selectors.DefaultSelector()
    # argv[1]: the loopback port, whose connections are printed; argv[2] (optional): a port on
    # the test bed's address that accepts silently (the bypassed connections of --vector connect).
    for host, port in (("127.0.0.1", sys.argv[1]), ("198.18.0.1", sys.argv[2] if len(sys.argv) > 2 else None)):
        if port:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, int(port)))
            s.listen(4096)
            sel.register(s, selectors.EVENT_READ, host)
    print("listening", flush=True)
    while True:
        for key, _ in sel.select():
            conn, peer = key.fileobj.accept()
            if key.data == "127.0.0.1":
                print("accepted a connection from %s:%d" % peer, flush=True)
            conn.close()
""")

SWAPPER = textwrap.dedent("""
    import ctypes, os, socket, struct, sys, threading, time
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    vector = sys.argv[3] if len(sys.argv) > 3 else "bind"
    libc = ctypes.CDLL(None, use_errno=True)
    unspec = struct.pack("=H", socket.AF_UNSPEC) + bytes(14)
    if vector == "bind":
        host_socket = socket.socket()
        host_socket.bind(("0.0.0.0", 80))  # a published port: the daemon installs a host socket
    else:
        host_socket = socket.create_connection(("198.18.0.1", int(sys.argv[4])))  # bypassed
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    N = 100
    os.dup2(unix.fileno(), N)
    done = False
    def swap():
        while not done:
            os.dup2(host_socket.fileno(), N)
            os.dup2(unix.fileno(), N)
    swapper = threading.Thread(target=swap)
    swapper.start()
    target = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=N)
    attempts, got_in, longest = 0, False, 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not got_in:
        attempts += 1
        began = time.monotonic()
        if vector == "connect":
            libc.connect(N, unspec, len(unspec))  # whatever N holds: a host socket connected to nothing
        try:
            target.connect(("127.0.0.1", port))
            got_in = True
        except OSError:
            pass
        longest = max(longest, time.monotonic() - began)
    done = True
    swapper.join()
    target.detach()
    print("%d attempts: %s; the longest took %.3f s" % (
        attempts, "CONNECTED to the host's 127.0.0.1" if got_in else "never connected", longest))
""")


def main(daemon_args=(), seconds=20, vector="bind"):
    tb.up()
    secret, bypassed = tb.free_port(host="127.0.0.1"), tb.free_port()
    server = tb.start_server(["python3", "-c", LOOPBACK_SERVER, str(secret), str(bypassed)], stdout=subprocess.PIPE,
                             universal_newlines=True)
    daemon = None
    try:
        if server.stdout.readline().strip() != "listening":
            raise RuntimeError("the loopback server did not start")
        daemon = Daemon(["-p", "%d:80" % tb.free_port(), *daemon_args], debug=False)
        result = run(tb.run_container(["python3", "-c", SWAPPER, str(secret), str(seconds), vector, str(bypassed)],
                                      seccomp=daemon.profile), timeout=seconds + 120)
        print("container: %s%s" % (result.stdout.strip(), result.stderr.strip()[-300:]))
    finally:
        if daemon is not None:
            daemon.stop()
        tb.stop_server(server)
    print("loopback server: %s" % (server.stdout.read().strip() or "no connection"))


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="The fd-swapping race against a running daemon.")
    parser.add_argument("--vector", choices=("bind", "connect"), default="bind")
    parser.add_argument("--seconds", type=float, default=20)
    known, rest = parser.parse_known_args()
    main(rest, known.seconds, known.vector)
