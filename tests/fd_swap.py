#!/usr/bin/env python3
"""The fd-swapping race, shown: `sudo python3 tests/fd_swap.py [DAEMON FLAGS]`.

Without --strict, the daemon answers "continue" (the kernel runs the call as
made) to a trapped call it does not handle, such as a connect on a unix
socket.  The kernel then
looks the fd number up again, and another thread of the container may have
put a different socket there in the meantime, with dup2().  If that socket
is a host socket that is not connected, the connect runs in the host's
network namespace to whatever address the container wrote: its loopback too.

Here a container gets such a socket by binding a published port (the daemon
installs a host socket, bound, not listening), keeps swapping it and a unix
socket at one fd number in one thread, and connects that fd to 127.0.0.1 in
another.  A server listening on 127.0.0.1 of the test bed's namespace (the
daemon's "host": nothing leaves it) prints the connections it accepts.  The
script prints how many attempts the container made and whether it got in.
With `--strict` the daemon never answers "continue", and it never gets in
(tests/e2e/test_strict.py runs it so).
"""

import os
import subprocess
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import testbed as tb  # noqa: E402
from e2e.daemon import Daemon, run  # noqa: E402

LOOPBACK_SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen(64)
    print("listening", flush=True)
    while True:
        conn, peer = s.accept()
        print("accepted a connection from %s:%d" % peer, flush=True)
        conn.close()
""")

SWAPPER = textwrap.dedent("""
    import os, socket, sys, threading, time
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    host_socket = socket.socket()
    host_socket.bind(("0.0.0.0", 80))  # a published port: the daemon installs a host socket
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
    attempts, got_in = 0, False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not got_in:
        attempts += 1
        try:
            target.connect(("127.0.0.1", port))
            got_in = True
        except OSError:
            pass
    done = True
    swapper.join()
    target.detach()
    print("%d attempts: %s" % (attempts, "CONNECTED to the host's 127.0.0.1" if got_in else "never connected"))
""")


def main(daemon_args=(), seconds=20):
    tb.up()
    secret = tb.free_port(host="127.0.0.1")
    server = tb.start_server(["python3", "-c", LOOPBACK_SERVER, str(secret)], stdout=subprocess.PIPE,
                             universal_newlines=True)
    daemon = None
    try:
        if server.stdout.readline().strip() != "listening":
            raise RuntimeError("the loopback server did not start")
        daemon = Daemon(["-p", "%d:80" % tb.free_port(), *daemon_args], debug=False)
        result = run(tb.run_container(["python3", "-c", SWAPPER, str(secret), str(seconds)], seccomp=daemon.profile),
                     timeout=seconds + 120)
        print("container: %s%s" % (result.stdout.strip(), result.stderr.strip()[-300:]))
    finally:
        if daemon is not None:
            daemon.stop()
        tb.stop_server(server)
    print("loopback server: %s" % (server.stdout.read().strip() or "no connection"))


if __name__ == "__main__":
    main(sys.argv[1:])
