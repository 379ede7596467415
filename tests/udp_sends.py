#!/usr/bin/env python3
"""What an unconnected UDP sender in a container pays, per profile: `sudo python3 tests/udp_sends.py`.

A Python client in a rootless podman container (slirp4netns) sends 20,000
datagrams of 64 bytes with sendto() to the discard port of 198.18.0.1 (the
test bed's namespace: nothing leaves it), three rounds, under no profile,
under seccomp-gen.py's default profile and under its --udp profile, each
with bypass4netns.py running; it prints the median time per call.  README
("UDP, only with a --udp profile") quotes its output.
"""

import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import testbed as tb  # noqa: E402
from e2e.daemon import Daemon, run  # noqa: E402

SENDER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    n = int(sys.argv[2])
    start = time.perf_counter()
    for _ in range(n):
        s.sendto(b"x" * 64, (sys.argv[1], 9))
    print((time.perf_counter() - start) / n * 1e6)
""")


def main(rounds=3, sends=20000):
    tb.up()
    daemons = {"--udp profile": Daemon(["--ignore", "10.0.0.0/8"], debug=False, udp=True),
               "default profile": Daemon(["--ignore", "10.0.0.0/8"], debug=False, udp=False)}
    results = {}
    try:
        for _ in range(rounds):
            for name, profile in [("no profile", None)] + [(k, d.profile) for k, d in daemons.items()]:
                argv = tb.run_container(["python3", "-c", SENDER, tb.HOST_IP4, str(sends)], seccomp=profile)
                results.setdefault(name, []).append(float(run(argv, check=True).stdout))
    finally:
        for d in daemons.values():
            d.stop()
    for name, values in results.items():
        values.sort()
        print("%-16s %.1f us per unconnected sendto (median; rounds %s)"
              % (name, values[len(values) // 2], ", ".join("%.1f" % v for v in values)))


if __name__ == "__main__":
    main()
