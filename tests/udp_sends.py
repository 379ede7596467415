#!/usr/bin/env python3
"""What a UDP client in a container pays, and gains: `sudo python3 tests/udp_sends.py`.

Two Python clients in a rootless podman container (slirp4netns), each three
rounds under no profile and under seccomp-gen.py's profile, with
bypass4netns.py running:

- an unconnected sender: 20,000 datagrams of 64 bytes with sendto() to the
  discard port of 198.18.0.1 (the test bed's namespace: nothing leaves it);
- lookups as glibc's resolver makes them: 2,000 times a new UDP socket,
  connect() to an echo server in the test bed's namespace, a 64-byte query,
  its answer, close().

It prints the median time per call and per lookup.  Both are IPv4: the
lookups stay in the container (README: "UDP, with no send trapped") unless
the daemon below is given --no-udp-loopback-guard.
"""

import os
import subprocess
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import testbed as tb  # noqa: E402
from e2e.daemon import Daemon, run  # noqa: E402

SENDER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    n = int(sys.argv[3])
    start = time.perf_counter()
    for _ in range(n):
        s.sendto(b"x" * 64, (sys.argv[1], 9))
    print((time.perf_counter() - start) / n * 1e6)
""")

LOOKUPS = textwrap.dedent("""
    import socket, sys, time
    server, n = (sys.argv[1], int(sys.argv[2])), int(sys.argv[3])
    start = time.perf_counter()
    for _ in range(n):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.connect(server)
            s.send(b"q" * 64)
            s.recv(512)
    print((time.perf_counter() - start) / n * 1e6)
""")

ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(512)
        s.sendto(data, peer)
""")

CLIENTS = (("unconnected sendto", SENDER, 20000), ("lookup", LOOKUPS, 2000))


def main(rounds=3):
    tb.up()
    port = tb.free_port()
    echo = tb.start_server([sys.executable, "-c", ECHO, tb.HOST_IP4, str(port)], stdout=subprocess.PIPE)
    daemons = {"the profile": Daemon(["--ignore", "10.0.0.0/8"], debug=False)}
    results = {}
    try:
        echo.stdout.readline()
        for _ in range(rounds):
            for what, code, count in CLIENTS:
                for name, profile in [("no profile", None)] + [(k, d.profile) for k, d in daemons.items()]:
                    argv = tb.run_container(["python3", "-c", code, tb.HOST_IP4, str(port), str(count)],
                                            seccomp=profile)
                    results.setdefault((what, name), []).append(float(run(argv, check=True).stdout))
    finally:
        for d in daemons.values():
            d.stop()
        tb.stop_server(echo)
    for (what, name), values in results.items():
        values.sort()
        print("%-18s %-16s %.1f us (median; rounds %s)"
              % (what, name, values[len(values) // 2], ", ".join("%.1f" % v for v in values)))


if __name__ == "__main__":
    main()
