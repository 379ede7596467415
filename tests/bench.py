#!/usr/bin/env python3
"""Benchmark: bypass4netns.py side by side with the host, slirp4netns and pasta.

    sudo ./tests/bench [--quick] [--unguarded] [--podman5] [--peer PATH] [--floor PATH] [--run-length]
                       [--rounds N] [--out DIR]

Every configuration runs the same workloads, with widely known tools, on the
test bed (tests/testbed.py): all traffic stays inside the test namespace
(198.18.0.0/15), where the servers run as root.

Configurations (the client is the only thing that changes):
  host          the client runs directly in the test namespace (the limit);
  slirp4netns   a rootless podman container on slirp4netns, no bypass;
  pasta         the client under standalone `pasta --config-net` (podman 4.3
                is too old for --network pasta).  pasta copies the outer
                address (198.18.0.1) into its namespace, so its clients talk
                to the namespace's second address, 198.18.1.1;
  bypass4netns.py  a rootless podman container on slirp4netns with the
                generated seccomp profile and the daemon running;
  unguarded     (--unguarded) the same with the daemon's guards given up: --no-fd-swap-guard
                and --no-udp-loopback-guard
                (the kernel runs unix and netlink calls as made);
  peer          (--peer PATH) any bypass4netns-compatible daemon, same flags,
                with the profile from --peer-profile (listenerPath rewritten)
                or else the one seccomp-gen.py writes.
                --peer-debian: the Go tool from Debian 13's package bypass4netns
                (installed into the Debian 13 root once), with its own profile.
  podman5       (--podman5) a rootless podman 5 container (crun 1.21) on
                pasta, podman 5's default network, in the Debian 13 bed
                (tests/bed13.py); pasta copies 198.18.0.1 into it, so its
                clients use 198.18.1.1 too;
  podman5_bypass  (--podman5) the same with bypass4netns.py, the profile
                merged into podman 5's own seccomp.json.  Workloads whose tools
                the Debian 13 root lacks (ab, redis-benchmark, dig, nginx,
                php-fpm, node) are n/a, and so is tar (another /usr/share);
                results.md gives the pair's trade: with the daemon / without.
  floor         (--floor PATH, e.g. ../shared/floor/floor.py, which stays
                outside the project) a minimal switcher, the mechanism's cost
                and nothing more, run like a peer; results.md then gives
                bypass4netns.py's connect rates and daemon CPU per connect as
                ratios to the floor's.  A peer that has died (the floor
                exits on any connection that is not a runtime's) is started
                again before the next measurement; results.md says why.

Workloads: iperf3 container -> host (1 and 4 streams) and host -> container
through a published port; ab -c 1 and -c 8 against nginx, one connection per
request; a connect/close loop of a static C client (built here with gcc
-static), and the same loop pinned to CPU 0 (the client, and the daemon with
its threads and workers: no wake-ups across CPUs); redis-benchmark GET/SET on
one kept-alive connection; tar of /usr/share (no networking: what the seccomp
profile costs); 20 clients connecting at once, in 20 containers, and as 20
processes in one container; UDP lookups as glibc's resolver makes them (a new
socket connected for each, a 1-byte query, its echo); a unix connect/close loop
in one container, server included, as 1 and as 4 processes; sendto() of 64
bytes on one unconnected UDP socket to 127.0.0.1 (a call the profile does not
trap); real resolvers: `getent ahosts` and `dig` in a loop against dnsmasq
(run here on 198.18.0.1 and 198.18.1.1, every client resolving through it,
never through the machine's resolvers); nginx in front of php-fpm over a unix
socket in one container, `ab -c 8` from inside it, and the same container
with its nginx port published by podman's own -p (not the daemon's), `ab -c 8`
from the test namespace (each request then traps only nginx's unix connect; the
rows of these five give each configuration's ratio to the slirp4netns
container: no profile); a Node.js
HTTP client, a new connection per request, against the namespace's nginx.
The daemons' CPU time and memory are read from /proc around the connect
workloads (--py-spy DIR also records their stacks).

Server ports: slirp4netns and pasta leave a client-side TIME_WAIT for each
connection, and past ~28,000 of them towards one server port every connect()
there slows down in the kernel's ephemeral-port search; so no server port takes
more than 20,000 connections a minute (PORT_LIMIT): the C clients turn through
a fresh range of ports, one port a connection, and ab and the Node.js client
move to a fresh port every 10,000 requests.  The run-length check (--run-length alone; part of the
full run) measures the connect loop for 1 s and for 10 s (5 s with --quick)
in every configuration: the figure must not fall with the run's length (it
falls if the long run is below 0.9 of the short one and its own second half
below 0.9 of its first: the C client counts its connections second by second).
After the rounds, an untimed pass counts each daemon's syscalls per connection:
`strace -c -f` on it and its workers during a loop of 2000 connections.

Rounds are interleaved (for each round, for each workload, every configuration
in turn, the order rotated by one each round: A B C D, B C D A, ...), and the
Markdown table gives medians and the speed relative to the host.  Outputs in
--out (default docs/bench): results.json (every raw number), results.md and
chart.png (matplotlib, from a virtualenv of the bench's own:
/var/lib/b4ns-test/bench-venv).
"""

import argparse
import contextlib
import datetime
import glob
import hashlib
import json
import math
import os
import platform
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

sys.dont_write_bytecode = True  # no __pycache__ in the work tree
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)

import bed13  # noqa: E402
import stages  # noqa: E402
import testbed as tb  # noqa: E402
from e2e.daemon import Daemon, generate_profile  # noqa: E402

VENV = os.path.join(tb.STATE_DIR, "bench-venv")
ADDR_A, ADDR_B = tb.HOST_IP4, tb.HOST_IP4_B
PUBLISHED_PORT = 5201  # the container side of the published port (iperf3's own)
IGNORE = "127.0.0.0/8,10.0.0.0/8,auto"  # README's recommended daemon flags
PINNED_CPU = 0  # the CPU of the pinned connect loop
# Server ports.  slirp4netns and pasta close their outer socket first when a container's client
# resets a connection, so each of their connections leaves a client-side TIME_WAIT (60 s) towards the
# server's port; past ~28,000 of those towards one address and port, every connect() there slows
# down in the kernel's ephemeral-port search (__inet_hash_connect, tcp_twsk_unique; tcp_tw_reuse=2 is
# no help).  So no server port may take more than PORT_LIMIT connections a minute: the C clients
# turn to the next port of their own range at every connection, a range wide enough for
# RATE_CAP conn/s at PER_PORT connections a port (ports_needed), ab turns to a fresh port every
# AB_CHUNK requests, and a port is handed out again only REUSE_AFTER s after its last measurement
# ended (PortRing).
PORT_LIMIT = 20000  # connections to one server port in 60 s, at most
PER_PORT = 15000  # what a C client's range is sized for: a margin under PORT_LIMIT
RATE_CAP = 60000  # conn/s, above any configuration's rate on this machine (the host's storm: ~41,000)
REUSE_AFTER = 65  # s between a port's last measurement and its next one (TIME_WAIT: 60 s)
ACCEPT_POOL = 1000  # ports of the C clients' accept server on each address
NGINX_POOL = 200  # ports of nginx on each address
AB_CHUNK = 10000  # ab requests to one port before the next port
AB_RATE_CAP = 30000  # req/s: what ab's ports are sized for

# ---------------------------------------------------------------------------
# The static C client (and accept-and-close server, and timer)
# ---------------------------------------------------------------------------

CONNBENCH_C = r"""
/* connbench, built by tests/bench.py with gcc -static:
 *   connbench serve ENDPOINT...                     accept and close, on every listener; and echo
 *                                                   UDP datagrams at the same ADDR:PORTs
 *   connbench connect ADDR PORTS MS [GO [PROCS]]    connect/close loop for MS ms
 *   connbench count ADDR PORTS N [GO [PROCS]]       the same loop for N connections
 *   connbench udp ADDR PORTS MS [GO [PROCS]]        the same loop on UDP sockets, with a 1-byte
 *                                                   query and its echo before close: a resolver's
 *                                                   lookup (glibc connects a socket for each)
 *   connbench unix PATH - MS [GO [PROCS]]           the connect/close loop on a unix stream socket
 *   connbench sendto MS                             sendto() of 64 bytes on one unconnected UDP
 *                                                   socket to a receiver of its own on 127.0.0.1,
 *                                                   for MS ms: "sendto calls N errors E elapsed_ns T"
 *   connbench time CMD ARG...                       run CMD, print its wall time
 * ENDPOINT: ADDR:PORT, ADDR:LO-HI (every port from LO to HI) or unix:PATH.  PORTS: PORT or LO-HI:
 * the loop connects to each port in turn (from a port picked at random), so that no server port
 * takes more than its share of the connections: a TIME_WAIT that slirp4netns or pasta leaves for
 * each connection would otherwise pile up towards one port, and past ~28,000 of them the kernel's
 * ephemeral-port search for that destination slows every connect() down.
 * connect: socket(); connect() (timed); SO_LINGER 0, so that close() sends an
 * RST and leaves no TIME_WAIT to run out of ports; close().  With GO (a file
 * path), print "ready", wait for GO to hold a CLOCK_REALTIME start time in ns
 * and start then, so that many clients run in the same window.  Prints
 * "count N errors E elapsed_us T sum_us S" and "hist US:COUNT ..." (1 us
 * buckets below 10 ms, 1 ms buckets above, capped at 10 s), then "persec N..."
 * (connections made in each second of the loop).  With PROCS, that
 * many forked copies of the loop (so all in one container, under its one
 * seccomp filter) print "ready" together, then each its own three lines. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define FINE 10000
#define COARSE 10000
#define MAX_PROCS 64
#define SECONDS 600
static uint64_t fine[FINE], coarse[COARSE + 1], persec[SECONDS];

static uint64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

/* "P" or "LO-HI" -> *lo, *n; 0 on error. */
static int port_range(const char *s, int *lo, int *n) {
    char *dash;
    int hi;
    *lo = atoi(s);
    dash = strchr(s, '-');
    hi = dash ? atoi(dash + 1) : *lo;
    if (*lo < 1 || hi < *lo || hi > 65535) return 0;
    *n = hi - *lo + 1;
    return 1;
}

static int watch(int ep, int fd, int udp) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)fd | (uint64_t)udp << 32};
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static int serve(int argc, char **argv) {
    struct rlimit rl = {1 << 16, 1 << 16};
    struct epoll_event evs[256];
    int ep = epoll_create1(0);
    setrlimit(RLIMIT_NOFILE, &rl);  /* thousands of listeners (as root; best effort otherwise) */
    for (int i = 0; i < argc; i++) {
        if (!strncmp(argv[i], "unix:", 5)) {
            struct sockaddr_un u = {.sun_family = AF_UNIX};
            int s = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
            strncpy(u.sun_path, argv[i] + 5, sizeof u.sun_path - 1);
            unlink(u.sun_path);
            if (bind(s, (struct sockaddr *)&u, sizeof u) || listen(s, 4096) || watch(ep, s, 0)) { perror("unix listen"); return 1; }
            continue;
        }
        char *colon = strrchr(argv[i], ':');
        int lo, n, one = 1;
        if (!colon) return 2;
        *colon = 0;
        if (!port_range(colon + 1, &lo, &n)) return 2;
        for (int p = lo; p < lo + n; p++) {
            struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(p)};
            int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), u = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
            if (s < 0 || u < 0) { perror("socket"); return 1; }
            if (inet_pton(AF_INET, argv[i], &a.sin_addr) != 1) return 2;
            setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
            if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4096)) { fprintf(stderr, "listen %s:%d: %s\n", argv[i], p, strerror(errno)); return 1; }
            if (bind(u, (struct sockaddr *)&a, sizeof a)) { fprintf(stderr, "bind udp %s:%d: %s\n", argv[i], p, strerror(errno)); return 1; }
            if (watch(ep, s, 0) || watch(ep, u, 1)) { perror("epoll_ctl"); return 1; }
        }
    }
    printf("listening\n");
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0 && errno != EINTR) return 1;
        for (int i = 0; i < n; i++) {
            int fd = (int)(evs[i].data.u64 & 0xffffffffu), udp = (int)(evs[i].data.u64 >> 32);
            for (int k = 0; k < 64; k++) {  /* drain a burst */
                if (udp) {
                    struct sockaddr_in from;
                    socklen_t len = sizeof from;
                    char byte;
                    if (recvfrom(fd, &byte, 1, 0, (struct sockaddr *)&from, &len) < 0) break;
                    sendto(fd, &byte, 1, 0, (struct sockaddr *)&from, len);
                    continue;
                }
                int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK);
                if (c < 0) break;
                close(c);
            }
        }
    }
}

/* by_count: argv[2] is a number of connections (errors included), not milliseconds.
 * family: AF_INET (argv[0] an address, argv[1] ports) or AF_UNIX (argv[0] a path); kind: SOCK_STREAM or
 * SOCK_DGRAM. */
static int client(int argc, char **argv, int by_count, int family, int kind) {
    struct sockaddr_in a = {.sin_family = AF_INET};
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    struct linger lin = {1, 0};
    uint64_t count = 0, errors = 0, sum_ns = 0, start, end, t0, t1;
    int last_errno = 0, lo = 0, nports = 1, next;
    if (argc < 3) return 2;
    if (family == AF_UNIX) {
        strncpy(un.sun_path, argv[0], sizeof un.sun_path - 1);
    } else {
        if (!port_range(argv[1], &lo, &nports)) return 2;
        if (inet_pton(AF_INET, argv[0], &a.sin_addr) != 1) return 2;
    }
    next = (int)((now_ns(CLOCK_REALTIME) ^ (uint64_t)getpid() * 2654435761u) % (uint64_t)nports);
    uint64_t limit = (uint64_t)atoll(argv[2]), most = by_count ? limit : 100000000u;
    if (argc > 3) {
        struct stat st;
        int waited = 0;
        unsigned long long at = 0;
        printf("ready\n");
        fflush(stdout);
        while (stat(argv[3], &st) != 0 || st.st_size == 0) {
            if (++waited > 300000) { fprintf(stderr, "no start signal\n"); return 1; }  /* 5 min */
            usleep(1000);
        }
        FILE *f = fopen(argv[3], "r");
        if (!f || fscanf(f, "%llu", &at) != 1) { fprintf(stderr, "bad start file\n"); return 1; }
        fclose(f);
        while (now_ns(CLOCK_REALTIME) < at) usleep(200);
    }
    start = now_ns(CLOCK_MONOTONIC);
    end = by_count ? UINT64_MAX : start + limit * 1000000u;
    do {
        int s = socket(family, kind, 0), r;
        if (s < 0) { errors++; last_errno = errno; usleep(1000); t1 = now_ns(CLOCK_MONOTONIC); continue; }
        a.sin_port = htons(lo + next);
        if (++next == nports) next = 0;
        t0 = now_ns(CLOCK_MONOTONIC);
        if (family == AF_UNIX) r = connect(s, (struct sockaddr *)&un, sizeof un);
        else r = connect(s, (struct sockaddr *)&a, sizeof a);
        t1 = now_ns(CLOCK_MONOTONIC);
        if (r == 0 && kind == SOCK_DGRAM) {  /* the query and its answer, not timed */
            struct pollfd p = {.fd = s, .events = POLLIN};
            char byte = 'q';
            errno = 0;
            if (send(s, &byte, 1, 0) != 1 || poll(&p, 1, 1000) != 1 || recv(s, &byte, 1, 0) != 1) {
                r = -1;
                if (!errno) errno = ETIMEDOUT;
            }
        }
        if (r == 0) {
            uint64_t us = (t1 - t0) / 1000, second = (t1 - start) / 1000000000u;
            count++;
            if (second < SECONDS) persec[second]++;
            sum_ns += t1 - t0;
            if (us < FINE) fine[us]++;
            else coarse[us / 1000 < COARSE ? us / 1000 : COARSE]++;
            if (kind == SOCK_STREAM && family == AF_INET) setsockopt(s, SOL_SOCKET, SO_LINGER, &lin, sizeof lin);
        } else {
            errors++;
            last_errno = errno;
        }
        close(s);
    } while (t1 < end && count + errors < most);
    printf("count %llu errors %llu elapsed_us %llu sum_us %llu errno %d\nhist", (unsigned long long)count,
           (unsigned long long)errors, (unsigned long long)((t1 - start) / 1000),
           (unsigned long long)(sum_ns / 1000), last_errno);
    for (int i = 0; i < FINE; i++)
        if (fine[i]) printf(" %d:%llu", i, (unsigned long long)fine[i]);
    for (int i = 10; i <= COARSE; i++)
        if (coarse[i]) printf(" %d:%llu", i * 1000, (unsigned long long)coarse[i]);
    printf("\npersec");
    for (uint64_t i = 0; i < SECONDS && i <= (t1 - start) / 1000000000u; i++) printf(" %llu", (unsigned long long)persec[i]);
    printf("\n");
    return 0;
}

/* sendto() of 64 bytes on one unconnected UDP socket, to a receiver of our own on 127.0.0.1 (it never
 * reads: once its buffer is full the kernel drops what arrives, and sendto() still succeeds). */
static int sendto_loop(char **argv) {
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof to;
    char payload[64] = {0};
    uint64_t calls = 0, errors = 0, start, end, t;
    int last_errno = 0, rcv = socket(AF_INET, SOCK_DGRAM, 0), s = socket(AF_INET, SOCK_DGRAM, 0);
    if (rcv < 0 || s < 0 || bind(rcv, (struct sockaddr *)&to, sizeof to) ||
        getsockname(rcv, (struct sockaddr *)&to, &len)) { perror("receiver"); return 1; }
    start = now_ns(CLOCK_MONOTONIC);
    end = start + (uint64_t)atoll(argv[0]) * 1000000u;
    do {
        for (int i = 0; i < 256; i++) {
            if (sendto(s, payload, sizeof payload, 0, (struct sockaddr *)&to, sizeof to) == sizeof payload) calls++;
            else errors++, last_errno = errno;
        }
        t = now_ns(CLOCK_MONOTONIC);
    } while (t < end);
    printf("sendto calls %llu errors %llu elapsed_ns %llu errno %d\n", (unsigned long long)calls,
           (unsigned long long)errors, (unsigned long long)(t - start), last_errno);
    return 0;
}

static int timed(char **argv) {
    uint64_t t0 = now_ns(CLOCK_MONOTONIC);
    int status = 0;
    pid_t pid = fork();
    if (pid == 0) { execvp(argv[0], argv); _exit(127); }
    if (pid < 0 || waitpid(pid, &status, 0) < 0) return 1;
    printf("elapsed_us %llu status %d\n", (unsigned long long)((now_ns(CLOCK_MONOTONIC) - t0) / 1000),
           WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return 0;
}

/* PROCS copies of the loop.  Each writes to a memfd of its own, copied to stdout once all have
 * exited: lines of copies that finish together would interleave in a shared pipe. */
static int spawn(int procs, int argc, char **argv, int by_count, int family, int kind) {
    int fds[MAX_PROCS], status, failed = 0;
    pid_t pids[MAX_PROCS];
    char buf[65536];
    if (procs < 1 || procs > MAX_PROCS) return 2;
    for (int i = 0; i < procs; i++) {
        if ((fds[i] = memfd_create("connbench", 0)) < 0) { perror("memfd_create"); return 1; }
        fflush(stdout);
        if ((pids[i] = fork()) < 0) { perror("fork"); return 1; }
        if (pids[i] == 0) {
            dup2(fds[i], 1);
            exit(client(argc, argv, by_count, family, kind));  /* exit, not _exit: stdio must flush */
        }
    }
    for (int i = 0; i < procs; i++) {  /* "ready" once every copy is: it has printed its own */
        int waited = 0;
        while (pread(fds[i], buf, 6, 0) < 6) {
            if (waitpid(pids[i], &status, WNOHANG) == pids[i]) { fprintf(stderr, "a copy exited\n"); return 1; }
            if (++waited > 120000) { fprintf(stderr, "a copy did not start\n"); return 1; }  /* 2 min */
            usleep(1000);
        }
    }
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < procs; i++) {
        ssize_t n;
        if (waitpid(pids[i], &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status)) failed = 1;
        lseek(fds[i], 0, SEEK_SET);
        while ((n = read(fds[i], buf, sizeof buf)) > 0) fwrite(buf, 1, n, stdout);
    }
    return failed;
}

int main(int argc, char **argv) {
    const char *m = argc > 1 ? argv[1] : "";
    if (argc > 2 && !strcmp(m, "serve")) return serve(argc - 2, argv + 2);
    if (argc > 2 && (!strcmp(m, "connect") || !strcmp(m, "count") || !strcmp(m, "udp") || !strcmp(m, "unix"))) {
        int by_count = !strcmp(m, "count"), kind = strcmp(m, "udp") ? SOCK_STREAM : SOCK_DGRAM;
        int family = strcmp(m, "unix") ? AF_INET : AF_UNIX;
        if (argc > 6) return spawn(atoi(argv[6]), 4, argv + 2, by_count, family, kind);
        return client(argc - 2, argv + 2, by_count, family, kind);
    }
    if (argc > 2 && !strcmp(m, "sendto")) return sendto_loop(argv + 2);
    if (argc > 2 && !strcmp(m, "time")) return timed(argv + 2);
    fprintf(stderr, "usage: connbench serve ENDPOINT... | connect ADDR PORTS MS [GO [PROCS]] | "
                    "count ADDR PORTS N [GO [PROCS]] | udp ADDR PORTS MS [GO [PROCS]] | "
                    "unix PATH - MS [GO [PROCS]] | sendto MS | time CMD...\n");
    return 2;
}
"""

NGINX_CONF = """
daemon off;
worker_processes 1;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_timeout 0;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
{listen}
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


# nginx in front of php-fpm over a unix socket, both in the client's configuration (one container):
# PHP_SCRIPT fills @RUN@ (a temp dir of its own), @SRC@ (these files), @LISTEN@ and @PORT@ in.
PHP_NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
user root root;
error_log @RUN@/error.log;
pid @RUN@/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_timeout 0;
    client_body_temp_path @RUN@/body;
    proxy_temp_path @RUN@/proxy;
    fastcgi_temp_path @RUN@/fastcgi;
    uwsgi_temp_path @RUN@/uwsgi;
    scgi_temp_path @RUN@/scgi;
    server {
        listen @LISTEN@:@PORT@ backlog=4096;
        location / {
            fastcgi_pass unix:@RUN@/php.sock;
            fastcgi_param SCRIPT_FILENAME @SRC@/index.php;
            fastcgi_param SCRIPT_NAME /index.php;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param REQUEST_URI $request_uri;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param SERVER_PROTOCOL $server_protocol;
        }
    }
}
"""
PHP_FPM_CONF = """
[global]
pid = @RUN@/php-fpm.pid
error_log = @RUN@/php-fpm.log
daemonize = no
[www]
user = root
group = root
listen = @RUN@/php.sock
pm = static
pm.max_children = 4
"""
PHP_PAGE = '<?php echo "ok\\n";\n'
PHP_FPM = "/usr/sbin/php-fpm8.2"
# $0: the files' dir, then the port, requests and concurrency, and nginx's address (127.0.0.1 by default).
# Requests "serve": no ab, the script says "php ready" once nginx and php-fpm answer and serves until it is
# stopped (the published-port row: ab runs on the host).  php-fpm -n: no php.ini (the container has
# not the host's /etc), the same in every configuration; -R: the container's root.
PHP_SCRIPT = r"""
src=$0 port=$1 n=$2 c=$3 listen=${4:-127.0.0.1}
run=$(mktemp -d /tmp/b4ns-php-XXXXXX) || exit 1
sed -e "s|@RUN@|$run|g" -e "s|@SRC@|$src|g" -e "s|@PORT@|$port|g" -e "s|@LISTEN@|$listen|g" \
    "$src/nginx.conf" > "$run/nginx.conf"
sed -e "s|@RUN@|$run|g" "$src/php-fpm.conf" > "$run/php-fpm.conf"
%(fpm)s -n -R -F -y "$run/php-fpm.conf" >"$run/fpm.out" 2>&1 &
fpm=$!
/usr/sbin/nginx -e "$run/error.log" -c "$run/nginx.conf" -p "$run" >"$run/nginx.out" 2>&1 &
ngx=$!
stop() { kill $ngx $fpm 2>/dev/null; wait; rm -rf "$run"; }
url="http://127.0.0.1:$port/"
i=0
until ab -n 1 "$url" 2>/dev/null | grep -q "Document Length: *3 bytes"; do
    i=$((i + 1))
    if [ $i -gt 200 ]; then
        echo "nginx and php-fpm did not answer: $(tail -n 3 "$run"/*.out "$run"/*.log 2>&1)" >&2
        stop
        exit 1
    fi
    sleep 0.05
done
if [ "$n" = serve ]; then
    echo "php ready"
    wait
    exit 0
fi
ab -q -n 200 -c $c "$url" >/dev/null
ab -r -n $n -c $c "$url"
rc=$?
stop
exit $rc
""" % {"fpm": PHP_FPM}


# A Node.js client: a new HTTP connection for each request (agent: false), CONCURRENCY requests at a time,
# for MS ms, to ADDR; at most CHUNK requests to each of PORTS in turn (see PORT_LIMIT).
NODE_CLIENT = r"""
const http = require("http");
const [addr, ms, concurrency, chunk, ...ports] = process.argv.slice(2);
const end = Date.now() + Number(ms);
const t0 = process.hrtime.bigint();
let started = 0, done = 0, failed = 0;
function one() {
    if (Date.now() >= end) return Promise.resolve(false);
    const port = ports[Math.min(Math.floor(started++ / Number(chunk)), ports.length - 1)];
    return new Promise((resolve) => {
        const req = http.get({host: addr, port: Number(port), path: "/", agent: false}, (res) => {
            res.resume();
            res.on("end", () => { res.statusCode === 200 ? done++ : failed++; resolve(true); });
        });
        req.on("error", () => { failed++; resolve(true); });
    });
}
async function loop() { while (await one()); }
Promise.all(Array.from({length: Number(concurrency)}, loop)).then(() => {
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    console.log(`node requests ${done} failed ${failed} seconds ${seconds} ports ${Math.min(ports.length, Math.ceil(started / Number(chunk)))}`);
});
"""
NODE_CONCURRENCY = 4


def log(msg):
    print("bench: " + msg, file=sys.stderr, flush=True)


class Failed(Exception):
    """A workload that could not be measured in one configuration (reported as n/a)."""


class NotApplicable(Failed):
    """A workload that means nothing in one configuration, by design (n/a, and not a failure)."""


def run(argv, timeout, what):
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failed("%s: no answer in %ds" % (what, timeout))
    if result.returncode != 0:
        raise Failed("%s exited %d: %s" % (what, result.returncode,
                                           (result.stderr.strip() or result.stdout.strip())[-300:]))
    return result.stdout


def threads(pid):
    """The thread ids of pid ([] once it has exited)."""
    try:
        return [int(tid) for tid in os.listdir("/proc/%d/task" % pid)]
    except OSError:
        return []


def apt_install(packages, why):
    """Install Debian packages the bench needs beyond the test bed's."""
    log("installing %s (%s)" % (" and ".join(packages), why))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "-qq", "-o", "DPkg::Lock::Timeout=600", "install", "-y"] + packages, check=True,
                   env=env, stdin=subprocess.DEVNULL)


def children(pid):
    """Direct children of pid, forked by any of its threads (what a pasta we started runs)."""
    found = []
    for tid in threads(pid):
        try:
            with open("/proc/%d/task/%d/children" % (pid, tid)) as f:
                found += [int(p) for p in f.read().split()]
        except OSError:  # a thread that exited meanwhile
            pass
    return found


def descendants(pid):
    """pid and every process under it: a daemon and the workers it forked."""
    return [pid] + [d for child in children(pid) for d in descendants(child)]


def signal_tree(pid, signum):
    """signum to pid and its descendants (SIGSTOP: a daemon that is not being measured)."""
    for proc in descendants(pid):
        try:
            os.kill(proc, signum)
        except ProcessLookupError:
            pass


def set_affinity(pid, cpus):
    """Every thread of pid and of its descendants on cpus (taskset -a -p for each of them)."""
    for proc in descendants(pid):
        for tid in threads(proc):
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:  # a worker or thread that exited meanwhile
                pass


@contextlib.contextmanager
def pinned(pid):
    """pid (a daemon), its threads and its workers on PINNED_CPU, then back on the CPUs pid had; None: no-op.

    Workers forked meanwhile inherit the pinning and are restored too.
    """
    if pid is None:
        yield
        return
    cpus = os.sched_getaffinity(pid)
    set_affinity(pid, {PINNED_CPU})
    try:
        yield
    finally:
        set_affinity(pid, cpus)


def read_line_matching(proc, pattern, timeout):
    """Read proc.stdout lines until one matches pattern; False on timeout or EOF."""
    return read_until(proc, lambda text: re.search(pattern, text), timeout)


def read_until(proc, done, timeout):
    """Read proc.stdout until done(all of it so far, as text); False on timeout or EOF."""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            return False
        buf += chunk
        if done(buf.decode(errors="replace")):
            return True
    return False


# ---------------------------------------------------------------------------
# Daemons: bypass4netns.py (through tests/e2e/daemon.py) and a peer
# ---------------------------------------------------------------------------

def proc_status(pid):
    """(VmRSS, VmHWM) in KiB of pid and its workers, added up."""
    rss = hwm = 0
    for proc in descendants(pid):
        try:
            with open("/proc/%d/status" % proc) as f:
                text = f.read()
        except FileNotFoundError:  # a worker that exited meanwhile
            continue
        rss_m, hwm_m = re.search(r"VmRSS:\s+(\d+)", text), re.search(r"VmHWM:\s+(\d+)", text)
        if not rss_m or not hwm_m:  # a worker exiting (a zombie has no memory lines): it holds none
            continue
        rss += int(rss_m.group(1))
        hwm += int(hwm_m.group(1))
    return rss, hwm


def proc_cpu_seconds(pid):
    """CPU seconds of pid and its workers (a worker that exited takes its share with it)."""
    ticks = 0
    for proc in descendants(pid):
        try:
            with open("/proc/%d/stat" % proc) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def log_problems(paths, keep=20):
    """(the first `keep` ERROR and Traceback lines of a daemon's logs, how many there were).

    paths: its logs (a peer's --log-file and its stderr).  Read line by
    line: a log can be gigabytes (the Go tool logs an error for every failed
    RECV, in a loop, once a container is gone).
    """
    kept, count = [], 0
    for path in paths:
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    if "ERROR" in line or "level=error" in line or "Traceback" in line:
                        count += 1
                        if len(kept) < keep:
                            kept.append(line.rstrip("\n"))
        except FileNotFoundError:
            pass
    return kept, count


# The unguarded column's flags: every guard the daemon has, given up (README says what each costs).
UNGUARDED = ("--no-fd-swap-guard", "--no-udp-loopback-guard")


def start_engine(publish_port, flags=(), base="podman", stages=None):
    """bypass4netns.py as the e2e tests run it, quiet (no --debug), publishing publish_port, with
    these flags added; base: the profile the trap is merged into (seccomp-gen.py --base); stages:
    a directory, to run it under tests/stages.py, which writes its stage figures there.

    The daemon gets .publish_port, and .publish_off: why host -> container cannot be measured (the
    daemon refused -p), or None.
    """
    args = ["--ignore", IGNORE, *flags]
    prefix = ()
    if stages:
        prefix = ("python3", stages_script(), "run", stages)
    try:
        daemon = Daemon(args + ["-p", "%d:%d" % (publish_port, PUBLISHED_PORT)], base=base, debug=False,
                        prefix=prefix)
        daemon.publish_port, daemon.publish_off = publish_port, None
    except Exception as exc:  # noqa: BLE001 - any failure: run without -p, say why
        why = "the daemon did not start with -p: %s" % (str(exc).strip().splitlines() or ["?"])[-1][:200]
        log(why)
        daemon = Daemon(args, base=base, debug=False, prefix=prefix)
        daemon.publish_port, daemon.publish_off = None, why
    return daemon


def stages_script():
    """A copy of tests/stages.py the test user can run; its output directory is made the test user's
    by main()."""
    copy = os.path.join(tb.WORKDIR, "b4ns-stages-%d.py" % os.getpid())
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "stages.py"), copy)
    os.chmod(copy, 0o644)
    return copy


PEER_SETTLE = 0.2  # seconds a peer runs after SIGCONT before attempt() looks whether it is still there


class PeerDaemon(Daemon):
    """Another bypass4netns-compatible daemon: same flags, its own profile."""

    def __init__(self, path, profile, publish_port, publish_off=None, in_bed13=False):
        """publish_port: the host port of -p; publish_off: why not to pass -p at all (it publishes nothing);
        profile: a file, a profile (dict), or None (seccomp-gen.py's); in_bed13: run it inside the Debian 13
        root's mount namespace (a binary that needs that root's libraries)."""
        self.in_bed13 = in_bed13
        # Started its own way (the original tool has no --ready-fd); the readers are Daemon's.
        name = "b4ns-peer-%d-%s" % (os.getpid(), uuid.uuid4().hex[:6])
        self.script = os.path.join(tb.WORKDIR, name + "-" + os.path.basename(path))
        shutil.copy(path, self.script)
        os.chmod(self.script, 0o755)
        os.chown(self.script, tb.user_uid(), tb.user_gid())
        self.socket = os.path.join(tb.runtime_dir(), name + ".sock")
        self.log_path = os.path.join(tb.WORKDIR, name + ".log")
        # Its stderr (a traceback, for one): the floor writes nothing to --log-file.
        self.stderr_path = os.path.join(tb.WORKDIR, name + ".stderr")
        if profile:
            if isinstance(profile, dict):
                data = json.loads(json.dumps(profile))
            else:
                with open(profile) as f:
                    data = json.load(f)
            data["listenerPath"] = self.socket
            self.profile = os.path.join(tb.WORKDIR, name + "-seccomp.json")
            with open(self.profile, "w") as f:
                json.dump(data, f, indent=1)
            os.chmod(self.profile, 0o644)
        else:
            self.profile = generate_profile(self.socket)
        argv = (["python3"] if path.endswith(".py") else []) + [self.script]
        argv += ["--socket", self.socket, "--log-file", self.log_path, "--ignore", IGNORE]
        self.publish_port, self.publish_off = publish_port, publish_off
        self.name = os.path.basename(path)
        self.restarts = []  # why it had to be started again, once for each time
        self.proc = None
        if not publish_off:
            self.argv = argv + ["-p", "%d:%d" % (publish_port, PUBLISHED_PORT)]
            self.proc = self._start(self.argv)
        if self.proc is None:
            self.publish_port, self.publish_off = None, publish_off or "the peer did not start with -p"
            self.argv = argv
            self.proc = self._start(argv)
        if self.proc is None:
            raise RuntimeError("the peer daemon %s did not start: %s" % (path, self.log()[-500:]))

    def log(self):
        """Its --log-file, then what it wrote to stdout and stderr."""
        try:
            with open(self.stderr_path, errors="replace") as f:
                return super().log() + f.read()
        except FileNotFoundError:
            return super().log()

    def exited(self):
        """None while it runs; else how it ended: its exit status and the last line it wrote."""
        if self.proc.poll() is None:
            return None
        status = self.proc.returncode
        lines = [line for line in self.log().splitlines() if line.strip()]
        return "%s %s%s" % (self.name, "killed by signal %d" % -status if status < 0 else "exited %d" % status,
                            ": " + lines[-1].strip()[:300] if lines else "")

    def revive(self):
        """Started again if it is gone (the floor dies on one malformed message, for one): None if it
        ran, else how it had ended.  Raises Failed if it does not start again."""
        gone = self.exited()
        if gone is None:
            return None
        self.restarts.append(gone)
        tb.stop_server(self.proc)  # reaped, its pid file removed
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)  # stale: _start waits for the socket to appear
        proc = self._start(self.argv)
        if proc is None:
            raise Failed("%s; it did not start again: %s" % (gone, self.log()[-300:]))
        self.proc = proc
        log("%s had ended (%s): started again, pid %d" % (self.name, gone, proc.pid))
        return gone

    def _start(self, argv):
        # RLIMIT_NOFILE's soft limit at the hard one, as bypass4netns.py and Go's runtime raise their own: the
        # floor keeps a pidfd of every thread that ever connected (~700 after one full round), so under a
        # soft limit of 1024, a login shell's usual one, it dies with EMFILE in the second round.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        with open(self.stderr_path, "ab") as err:
            limit = dict(stdout=err, stderr=err,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)))
            if self.in_bed13:  # WORKDIR and the runtime dir are the same paths in there
                proc = tb.start_server(bed13.as_user(argv, env={"XDG_RUNTIME_DIR": tb.runtime_dir()}), netns=False,
                                       **limit)
            else:
                proc = tb.start_server(argv, user=True, **limit)
        for _ in range(300):  # no --ready-fd in the original tool: wait for its socket
            if os.path.exists(self.socket):
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        tb.stop_server(proc)
        return None

    def stop(self):
        status = tb.stop_server(self.proc)
        for path in (self.socket, self.script, self.profile):
            if os.path.exists(path):
                os.unlink(path)
        return status


# The Go tool as the peer (--peer-debian): Debian 13's package, installed into the Debian 13 root of
# tests/bed13.py (a stamp in the root records it; a root made again starts without it).  Its binary
# needs glibc >= 2.34 and libseccomp2 >= 2.5.0 (the package's Depends:), which Debian 12 has: it runs on
# the host as a peer of the Debian 12 bed (podman 4.3, runc), like any --peer, and from inside the root's
# mount namespace only if it does not start on the host.
GO_PEER_PACKAGE = "bypass4netns"
GO_PEER_BINARY = "/usr/bin/bypass4netns"
GO_PEER_STAMP = bed13.ROOT + "/.b4ns-bench-peer"
# The package ships no seccomp profile: the tool's own is test/seccomp.json.sh of its sources (at tag
# v0.4.1, the package's version): every syscall allowed, these trapped.  Names the kernel does not know
# (_exit) are skipped by runc.
GO_PEER_TRAPPED = ["bind", "close", "connect", "setsockopt", "fcntl", "_exit", "exit_group", "getpeername"]
GO_PEER_ARCHES = {"x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                  "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]}


def go_peer_profile(machine=None):
    """The Go tool's own profile (its seccomp.json.sh), listenerPath left for PeerDaemon to fill in."""
    machine = machine or platform.machine()
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": GO_PEER_ARCHES.get(machine, []),
            "listenerPath": "", "syscalls": [{"names": list(GO_PEER_TRAPPED), "action": "SCMP_ACT_NOTIFY"}]}


def ensure_debian_peer():
    """The Go tool's package in the Debian 13 root (installed once, as bed13 installs its own packages);
    returns (the binary's path on the host, the package's version)."""
    binary = bed13.ROOT + GO_PEER_BINARY
    text = "packages %s\n" % GO_PEER_PACKAGE
    try:
        installed = open(GO_PEER_STAMP).read() == text and os.path.exists(binary)
    except OSError:
        installed = False
    if not installed:
        bed13.up()  # the root (debootstrap'ed once, cached), then the package into it
        log("installing %s into %s (the Go tool as the peer)" % (GO_PEER_PACKAGE, bed13.ROOT))
        apt = ["apt-get", "-qq", "-o", "DPkg::Lock::Timeout=600"]
        bed13._in_chroot(apt + ["update"])
        bed13._in_chroot(apt + ["install", "-y", "--no-install-recommends", GO_PEER_PACKAGE])
        bed13._in_chroot(["apt-get", "clean"])
        with open(GO_PEER_STAMP, "w") as f:
            f.write(text)
    version = subprocess.run(["chroot", bed13.ROOT, "dpkg-query", "-W", "-f=${Version}", GO_PEER_PACKAGE],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True).stdout
    return binary, version.strip() or "?"


def runs_on_host(binary):
    """binary starts on the host (its libraries are there): its --version exits 0."""
    try:
        return subprocess.run([binary, "--version"], env={"XDG_RUNTIME_DIR": "/tmp", "PATH": tb.USER_PATH},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# ---------------------------------------------------------------------------
# Configurations: how a client command runs
# ---------------------------------------------------------------------------

class Config:
    key = label = ""
    target = ADDR_A  # the server address this configuration's clients use (and their DNS server)
    daemon = None

    def wrap(self, argv, publish=None, name=None):
        """argv run as this configuration's client; publish = (host port, container port)."""
        raise NotImplementedError

    def wrap_dns(self, argv, resolv_conf):
        """argv as wrap() runs it, resolving through self.target: resolv_conf (a file that says so) mounted
        over /etc/resolv.conf in a mount namespace of its own, never the machine's resolvers.  Containers
        override it (podman's --dns)."""
        inner = self.wrap(argv)
        assert inner[:2] == ["nsenter", "--net=" + tb.NETNS_PATH], inner
        return inner[:2] + ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
                            'mount --bind "$0" /etc/resolv.conf && exec "$@"', resolv_conf] + inner[2:]

    def path(self, host_path):
        """Where a file of the test bed's WORKDIR is seen by the client."""
        return host_path

    def unavailable(self, workload):
        """Why workload means nothing in this configuration (reported as n/a, not as a failure), or None."""
        return None

    def stop_detached(self, proc, name):
        """Stop a server started with wrap(..., name=name) that did not exit by itself."""
        for child in children(proc.pid):
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass
        tb.stop_server(proc)


class Host(Config):
    key, label = "host", "host"

    def wrap(self, argv, publish=None, name=None):
        return tb.as_user(argv)


class Pasta(Config):
    key, label = "pasta", "pasta"
    target = ADDR_B

    def wrap(self, argv, publish=None, name=None):
        tcp = "%d:%d" % publish if publish else "none"
        return tb.as_user(["pasta", "--config-net", "--quiet", "-t", tcp, "-u", "none", "-T", "none",
                           "-U", "none", "--"] + list(argv))


class Container(Config):
    def __init__(self, key, label, runtime, daemon=None):
        self.key, self.label, self.runtime, self.daemon = key, label, runtime, daemon

    def wrap_dns(self, argv, resolv_conf):
        return self.wrap(argv)  # every container has --dns self.target

    def wrap(self, argv, publish=None, name=None, podman_publish=False):
        """publish goes to podman's -p, unless a daemon publishes it (its own -p); podman_publish: to podman's
        -p even with a daemon (a container port the daemon does not publish)."""
        # --dns: the container's resolv.conf names the test namespace's dnsmasq, never the machine's resolvers.
        extra = ["-v", "%s:/home:ro" % tb.WORKDIR, "--dns", self.target]
        if publish and (podman_publish or not self.daemon):
            extra += ["-p", "%d:%d" % publish]
        return tb.run_container(argv, runtime=self.runtime, seccomp=self.daemon.profile if self.daemon else None,
                                name=name, extra=extra)

    def path(self, host_path):
        return "/home/" + os.path.relpath(host_path, tb.WORKDIR)

    def stop_detached(self, proc, name):
        subprocess.run(tb.podman(["rm", "-f", "-t", "0", name], self.runtime), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)
        tb.stop_server(proc)


class NotRunning(Config):
    """A column that could not be set up (a peer that did not start): every workload n/a, with why."""

    def __init__(self, key, label, why):
        self.key, self.label, self.why = key, label, why

    def wrap(self, argv, publish=None, name=None):
        raise NotApplicable(self.why)

    def unavailable(self, workload):
        return self.why


PODMAN5_CONFIGS = ("podman5", "podman5_bypass")
# Rows with a base (ratio to no profile): the podman 5 columns' base is podman 5's own container without the
# profile, not the podman 4 slirp4netns one.
OWN_BASE = {"podman5_bypass": "podman5", "podman5": "podman5"}


def bed13_info():
    """The podman 5 bed's tool versions, read inside its Debian 13 root."""
    def version(argv):
        out = subprocess.run(bed13.in_bed(argv, netns=False), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             universal_newlines=True, timeout=60).stdout.strip()
        return out.splitlines()[0] if out else "?"
    return {"podman": version(["podman", "--version"]), "crun": version(["crun", "--version"]),
            "pasta": version(["dpkg-query", "-W", "-f=passt ${Version}", "passt"]),
            "profile base": bed13.default_profile_base()}


class Podman5(Container):
    """A rootless podman 5 container of the Debian 13 bed (tests/bed13.py): crun 1.21, and pasta, podman 5's
    default network, as podman 5 runs it.

    pasta copies the test namespace's b4ns0 addresses into the container (198.18.0.1/24), so its clients
    talk to the namespace's other address, 198.18.1.1, as the pasta configuration's do (a LAN peer for
    the daemon: bypassed, see tests/e2e/test_podman5.py).  WORKDIR is bound into the Debian 13 root at
    the same path (bed13.shared_dirs), so the static client and the daemon's profile are seen there as
    in the Debian 12 bed's containers; the container's /usr is the Debian 13 root's.
    """

    # Workloads whose tools are not in the Debian 13 root (bed13.PACKAGES): file -> workloads needing it.
    # A tool installed there later makes its workloads run.
    TOOLS = {
        "/usr/bin/ab": ("ab1", "ab8"),
        "/usr/bin/redis-benchmark": ("redis",),
        "/usr/bin/dig": ("dig",),
        "/usr/sbin/nginx": ("php", "php_pub"),
        PHP_FPM: ("php", "php_pub"),
        "/usr/bin/node": ("node",),
    }
    # Workloads that run there but whose figure compares with nothing in the other columns.
    NOT_COMPARABLE = {
        "tar": "the container's /usr/share is the Debian 13 root's, not the host's that the other columns "
               "archive: its time compares with none of theirs",
    }

    def __init__(self, key, label, daemon=None):
        super().__init__(key, label, "crun", daemon)
        self.target = ADDR_B

    def wrap(self, argv, publish=None, name=None, podman_publish=False):
        extra = ["-v", "%s:/home:ro" % tb.WORKDIR, "--dns", self.target]
        if publish and (podman_publish or not self.daemon):
            extra += ["-p", "%d:%d" % publish]
        return bed13.run_container(argv, runtime=self.runtime, seccomp=self.daemon.profile if self.daemon else None,
                                   network="pasta", name=name, extra=extra)

    def stop_detached(self, proc, name):
        subprocess.run(bed13.podman(["rm", "-f", "-t", "0", name], self.runtime), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)
        tb.stop_server(proc)

    def unavailable(self, workload, root=None):
        """root: the Debian 13 root's path on the host (bed13.ROOT; the unit tests give another)."""
        root = bed13.ROOT if root is None else root
        missing = sorted(path for path, needing in self.TOOLS.items()
                         if workload in needing and not os.path.exists(root + path))
        if missing:
            return "not in the Debian 13 root (tests/bed13.py's packages): %s" % ", ".join(missing)
        return self.NOT_COMPARABLE.get(workload)


# ---------------------------------------------------------------------------
# Server ports: no port takes more than PORT_LIMIT connections a minute
# ---------------------------------------------------------------------------

def ports_needed(seconds, rate=RATE_CAP, per_port=PER_PORT):
    """How many server ports a connect loop of `seconds` turns through: rate * seconds at per_port a port."""
    return max(1, int(math.ceil(rate * seconds / per_port)))


class PortRing:
    """Contiguous runs of a block of server ports, handed out in turn; none again within REUSE_AFTER s.

    take(n, seconds) -> (first, last): n ports for a measurement of `seconds`; if the ring has come
    round to ports a measurement used less than REUSE_AFTER s ago, it waits (and says so).  clock and
    sleep are injectable for the unit tests.
    """

    def __init__(self, base, size, reuse_after=REUSE_AFTER, clock=time.monotonic, sleep=time.sleep):
        self.base, self.size, self.reuse_after = base, size, reuse_after
        self.clock, self.sleep = clock, sleep
        self.next = 0
        self.free_at = {}  # index -> when its last measurement ends, plus reuse_after
        self.waited = 0.0

    def take(self, n, seconds):
        n = max(1, min(n, self.size))
        if self.next + n > self.size:
            self.next = 0
        indexes = range(self.next, self.next + n)
        wait = max([self.free_at.get(i, 0.0) - self.clock() for i in indexes] + [0.0])
        if wait > 0:
            log("waiting %.0f s for server ports %d-%d to be %d s clear of their last use" % (
                wait, self.base + indexes[0], self.base + indexes[-1], self.reuse_after))
            self.sleep(wait)
            self.waited += wait
        until = self.clock() + seconds + self.reuse_after
        for i in indexes:
            self.free_at[i] = until
        self.next += n
        return self.base + indexes[0], self.base + indexes[-1]


FREE_BLOCK = """
import socket, sys
addrs, size = sys.argv[1].split(","), int(sys.argv[2])
for base in range(20000, 32768 - size, size):  # below the ephemeral range (32768-60999)
    try:
        held = []
        for port in range(base, base + size):
            for addr in addrs:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET, kind)
                    held.append(s)
                    s.bind((addr, port))
    except OSError:
        continue
    finally:
        for s in held:
            s.close()
    print(base)
    break
"""


def free_block(addrs, size):
    """The first port of `size` contiguous ports free (TCP and UDP) on every one of addrs, in the namespace."""
    out = run(tb.in_netns([sys.executable, "-c", FREE_BLOCK, ",".join(addrs), str(size)]), 60,
              "the search for free server ports").strip()
    if not out:
        raise RuntimeError("no block of %d free ports below 32768 on %s" % (size, ", ".join(addrs)))
    return int(out)


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------

UNIX_SERVER = r"""
b=$0 s=$1
shift
"$b" serve "unix:$s" >/dev/null 2>&1 &
srv=$!
i=0
while [ ! -S "$s" ]; do
    i=$((i + 1))
    if [ $i -gt 1000 ]; then echo "the unix server did not start" >&2; kill $srv; exit 1; fi
    sleep 0.01
done
"$b" unix "$s" - "$@"
rc=$?
kill $srv
rm -f "$s"
exit $rc
"""


class Clients:
    """C clients of one configuration, started and ready: go() starts their loops together.

    mode and limit: "connect", "udp" (UDP sockets) or "unix" (a unix stream socket, its accept server
    started by the same shell, in the same container) and milliseconds, or "count" and connections.
    wrappers: how many times cfg wraps a client (containers, for a container configuration); procs:
    loops in each (the client forks them, so they share its container); pin: the clients on
    PINNED_CPU.  The TCP and UDP loops turn through a fresh range of the accept server's ports (see
    PortRing), .ports.
    """

    def __init__(self, bench, cfg, workload, mode, limit, wrappers=1, procs=1, pin=False):
        self.cfg = cfg
        self.go_path = os.path.join(tb.WORKDIR, "bench-go-%s" % uuid.uuid4().hex[:12])
        bench.files.append(self.go_path)
        tail = [str(limit), cfg.path(self.go_path)] + ([str(procs)] if procs > 1 else [])
        if mode == "unix":
            self.ports = None
            path = "/tmp/b4ns-bench-%s.sock" % uuid.uuid4().hex[:12]
            self.argv = ["/bin/sh", "-c", UNIX_SERVER, cfg.path(bench.client), path] + tail
        else:
            seconds = limit / RATE_CAP if mode == "count" else limit / 1000
            self.ports = bench.accept_rings[cfg.target].take(ports_needed(seconds), seconds)
            self.argv = (["taskset", "-c", str(PINNED_CPU)] if pin else []) + [
                cfg.path(bench.client), mode, cfg.target, "%d-%d" % self.ports] + tail
        self.wrappers = wrappers
        self.procs, self.names = [], []

    def __enter__(self):
        try:
            for _ in range(self.wrappers):
                self.names.append("b4ns-bench-%s" % uuid.uuid4().hex[:8])
                self.procs.append(subprocess.Popen(self.cfg.wrap(self.argv, name=self.names[-1]),
                                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE))
            for proc in self.procs:
                if not read_line_matching(proc, r"ready", 120):
                    raise Failed("a client did not start: " + proc.stderr.read(300).decode(errors="replace")
                                 if proc.poll() is not None else "a client did not start in 120 s")
        except BaseException:
            self.__exit__()
            raise
        return self

    def go(self):
        """Start every loop in 0.2 s; return that time."""
        start = time.time() + 0.2
        with open(self.go_path + ".tmp", "w") as f:
            f.write("%d\n" % int(start * 1e9))
        os.chmod(self.go_path + ".tmp", 0o644)
        os.rename(self.go_path + ".tmp", self.go_path)
        return start

    def outputs(self):
        """What every client printed, once they have all exited."""
        outputs = []
        for proc in self.procs:
            out, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise Failed("client exited %d: %s" % (proc.returncode, err.decode(errors="replace")[-300:]))
            outputs.append(out.decode())
        return outputs

    def __exit__(self, *exc):
        for proc, name in zip(self.procs, self.names):
            if proc.poll() is None:
                self.cfg.stop_detached(proc, name)


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.tmp = tempfile.mkdtemp(prefix="b4ns-bench-")
        os.chmod(self.tmp, 0o755)
        self.servers = []
        self.made = {}  # configuration -> connections its clients made (ab and the connect workloads)
        self.spy_runs = {}  # configuration -> py-spy recordings made
        self.files = []  # in WORKDIR, removed at the end
        self.t = {  # durations
            "iperf": 1 if self.quick else 5,
            "ab": 1 if self.quick else 3,
            "connect_ms": 1000 if self.quick else 3000,
            "redis_n": 2000 if self.quick else 20000,
            "tar_passes": 2 if self.quick else 5,
            "crowd": 20,  # clients at once, in containers of their own or in one
            "syscalls_n": 2000,  # connections of the strace pass
            "runlen_short_ms": 1000,  # the run-length check: the connect loop, short and long
            "runlen_long_ms": 5000 if self.quick else 10000,
            "sendto_ms": 500 if self.quick else 2000,
            "getent_n": 100 if self.quick else 500,  # lookups, a process each
            "dig_n": 30 if self.quick else 150,
            "php_n": 2000 if self.quick else 10000,  # requests
        }

    # -- servers in the test namespace ------------------------------------

    def start(self, argv, **kwargs):
        proc = tb.start_server(argv, **kwargs)
        self.servers.append(proc)
        return proc

    def build_client(self):
        src = os.path.join(self.tmp, "connbench.c")
        with open(src, "w") as f:
            f.write(CONNBENCH_C)
        binary = os.path.join(tb.WORKDIR, "connbench-%d" % os.getpid())
        cmd = ["gcc", "-O2", "-static", "-Wall", "-o", binary, src]
        if not shutil.which("gcc") or subprocess.run(cmd, stderr=subprocess.DEVNULL).returncode != 0:
            apt_install(["gcc", "libc6-dev"], "a static C client")
            subprocess.run(cmd, check=True)
        os.chmod(binary, 0o755)
        self.files.append(binary)
        self.client = binary

    def start_servers(self, configs):
        def ports():
            return {ADDR_A: tb.free_port(ADDR_A), ADDR_B: tb.free_port(ADDR_B)}

        # Blocks of ports for the C clients' accept server and for nginx (see PORT_LIMIT), below the
        # ephemeral range, the same numbers on both addresses.
        base = free_block([ADDR_A, ADDR_B], ACCEPT_POOL + NGINX_POOL)
        self.accept_rings = {addr: PortRing(base, ACCEPT_POOL) for addr in (ADDR_A, ADDR_B)}
        self.nginx_rings = {addr: PortRing(base + ACCEPT_POOL, NGINX_POOL) for addr in (ADDR_A, ADDR_B)}

        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.iperf_ports = ports()
        for addr, port in self.iperf_ports.items():
            self.start(["iperf3", "-s", "-B", addr, "-p", str(port)], **quiet)
        conf = os.path.join(self.tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(dir=self.tmp, listen="\n".join(
                "        listen %s:%d backlog=4096;" % (addr, port) for addr in (ADDR_A, ADDR_B)
                for port in range(base + ACCEPT_POOL, base + ACCEPT_POOL + NGINX_POOL))))
        self.start(["nginx", "-c", conf, "-p", self.tmp], **quiet)
        self.redis_ports = ports()
        for addr, port in self.redis_ports.items():
            self.start(["redis-server", "--bind", addr, "--port", str(port), "--save", "", "--appendonly", "no",
                        "--protected-mode", "no", "--dir", self.tmp, "--logfile", ""], **quiet)
        self.start([self.client, "serve"] + ["%s:%d-%d" % (addr, base, base + ACCEPT_POOL - 1)
                                             for addr in (ADDR_A, ADDR_B)], **quiet)
        endpoints = [ep for table in (self.iperf_ports, self.redis_ports) for ep in table.items()]
        endpoints += [(addr, port) for addr in (ADDR_A, ADDR_B)
                      for port in (base, base + ACCEPT_POOL - 1, base + ACCEPT_POOL, base + ACCEPT_POOL + NGINX_POOL - 1)]
        for addr, port in endpoints:
            tb.wait_port(addr, port, timeout=20)
        self.start_dns()
        self.write_php()

    def start_dns(self):
        """dnsmasq on both addresses, port 53, answering bench.test from its own table (no upstream)."""
        self.dns_error = None
        self.resolv = {}
        for addr in (ADDR_A, ADDR_B):
            self.resolv[addr] = os.path.join(self.tmp, "resolv-%s.conf" % addr)
            with open(self.resolv[addr], "w") as f:
                f.write("nameserver %s\noptions attempts:1 timeout:2\n" % addr)
            os.chmod(self.resolv[addr], 0o644)
        if not shutil.which("dnsmasq"):
            apt_install(["dnsmasq-base"], "the DNS lookups")
        self.dnsmasq = self.start(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                                   "--no-hosts", "--bind-interfaces", "--listen-address=" + ADDR_A,
                                   "--listen-address=" + ADDR_B, "--port=53", "--address=/bench.test/198.18.0.5",
                                   "--cache-size=10000", "--pid-file=", "--user=root"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for addr in (ADDR_A, ADDR_B):
                tb.wait_port(addr, 53, timeout=10)
        except Exception:  # noqa: BLE001 - the DNS rows are n/a, the rest runs
            err = self.dnsmasq.stderr.read(300).decode(errors="replace") if self.dnsmasq.poll() is not None else ""
            self.dns_error = "dnsmasq did not start on port 53: " + (err.strip() or "no answer")
            log(self.dns_error)

    def write_php(self):
        """The php and node workloads' files, in WORKDIR (containers see it as /home)."""
        self.php_dir = os.path.join(tb.WORKDIR, "b4ns-bench-php-%d" % os.getpid())
        os.makedirs(self.php_dir, exist_ok=True)
        for name, text in (("nginx.conf", PHP_NGINX_CONF), ("php-fpm.conf", PHP_FPM_CONF), ("index.php", PHP_PAGE),
                           ("node-client.js", NODE_CLIENT)):
            with open(os.path.join(self.php_dir, name), "w") as f:
                f.write(text)
            os.chmod(os.path.join(self.php_dir, name), 0o644)
        os.chmod(self.php_dir, 0o755)

    def stop_servers(self):
        for proc in reversed(self.servers):
            tb.stop_server(proc)
        for path in self.files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        if getattr(self, "php_dir", None):
            shutil.rmtree(self.php_dir, ignore_errors=True)

    # -- the workloads -------------------------------------------------------

    def iperf3(self, cfg, streams):
        argv = ["iperf3", "-c", cfg.target, "-p", str(self.iperf_ports[cfg.target]), "-t", str(self.t["iperf"]),
                "-P", str(streams), "-J"]
        report = json.loads(run(cfg.wrap(argv), 60 + self.t["iperf"], "iperf3"))
        if "error" in report:
            raise Failed("iperf3: " + report["error"])
        local = report["start"]["connected"][0]["local_host"]
        result = {"value": report["end"]["sum_received"]["bits_per_second"] / 1e9, "local_host": local}
        if cfg.daemon and local != cfg.target:
            result["warning"] = "not bypassed: iperf3's local address is %s, not %s" % (local, cfg.target)
        return result

    def iperf3_published(self, cfg):
        if cfg.daemon and cfg.daemon.publish_off:
            raise Failed(cfg.daemon.publish_off)
        if isinstance(cfg, Host):
            host_port = container_port = tb.free_port()
        elif cfg.daemon:
            host_port, container_port = cfg.daemon.publish_port, PUBLISHED_PORT
        else:
            host_port, container_port = tb.free_port(), PUBLISHED_PORT
        name = "b4ns-bench-%s" % uuid.uuid4().hex[:8]
        server = cfg.wrap(["iperf3", "-s", "-1", "--forceflush", "-p", str(container_port)],
                          publish=(host_port, container_port), name=name)
        proc = tb.start_server(server, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            if not read_line_matching(proc, r"Server listening", 60):
                raise Failed("the iperf3 server did not start")
            argv = tb.as_user(["iperf3", "-c", ADDR_A, "-p", str(host_port), "-t", str(self.t["iperf"]), "-J"])
            report = json.loads(run(argv, 60 + self.t["iperf"], "iperf3 -c (host to container)"))
            if "error" in report:
                raise Failed("iperf3 to the published port: " + report["error"])
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            return {"value": report["end"]["sum_received"]["bits_per_second"] / 1e9}
        finally:
            if proc.poll() is None:
                cfg.stop_detached(proc, name)
            tb.stop_server(proc)

    def ab(self, cfg, concurrency):
        """ab for t["ab"] s, AB_CHUNK requests at most to each of a fresh range of nginx's ports."""
        seconds = self.t["ab"]
        first, last = self.nginx_rings[cfg.target].take(ports_needed(seconds, AB_RATE_CAP, AB_CHUNK) + 1, seconds)
        argv = ["/bin/sh", "-c", AB_LOOP, "ab-loop", str(seconds * 1000), str(concurrency), str(AB_CHUNK),
                cfg.target] + [
            str(port) for port in range(first, last + 1)]
        out = run(cfg.wrap(argv), 120 + seconds, "ab")
        result = ab_totals(out)
        self.made[cfg.key] = self.made.get(cfg.key, 0) + result["requests"]
        result["ports"] = last - first + 1
        return result

    def redis(self, cfg):
        argv = ["redis-benchmark", "-h", cfg.target, "-p", str(self.redis_ports[cfg.target]), "-c", "1",
                "-n", str(self.t["redis_n"]), "-t", "get,set", "--csv"]
        out = run(cfg.wrap(argv), 300, "redis-benchmark")
        rows = [line.replace('"', "").split(",") for line in out.splitlines() if line.strip()]
        if not rows or rows[0][0] != "test":
            raise Failed("redis-benchmark printed no CSV: " + out[-300:])
        header = rows[0]
        result = {}
        for row in rows[1:]:
            values = dict(zip(header, row))
            result[values["test"].lower()] = {k: float(v) for k, v in values.items() if k != "test"}
        if "get" not in result or "set" not in result:
            raise Failed("redis-benchmark: no GET/SET line: " + out[-300:])
        return result

    def sendto(self, cfg):
        """ns per sendto() of 64 bytes on one unconnected UDP socket (a call the profile does not trap)."""
        out = run(cfg.wrap([cfg.path(self.client), "sendto", str(self.t["sendto_ms"])]), 120, "sendto")
        m = re.search(r"sendto calls (\d+) errors (\d+) elapsed_ns (\d+) errno (\d+)", out)
        if not m or not int(m.group(1)):
            raise Failed("sendto: " + (out[-300:] or "no output"))
        if int(m.group(2)):
            raise Failed("sendto: %s calls failed (errno %s)" % (m.group(2), m.group(4)))
        return {"value": int(m.group(3)) / int(m.group(1)), "calls": int(m.group(1))}

    def lookups(self, cfg, tool):
        """Lookups of bench.test from dnsmasq, a process each (getent ahosts or dig), for a wall time."""
        if self.dns_error:
            raise Failed(self.dns_error)
        if tool == "dig" and not shutil.which("dig"):
            apt_install(["bind9-dnsutils"], "dig")
        n = self.t[tool + "_n"]
        one = {"getent": "getent ahosts bench.test",
               "dig": "dig +short +tries=1 +time=2 @%s bench.test" % cfg.target}[tool]
        # A lookup that fails (a query or answer lost: resolv.conf says attempts:1 timeout:2, and pasta
        # drops one in a thousand or so here) is counted, and its timeout is in the wall time.
        loop = "f=0; i=0; while [ $i -lt %d ]; do %s >/dev/null || f=$((f + 1)); i=$((i + 1)); done; " \
               "echo failed $f" % (n, one)
        # One lookup first, untimed, that must give dnsmasq's answer.
        script = '%s | grep -q "^198\\.18\\.0\\.5\\b" || { echo "%s: no answer 198.18.0.5: $(%s 2>&1 | ' \
                 'head -n 3)" >&2; exit 3; }; exec "$0" time /bin/sh -c "$1"' % (one, tool, one)
        out = run(cfg.wrap_dns(["/bin/sh", "-c", script, cfg.path(self.client), loop], self.resolv[cfg.target]),
                  300, tool)
        m = re.search(r"failed (\d+)\s+elapsed_us (\d+) status (\d+)", out)
        if not m or int(m.group(3)):
            raise Failed("%s: no time: %s" % (tool, out[-300:]))
        failed = int(m.group(1))
        if failed * 10 > n:
            raise Failed("%s: %d of %d lookups failed" % (tool, failed, n))
        return {"value": (n - failed) / (int(m.group(2)) / 1e6), "lookups": n - failed, "failed": failed}

    def php(self, cfg):
        """ab -c 8 from inside the configuration against nginx + php-fpm (unix socket) there too."""
        if not os.path.exists(PHP_FPM):
            apt_install(["php-fpm"], "the nginx + php-fpm workload")
        argv = ["/bin/sh", "-c", PHP_SCRIPT, cfg.path(self.php_dir), str(tb.free_port("127.0.0.1")),
                str(self.t["php_n"]), "8"]
        out = run(cfg.wrap(argv), 300, "nginx + php-fpm")
        if "Non-2xx responses" in out:
            raise Failed("php: " + re.search(r"Non-2xx responses:\s+\d+", out).group(0))
        result = ab_totals(out)
        if result["failed"]:
            raise Failed("php: %d failed requests" % result["failed"])
        return result

    def php_published(self, cfg):
        """ab -c 8 from the host (the test namespace) against nginx + php-fpm (unix socket) in the container,
        through podman's own -p HOSTPORT:CONTAINERPORT (rootlessport), in every container configuration alike:
        each request traps only nginx's connect() to php-fpm (accept() is not trapped, and the forwarder's
        connect into the container is not the container's)."""
        if not isinstance(cfg, Container):
            raise NotApplicable("no podman container, no podman -p: the %s client runs in the test namespace itself"
                         % cfg.label if isinstance(cfg, Host) else
                         "podman -p is a container's (standalone pasta: no podman; the pasta row is the php row)")
        if not os.path.exists(PHP_FPM):
            apt_install(["php-fpm"], "the nginx + php-fpm workload")
        host_port = tb.free_port()
        container_port = PUBLISHED_PORT
        while container_port in (PUBLISHED_PORT, host_port):  # 5201: the daemons' own -p, never podman's here
            container_port = tb.free_port("127.0.0.1")
        name = "b4ns-bench-php-%s" % uuid.uuid4().hex[:8]
        server = cfg.wrap(["/bin/sh", "-c", PHP_SCRIPT, cfg.path(self.php_dir), str(container_port), "serve", "8",
                           "0.0.0.0"], publish=(host_port, container_port), name=name, podman_publish=True)
        proc = tb.start_server(server, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            if not read_line_matching(proc, r"php ready", 120):
                err = ""
                if proc.poll() is not None:
                    err = ": " + proc.stderr.read().decode(errors="replace")[-300:]
                raise Failed("nginx + php-fpm did not start in the container" + err)
            # podman 4's forwarder (rootlessport) listens on *:HOSTPORT in the test namespace: 198.18.0.1 is one.
            url = "http://%s:%d/" % (ADDR_A, host_port)
            # Until podman's forwarder answers, then a warm-up, as the php row's script does, then the timed run.
            script = ('i=0; until ab -n 1 "$0" 2>/dev/null | grep -q "Document Length: *3 bytes"; do i=$((i + 1)); '
                      'if [ $i -gt 200 ]; then echo "no answer through the published port" >&2; exit 1; fi; '
                      'sleep 0.05; done; ab -q -n 200 -c 8 "$0" >/dev/null; exec ab -r -n "$1" -c 8 "$0"')
            out = run(tb.as_user(["/bin/sh", "-c", script, url, str(self.t["php_n"])]), 300,
                      "ab to nginx + php-fpm through the published port")
            if "Non-2xx responses" in out:
                raise Failed("php_pub: " + re.search(r"Non-2xx responses:\s+\d+", out).group(0))
            result = ab_totals(out)
            if result["failed"]:
                raise Failed("php_pub: %d failed requests" % result["failed"])
            result["host_port"], result["container_port"] = host_port, container_port
            return result
        finally:
            cfg.stop_detached(proc, name)  # podman rm -f by name

    def node(self, cfg):
        """A Node.js client, a new connection per request, against the namespace's nginx."""
        if not shutil.which("node"):
            apt_install(["nodejs"], "the Node.js client")
        seconds = self.t["ab"]
        first, last = self.nginx_rings[cfg.target].take(ports_needed(seconds, AB_RATE_CAP, AB_CHUNK) + 1, seconds)
        argv = ["node", cfg.path(os.path.join(self.php_dir, "node-client.js")), cfg.target, str(seconds * 1000),
                str(NODE_CONCURRENCY), str(AB_CHUNK)] + [str(port) for port in range(first, last + 1)]
        daemon = cfg.daemon
        before = proc_cpu_seconds(daemon.pid) if daemon else None
        out = run(cfg.wrap(argv), 120 + seconds, "node")
        cpu = proc_cpu_seconds(daemon.pid) - before if daemon else None
        m = re.search(r"node requests (\d+) failed (\d+) seconds ([\d.e+-]+) ports (\d+)", out)
        if not m or not int(m.group(1)):
            raise Failed("node: " + (out[-300:] or "no output"))
        if int(m.group(2)):
            raise Failed("node: %s requests failed" % m.group(2))
        self.made[cfg.key] = self.made.get(cfg.key, 0) + int(m.group(1))
        result = {"value": int(m.group(1)) / float(m.group(3)), "requests": int(m.group(1)), "ports": int(m.group(4))}
        if daemon:
            # The whole run's CPU (the container's start too: the daemon registers it, a few ms) over its
            # requests, each a connection of its own.
            result["daemon_cpu_s_per_1000"] = cpu / result["requests"] * 1000
        return result

    def tar(self, cfg):
        """Archive /usr/share, passes times in a row, timed inside (container start-up excluded).

        The archive goes to /dev/zero, which discards it as /dev/null would: GNU tar notices an archive
        on /dev/null and then only stats the files, while this way it opens, reads and closes every one
        (about 50,000 files, 430,000 syscalls a pass here).
        """
        passes = self.t["tar_passes"]
        tar = "/usr/bin/tar -cf /dev/zero /usr/share 2>/dev/null"
        loop = "for i in %s; do %s; done" % (" ".join(str(i) for i in range(passes)), tar)
        # One untimed pass first: whatever the machine dropped from its caches since the last
        # configuration ran is back before the clock starts.
        script = '%s; exec "$0" time /bin/sh -c "$1"' % tar
        out = run(cfg.wrap(["/bin/sh", "-c", script, cfg.path(self.client), loop]), 300, "tar")
        m = re.search(r"elapsed_us (\d+) status (\d+)", out)
        if not m:
            raise Failed("tar: no time: " + out[-300:])
        return {"value": int(m.group(1)) / 1e6 / passes, "passes": passes}

    def connect_clients(self, cfg, workload, wrappers=1, procs=1, pin=False, mode="connect", millis=None):
        """Timed connect/close clients of cfg started together: merged results and the daemon's cost.

        wrappers, procs, mode: as for Clients; pin: as for Clients, and it also pins the daemon (and its
        workers) there; millis: how long (default t["connect_ms"]).  With --py-spy, the daemon is
        recorded while the clients connect.
        """
        millis = millis or self.t["connect_ms"]
        daemon, spy = cfg.daemon, None
        with Clients(self, cfg, workload, mode, millis, wrappers, procs, pin) as clients, \
                pinned(daemon.pid if daemon and pin else None):
            try:
                if self.args.py_spy and daemon:
                    spy = self.start_py_spy(daemon.pid, "%s-%s" % (cfg.key, workload), millis)
                before = (proc_cpu_seconds(daemon.pid), proc_status(daemon.pid)) if daemon else None
                start = clients.go()
                time.sleep(max(0.0, start + millis / 1000 - time.time()))
                after = (proc_cpu_seconds(daemon.pid), proc_status(daemon.pid)) if daemon else None
                result = merge_clients(clients.outputs())
            finally:
                if spy:
                    self.finish_py_spy(*spy)
        total = result["connections"]
        self.made[cfg.key] = self.made.get(cfg.key, 0) + total
        if clients.ports:
            result["ports"] = clients.ports[1] - clients.ports[0] + 1
            # Every client turns through the range one port a connection: none gets much more than its share.
            result["most_to_one_port"] = int(math.ceil((total + result["errors"]) / result["ports"])) + len(
                clients.procs) * procs
            if result["most_to_one_port"] > PORT_LIMIT:
                result["warning"] = "%d connections to one server port (limit %d): the port's TIME_WAITs may " \
                                    "have slowed the loop down" % (result["most_to_one_port"], PORT_LIMIT)
        if before:
            time.sleep(0.5)  # the daemon learns of the clients' exits (pidfds) and frees what they held
            rss_exited, hwm = proc_status(daemon.pid)
            window = millis / 1000
            cpu = after[0] - before[0]
            result["daemon"] = {"cpu_s": cpu, "cores": cpu / window, "cpu_s_per_1000": cpu / total * 1000,
                                "rss_kib_before": before[1][0], "rss_kib_window_end": after[1][0],
                                "rss_kib_after_exit": rss_exited, "hwm_kib": hwm,
                                "connections_made_so_far": self.made[cfg.key]}
        return result

    def syscalls(self, cfg):
        """The daemon's syscalls per connect: strace -c -f on it and its workers during a loop of N connections.

        Untimed (strace slows every syscall down); the container's exit is counted too, a few calls.
        """
        if not shutil.which("strace"):
            apt_install(["strace"], "the daemons' syscall counts")
        table = os.path.join(self.tmp, "strace-%s.txt" % cfg.key)
        with Clients(self, cfg, "syscalls", "count", self.t["syscalls_n"]) as clients:
            pids = descendants(cfg.daemon.pid)
            argv = ["strace", "-c", "-f", "-o", table] + [arg for pid in pids for arg in ("-p", str(pid))]
            strace = tb.start_server(argv, netns=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                # Counted, not matched by a pattern repeated per pid: with a Go daemon's dozens of threads,
                # "(attached.*?){N}" backtracked for minutes.
                if not read_until(strace, lambda text: text.count("attached") >= len(pids), 30):
                    raise Failed("strace did not attach to the daemon")
                clients.go()
                result = merge_clients(clients.outputs())
            finally:
                strace.send_signal(signal.SIGINT)  # strace -c detaches and writes its table
                try:
                    strace.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
                tb.stop_server(strace)
        with open(table) as f:
            calls = strace_calls(f.read())
        if not calls:
            raise Failed("strace counted no syscall")
        attempts = result["connections"] + result["errors"]  # each one a notification for the daemon
        total = sum(calls.values())
        return {"value": total / attempts, "connections": result["connections"], "errors": result["errors"],
                "calls": total, "calls_by_syscall": calls,
                "top5": [{"syscall": name, "calls": calls[name], "per_connect": calls[name] / attempts}
                         for name in sorted(calls, key=lambda name: -calls[name])[:5]]}

    def start_py_spy(self, pid, key, millis):
        """py-spy (from the bench venv) recording pid and its child processes (keeper, daemon, workers),
        non-blocking, for the connecting window.

        key names the files: DIR/py-spy-KEY-N.txt (raw stacks) and DIR/py-spy-KEY-N-top.txt (hot spots).
        """
        venv_python, why = ensure_venv("py-spy")
        if not venv_python:
            log("no py-spy: " + why)
            return None
        self.spy_runs[key] = self.spy_runs.get(key, 0) + 1
        raw = os.path.join(self.args.py_spy, "py-spy-%s-%d.txt" % (key, self.spy_runs[key]))
        os.makedirs(self.args.py_spy, exist_ok=True)
        argv = [os.path.join(VENV, "bin", "py-spy"), "record", "--pid", str(pid), "--subprocesses", "--rate", "1000",
                "--nonblocking", "--format", "raw", "--duration", str(max(1, millis // 1000)), "--output", raw]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL), raw

    @staticmethod
    def finish_py_spy(proc, raw):
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            tb.stop_server(proc)
        if os.path.exists(raw):
            with open(raw) as f:
                text = f.read()
            with open(raw[:-4] + "-top.txt", "w") as f:
                f.write(hot_spots(text))


AB_LOOP = r"""
ms=$1 c=$2 n=$3 addr=$4
shift 4
now() { echo $(( $(/usr/bin/date +%s%N) / 1000000 )); }  # coreutils: busybox has no %N
end=$(( $(now) + ms ))
for p in "$@"; do
    ab -r -t $(( (end - $(now) + 999) / 1000 )) -n $n -c $c "http://$addr:$p/" || exit 1
    [ $(now) -ge $end ] && exit 0
done
"""


def ab_totals(out):
    """Requests, failures and the rate of one or more ab reports in a row (AB_LOOP's chunks)."""
    done = [int(n) for n in re.findall(r"Complete requests:\s+(\d+)", out)]
    failed = [int(n) for n in re.findall(r"Failed requests:\s+(\d+)", out)]
    taken = [float(t) for t in re.findall(r"Time taken for tests:\s+([\d.]+) seconds", out)]
    if not done or len(done) != len(taken) or not sum(taken):
        raise Failed("ab printed no rate: " + out[-300:])
    return {"value": sum(done) / sum(taken), "requests": sum(done), "failed": sum(failed),
            "chunks": len(done), "seconds": sum(taken), "most_to_one_port": max(done)}


def merge_clients(outputs):
    """The C clients' printed results, merged: conn/s over the longest client's window, connect() times."""
    total = errors = sum_us = last_errno = 0
    elapsed = []
    hist = {}
    per_second = []
    for m in re.finditer(r"count (\d+) errors (\d+) elapsed_us (\d+) sum_us (\d+) errno (\d+)\nhist([^\n]*)"
                         r"(?:\npersec([^\n]*))?", "\n".join(outputs)):
        for i, n in enumerate((m.group(7) or "").split()):
            if i == len(per_second):
                per_second.append(0)
            per_second[i] += int(n)
        total += int(m.group(1))
        errors += int(m.group(2))
        elapsed.append(int(m.group(3)) / 1e6)
        sum_us += int(m.group(4))
        for item in m.group(6).split():
            us, n = item.split(":")
            hist[int(us)] = hist.get(int(us), 0) + int(n)
        if int(m.group(2)):
            last_errno = int(m.group(5))
    if not elapsed:
        raise Failed("client printed: " + "".join(outputs)[-300:])
    if not total:
        raise Failed("no connection succeeded (errno %d)" % last_errno)
    return {"value": total / max(elapsed), "connections": total, "errors": errors, "clients": len(elapsed),
            "mean_us": sum_us / total, "p50_us": percentile(hist, 0.50), "p99_us": percentile(hist, 0.99),
            "max_us": max(hist),
            # connections in each whole second of the loop (the clients start together: seconds line up)
            "per_second": per_second[:int(max(elapsed))]}


def strace_calls(table):
    """{syscall: calls} from the table strace -c writes (its total line left out)."""
    calls = {}
    for line in table.splitlines():
        # "% time  seconds  usecs/call  calls  [errors]  syscall": errors is blank when there were none
        fields = line.split()
        if len(fields) in (5, 6) and re.match(r"[\d.]+$", fields[0]) and fields[-1] != "total":
            calls[fields[-1]] = calls.get(fields[-1], 0) + int(fields[3])
    return calls


def hot_spots(collapsed, top=25):
    """Self and inclusive sample shares per function, from py-spy's raw (collapsed stacks) output."""
    own, incl, total = {}, {}, 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    if not total:
        return "no samples\n"
    out = ["%d samples" % total, "", "self %   function (file)"]
    out += ["%6.1f   %s" % (100.0 * n / total, f) for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    out += ["", "total %  function (file)"]
    out += ["%6.1f   %s" % (100.0 * n / total, f) for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(out) + "\n"


def percentile(hist, q):
    total = sum(hist.values())
    seen = 0
    for us in sorted(hist):
        seen += hist[us]
        if seen >= q * total:
            return us
    return max(hist)


# Workloads: key, row label, unit, higher is better, how to measure, which value.
WORKLOADS = [
    ("iperf1", "iperf3 container -> host, 1 stream", "Gbit/s", True, lambda b, c: b.iperf3(c, 1)),
    ("iperf4", "iperf3 container -> host, 4 streams", "Gbit/s", True, lambda b, c: b.iperf3(c, 4)),
    ("iperf_pub", "iperf3 host -> container, published port (-p)", "Gbit/s", True,
     lambda b, c: b.iperf3_published(c)),
    ("ab1", "ab -c 1 against nginx, new connection per request", "req/s", True, lambda b, c: b.ab(c, 1)),
    ("ab8", "ab -c 8 against nginx, new connection per request", "req/s", True, lambda b, c: b.ab(c, 8)),
    ("connect", "connect/close loop, static C client", "conn/s", True, lambda b, c: b.connect_clients(c, "connect")),
    ("connect_pinned", "connect/close loop, client and daemon on CPU %d" % PINNED_CPU, "conn/s", True,
     lambda b, c: b.connect_clients(c, "connect_pinned", pin=True)),
    ("redis", "redis-benchmark -c 1 -t get,set (kept-alive connection)", "ms", False, lambda b, c: b.redis(c)),
    ("tar", "tar of /usr/share (no networking)", "s", False, lambda b, c: b.tar(c)),
    ("crowd", "20 clients connecting at once, static C client", "conn/s", True,
     lambda b, c: b.connect_clients(c, "crowd", wrappers=b.t["crowd"])),
    ("crowd1", "20 processes connecting at once in one container", "conn/s", True,
     lambda b, c: b.connect_clients(c, "crowd1", procs=b.t["crowd"])),
    ("udp_connect", "UDP lookups: a new connected socket, a 1-byte query and its echo, static C client",
     "queries/s", True,
     lambda b, c: b.connect_clients(c, "udp_connect", mode="udp")),
    ("unix1", "unix connect/close loop in one container", "conn/s", True,
     lambda b, c: b.connect_clients(c, "unix1", mode="unix")),
    ("unix4", "unix connect/close loop, 4 processes of one container", "conn/s", True,
     lambda b, c: b.connect_clients(c, "unix4", mode="unix", procs=4)),
    ("sendto", "sendto() of 64 bytes on one unconnected UDP socket, to 127.0.0.1", "ns", False,
     lambda b, c: b.sendto(c)),
    ("getent", "getent ahosts bench.test in a loop (dnsmasq)", "lookups/s", True, lambda b, c: b.lookups(c, "getent")),
    ("dig", "dig +short bench.test in a loop (dnsmasq)", "lookups/s", True, lambda b, c: b.lookups(c, "dig")),
    ("php", "ab -c 8 against nginx + php-fpm (unix socket) in one container", "req/s", True,
     lambda b, c: b.php(c)),
    ("php_pub", "ab -c 8 from the host through podman's -p to nginx + php-fpm (unix socket) in a container",
     "req/s", True, lambda b, c: b.php_published(c)),
    ("node", "Node.js HTTP client, a new connection per request, against nginx", "req/s", True,
     lambda b, c: b.node(c)),
    # The run-length check (--run-length; in the full run by default): the connect loop, short and long.
    ("runlen_short", "connect/close loop, short run", "conn/s", True,
     lambda b, c: b.connect_clients(c, "runlen_short", millis=b.t["runlen_short_ms"])),
    ("runlen_long", "connect/close loop, long run", "conn/s", True,
     lambda b, c: b.connect_clients(c, "runlen_long", millis=b.t["runlen_long_ms"])),
]
RUN_LENGTH_WORKLOADS = ("runlen_short", "runlen_long")
# The workloads of Bench.connect_clients, which sample the daemon's cost.
CONNECT_WORKLOADS = ("connect", "connect_pinned", "crowd", "crowd1", "udp_connect", "unix1", "unix4") + \
    RUN_LENGTH_WORKLOADS
NO_PROFILE = "slirp4netns"  # the base of the rows that compare with no profile: the same container without it
RUN_LENGTH_TOLERANCE = 0.9  # the long run's rate may be this much of the short run's, no less

# Rows of the table: (row key, label, unit, higher is better, workload key, path to the value).
ROWS = [
    ("iperf1", "bulk TCP container -> host, 1 stream (iperf3)", "Gbit/s", True, "iperf1", ("value",)),
    ("iperf4", "bulk TCP container -> host, 4 streams (iperf3 -P 4)", "Gbit/s", True, "iperf4", ("value",)),
    ("iperf_pub", "bulk TCP host -> container, published port (iperf3)", "Gbit/s", True, "iperf_pub",
     ("value",)),
    ("ab1", "HTTP, new connection per request, ab -c 1 (nginx)", "req/s", True, "ab1", ("value",)),
    ("ab8", "HTTP, new connection per request, ab -c 8 (nginx)", "req/s", True, "ab8", ("value",)),
    ("connect", "connect/close loop, static C client", "conn/s", True, "connect", ("value",)),
    ("connect_us", "connect/close loop: mean connect()", "us", False, "connect", ("mean_us",)),
    ("connect_pinned", "connect/close loop, client and daemon pinned to CPU %d" % PINNED_CPU, "conn/s", True,
     "connect_pinned", ("value",)),
    ("connect_pinned_us", "pinned connect/close loop: mean connect()", "us", False, "connect_pinned",
     ("mean_us",)),
    ("redis_get_p50", "redis GET p50, 1 kept-alive connection", "ms", False, "redis", ("get", "p50_latency_ms")),
    ("redis_get_p99", "redis GET p99", "ms", False, "redis", ("get", "p99_latency_ms")),
    ("redis_set_p50", "redis SET p50", "ms", False, "redis", ("set", "p50_latency_ms")),
    ("redis_set_p99", "redis SET p99", "ms", False, "redis", ("set", "p99_latency_ms")),
    ("redis_get_rps", "redis GET requests/s (1 connection)", "req/s", True, "redis", ("get", "rps")),
    ("tar", "tar of /usr/share to /dev/zero, no networking", "s", False, "tar", ("value",)),
    ("crowd", "20 clients connecting at once: total", "conn/s", True, "crowd", ("value",)),
    ("crowd_p99", "20 clients connecting at once: p99 connect()", "us", False, "crowd", ("p99_us",)),
    ("crowd1", "20 processes connecting at once in one container: total", "conn/s", True, "crowd1", ("value",)),
    ("crowd1_p99", "20 processes in one container: p99 connect()", "us", False, "crowd1", ("p99_us",)),
    ("udp_connect", "UDP lookups, a connected socket each (glibc's resolver does so): query and answer",
     "queries/s", True, "udp_connect", ("value",)),
    ("udp_connect_us", "UDP lookups: mean connect()", "us", False, "udp_connect", ("mean_us",)),
    # Rows with a base: their ratio is to that configuration (no profile), not to the host.
    ("unix1", "unix connect/close loop in one container (server in it too), static C client; ratio to "
     "no profile", "conn/s", True, "unix1", ("value",), NO_PROFILE),
    ("unix4", "the same, 4 processes of one container; ratio to no profile", "conn/s", True, "unix4",
     ("value",), NO_PROFILE),
    ("sendto", "sendto() of 64 bytes, one unconnected UDP socket to 127.0.0.1: per call; ratio to no "
     "profile", "ns", False, "sendto", ("value",), NO_PROFILE),
    ("getent", "DNS: getent ahosts, a process a lookup (dnsmasq on the test namespace); ratio to no profile",
     "lookups/s", True, "getent", ("value",), NO_PROFILE),
    ("dig", "DNS: dig +short @dnsmasq, a process a lookup; ratio to no profile", "lookups/s", True, "dig",
     ("value",), NO_PROFILE),
    ("php", "nginx + php-fpm (4 children, unix socket) in one container, ab -c 8 from inside it; ratio "
     "to no profile", "req/s", True, "php", ("value",), NO_PROFILE),
    ("php_pub", "nginx + php-fpm, ab from the host through a published port (podman -p; ab -c 8 in the test "
     "namespace); ratio to no profile", "req/s", True, "php_pub", ("value",), NO_PROFILE),
    ("node", "HTTP, new connection per request, Node.js client (http.get, agent: false, %d at a time; nginx)"
     % NODE_CONCURRENCY, "req/s", True, "node", ("value",)),
    ("runlen_short", "connect/close loop, short run (run-length check)", "conn/s", True, "runlen_short",
     ("value",)),
    ("runlen_long", "connect/close loop, long run (run-length check)", "conn/s", True, "runlen_long", ("value",)),
]

# Daemon cost rows: (key, label, format of the value).
DAEMON_ROWS = [
    ("connect.cpu_s_per_1000", "CPU seconds per 1000 connections, connect loop", "%.3f"),
    ("connect.cores", "CPU cores busy during the connect loop", "%.2f"),
    ("connect_pinned.cpu_s_per_1000", "CPU seconds per 1000 connections, connect loop pinned to CPU %d"
     % PINNED_CPU, "%.3f"),
    ("crowd.cpu_s_per_1000", "CPU seconds per 1000 connections, 20 clients at once", "%.3f"),
    ("crowd.cores", "CPU cores busy with 20 clients connecting", "%.2f"),
    ("crowd.rss_mib_open", "RSS with 20 containers connecting, MiB", "%.1f"),
    ("crowd1.cpu_s_per_1000", "CPU seconds per 1000 connections, 20 processes in one container", "%.3f"),
    ("node.cpu_s_per_1000", "CPU seconds per 1000 connections, Node.js client (a connection a request; "
     "the whole run, container start included)", "%.3f"),
    ("rss_first_mib", "RSS after the first round's connect workloads (clients gone; every worker has served), MiB",
     "%.1f"),
    ("rss_last_mib", "RSS after the last one, MiB", "%.1f"),
    ("made_between", "connections made in between", "{:,.0f}"),
    ("rss_growth_kib_per_1000", "RSS growth per 1000 connections made, KiB", "%.2f"),
    ("hwm_mib", "peak RSS (VmHWM), MiB", "%.1f"),
]
CROWD_BEFORE = 13835  # conn/s: bypass4netns.py's 20-container storm in the run issue 9 quotes
# The rows compared with the floor (--floor): every workload of connections the daemon serves.
FLOOR_ROWS = ("ab1", "ab8", "node", "connect", "connect_pinned", "crowd", "crowd1", "udp_connect", "unix1", "unix4",
              "php", "php_pub", "runlen_short", "runlen_long")
CPU_PER_1000_TARGET = 0.035  # daemon CPU seconds per 1000 connections, issue 9's target
MEMORY_GROWTH_LIMIT = 5.0  # KiB per 1000 connections: 5 bytes a connection, less than any Python object


def daemon_summary(raw, key):
    """The daemon's cost, from the connect workloads of one configuration."""
    out = {}
    for workload in CONNECT_WORKLOADS:
        if workload not in raw:
            continue
        runs = [r["daemon"] for r in raw[workload][key] if "daemon" in r]
        for name in ("cpu_s_per_1000", "cores"):
            values = [r[name] for r in runs]
            out["%s.%s" % (workload, name)] = {"median": statistics.median(values) if values else None,
                                               "max": max(values) if values else None}
        if workload == "crowd" and runs:
            out["crowd.rss_mib_open"] = {"median": statistics.median(r["rss_kib_window_end"] for r in runs) / 1024}
    # Node.js's requests, each a connection: its CPU per connect, from the whole run (Bench.node).
    node = [r["daemon_cpu_s_per_1000"] for r in raw.get("node", {}).get(key, []) if "daemon_cpu_s_per_1000" in r]
    if node:
        out["node.cpu_s_per_1000"] = {"median": statistics.median(node), "max": max(node)}
    # Chronological samples taken once each connect workload's clients had exited.
    samples, warm = [], 0
    rounds = max([r["round"] for w in CONNECT_WORKLOADS for r in raw.get(w, {}).get(key, [])] + [-1]) + 1
    for rnd in range(rounds):
        for workload in CONNECT_WORKLOADS:
            for r in raw.get(workload, {}).get(key, []):
                if r["round"] == rnd and "daemon" in r:
                    samples.append(r["daemon"])
        if rnd == 0 and rounds > 1:
            # Growth is counted from the end of the first round: by then every
            # worker has served (the storms share a container's filters with all
            # of them), and what a worker's first notifications touch once is not
            # growth with connections.
            warm = max(0, len(samples) - 1)
    if samples:
        first, last = samples[warm], samples[-1]
        made = last["connections_made_so_far"] - first["connections_made_so_far"]
        out["rss_first_mib"] = {"median": first["rss_kib_after_exit"] / 1024}
        out["rss_last_mib"] = {"median": last["rss_kib_after_exit"] / 1024}
        out["made_between"] = {"median": made}
        out["rss_growth_kib_per_1000"] = {
            "median": (last["rss_kib_after_exit"] - first["rss_kib_after_exit"]) / made * 1000 if made else None}
        out["hwm_mib"] = {"median": max(s["hwm_kib"] for s in samples) / 1024}
        out["rss_samples_kib"] = [s["rss_kib_after_exit"] for s in samples]
    return out



def top_syscalls(counted):
    """'ioctl 4.00, ...': the top 5 of a Bench.syscalls result, per connect."""
    return ", ".join("%s %.2f" % (t["syscall"], t["per_connect"]) for t in counted["top5"])


def dig(result, path):
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


# ---------------------------------------------------------------------------
# Results: JSON, Markdown, chart
# ---------------------------------------------------------------------------

def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine_info():
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(argv):
        try:
            out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                                 timeout=30).stdout
            return out.strip().splitlines()[0] if out.strip() else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    commit = version(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    with open(os.path.join(ROOT, "bypass4netns.py"), "rb") as f:
        engine_sha = hashlib.sha256(f.read()).hexdigest()[:12]
    dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "bypass4netns.py"],
                           stderr=subprocess.DEVNULL).returncode != 0
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "commit": commit + (" (bypass4netns.py modified)" if dirty else ""),
        "bypass4netns.py sha256": engine_sha,
        "loadavg_start": loadavg(),
        "podman": version(["podman", "--version"]),
        "runc": version(["runc", "--version"]),
        "crun": version(["crun", "--version"]),
        "slirp4netns": version(["slirp4netns", "--version"]),
        "pasta": version(["dpkg-query", "-W", "-f=passt ${Version}", "passt"]),
        "iperf3": version(["iperf3", "--version"]),
        "nginx": version(["nginx", "-v"]),
        "redis-benchmark": version(["redis-benchmark", "--version"]),
    }


def speed(value, base, higher):
    """value's speed relative to base: value / base for rates, base / value for times."""
    return value / base if higher else base / value


def late_over_early(per_second):
    """A loop's rate in the second half of its whole seconds over the first half's, its first second (the
    warm-up: containers still starting, a daemon's workers waking) left out; None under 3 seconds."""
    seconds = per_second[1:]
    if len(seconds) < 2:
        return None
    half = len(seconds) // 2
    early = sum(seconds[:half]) / half
    late = sum(seconds[half:]) / (len(seconds) - half)
    return late / early if early else None


def run_length(summary, tolerance=RUN_LENGTH_TOLERANCE):
    """Per configuration: the connect loop's short and long runs' medians, long / short, the long run's late
    rate over its early one (late_over_early), and whether the figure holds.

    It falls only if both ratios are below tolerance: a long run slower than the short one while its own
    second half is as fast as its first is the machine's load between the two runs, not the run's length.
    """
    out = {}
    if "runlen_short" not in summary or "runlen_long" not in summary:
        return out
    for key, short in summary["runlen_short"]["configs"].items():
        long_entry = summary["runlen_long"]["configs"].get(key, {})
        s, l = short["median"], long_entry.get("median")
        ratio = l / s if s and l is not None else None
        within = long_entry.get("late_over_early")
        if ratio is None:
            holds = None
        else:
            holds = ratio >= tolerance or (within is not None and within >= tolerance)
        out[key] = {"short": s, "long": l, "ratio": ratio, "late_over_early": within, "holds": holds}
    return out


def floor_ratios(summary, key="bypass", floor="floor"):
    """key's connect rate and daemon CPU per connect over the floor's, for every connect workload both have.

    Returns [{workload, label, rate, floor_rate, rate_ratio, cpu_ms, floor_cpu_ms, cpu_ratio}] (CPU in ms
    per connect: CPU s per 1000 connections; None where the daemon's CPU was not sampled, as for ab).
    """
    rows = []
    daemon = summary.get("daemon", {})
    for row_key in FLOOR_ROWS:
        row = summary.get(row_key)
        if not row:
            continue
        mine, theirs = (row["configs"].get(k, {}).get("median") for k in (key, floor))
        if mine is None or theirs is None:
            continue
        cpu = [daemon.get(k, {}).get("%s.cpu_s_per_1000" % row_key, {}).get("median") for k in (key, floor)]
        rows.append({"workload": row_key, "label": row["label"], "rate": mine, "floor_rate": theirs,
                     "rate_ratio": mine / theirs if theirs else None, "cpu_ms": cpu[0], "floor_cpu_ms": cpu[1],
                     "cpu_ratio": cpu[0] / cpu[1] if cpu[0] is not None and cpu[1] else None})
    return rows


def pair_ratios(summary, key="podman5_bypass", base="podman5"):
    """key's median over base's in every row both have: the trade of adding the daemon to base's setup.

    Returns [{row, label, unit, base, with, speed}]: speed is key's relative to base's (higher is better:
    key / base for rates, base / key for times), so below 1 the daemon costs, above 1 it gains.
    """
    rows = []
    for row_key, row in summary.items():
        if row_key == "daemon":
            continue
        theirs, mine = (row["configs"].get(k, {}).get("median") for k in (base, key))
        if theirs is None or mine is None:
            continue
        rows.append({"row": row_key, "label": row["label"], "unit": row["unit"], "base": theirs, "with": mine,
                     "speed": speed(mine, theirs, row["higher_is_better"]) if theirs and mine else None})
    return rows


def summarize(results):
    """Medians per configuration and row, speed relative to host."""
    summary = {}
    for row_key, label, unit, higher, workload, path, *base in ROWS:
        if workload not in results["raw"]:
            continue  # not run (--only, --run-length, --quick)
        per_config = {}
        for cfg in results["configs"]:
            runs = results["raw"][workload][cfg["key"]]
            values = [dig(r, path) for r in runs if "error" not in r]
            values = [v for v in values if v is not None]
            errors = sorted({r["error"] for r in runs if "error" in r})
            entry = {"median": statistics.median(values) if values else None, "n": len(values),
                     "values": values}
            if errors:
                entry["errors"] = errors
            warnings = sorted({r["warning"] for r in runs if "warning" in r})
            if warnings:
                entry["warnings"] = warnings
            within = [late_over_early(r.get("per_second") or []) for r in runs if "error" not in r]
            within = [w for w in within if w is not None]
            if within and row_key == "runlen_long":
                entry["late_over_early"] = statistics.median(within)
            failed = sum(r.get("failed") or 0 for r in runs if "error" not in r)
            if failed:
                entry["failed"] = failed  # requests or lookups that failed, over the rounds
            per_config[cfg["key"]] = entry
        host = per_config.get("host", {}).get("median")
        for cfg_key, entry in per_config.items():
            m = entry["median"]
            if host and m:
                entry["vs_host"] = speed(m, host, higher)
            if not base:
                continue
            own = OWN_BASE.get(cfg_key, base[0])  # podman 5's columns: podman 5's container without the profile
            if own != base[0]:
                entry["base"] = own
            base_m = per_config.get(own, {}).get("median")
            if base_m and m:
                entry["vs_base"] = speed(m, base_m, higher)
        summary[row_key] = {"label": label, "unit": unit, "higher_is_better": higher, "configs": per_config}
        if base:
            summary[row_key]["base"] = base[0]
    daemon = {}
    for cfg in results["configs"]:
        if cfg["daemon"]:
            daemon[cfg["key"]] = daemon_summary(results["raw"], cfg["key"])
    summary["daemon"] = daemon
    return summary


def fmt(value, unit):
    if value is None:
        return "n/a"
    if unit in ("Gbit/s",):
        return "%.2f" % value
    if unit == "ms":
        return "%.3f" % value
    if unit == "s":
        return "%.2f" % value
    return "{:,.0f}".format(value)


def targets(results, summary):
    """The issue's targets, each with the measured numbers and met / missed."""
    lines = []
    cfgs = [c["key"] for c in results["configs"]]
    if "bypass" not in cfgs:
        return lines

    def med(row, cfg="bypass", what="vs_host"):
        return summary.get(row, {}).get("configs", {}).get(cfg, {}).get(what)

    def verdict(ok):
        return "n/a" if ok is None else ("met" if ok else "**missed**")

    for row, what in (("iperf1", "container -> host, 1 stream"), ("iperf4", "container -> host, 4 streams"),
                      ("iperf_pub", "host -> container (-p)")):
        if row not in summary:
            continue
        r = med(row)
        lines.append("| bulk TCP >= 0.95x host, %s | %s | %s |" % (
            what, "%.2fx" % r if r else "n/a (%s)" % "; ".join(
                summary[row]["configs"].get("bypass", {}).get("errors", ["no value"])),
            verdict(None if r is None else r >= 0.95)))
    for row, what in (("connect", "connect/close loop"), ("ab1", "ab -c 1"), ("ab8", "ab -c 8"),
                      ("crowd", "20 containers connecting at once"),
                      ("crowd1", "20 processes of one container connecting at once")):
        if row not in summary:
            continue
        b = med(row, what="median")
        others = {c: med(row, c, "median") for c in ("slirp4netns", "pasta") if c in cfgs}
        if not others:
            continue  # neither was measured: nothing to be ahead of
        ahead = b is not None and all(o is not None and b > o for o in others.values())
        lines.append("| connection setup ahead of slirp4netns and pasta, %s | %s vs %s | %s |" % (
            what, fmt(b, "conn/s") if b else "n/a",
            ", ".join("%s %s" % (c, fmt(o, "conn/s") if o else "n/a") for c, o in others.items()),
            verdict(None if b is None else ahead)))
    crowd = med("crowd", what="median")
    if crowd:
        lines.append("| 20-container storm >= 1.5x the issue's %s conn/s | %s conn/s | %s |" % (
            fmt(CROWD_BEFORE, "conn/s"), fmt(crowd, "conn/s"), verdict(crowd >= 1.5 * CROWD_BEFORE)))
    tar_b = med("tar", what="median")
    tar_s = med("tar", "slirp4netns", "median")
    if tar_b and tar_s:
        ratio = tar_b / tar_s
        lines.append("| non-network work with the profile <= 1.10x without it (tar time, bypass4netns.py / "
                     "slirp4netns container) | %.3fx | %s |" % (ratio, verdict(ratio <= 1.10)))
    d = summary["daemon"].get("bypass", {})
    per_1000 = d.get("connect.cpu_s_per_1000", {}).get("median")
    if per_1000 is not None:
        lines.append("| daemon CPU <= %.3f s per 1000 connections (connect loop) | %.3f s | %s |" % (
            CPU_PER_1000_TARGET, per_1000, verdict(per_1000 <= CPU_PER_1000_TARGET)))
    cores = [d.get(k, {}).get("max") for k in ("connect.cores", "crowd.cores")]
    cores = [c for c in cores if c is not None]
    if cores:
        lines.append("| daemon CPU <= 1 core at its highest connection rate | %.2f cores at most | %s |" % (
            max(cores), verdict(max(cores) <= 1.0)))
    growth = d.get("rss_growth_kib_per_1000", {}).get("median")
    if growth is not None:
        lines.append("| daemon memory does not grow with connections made (< %g KiB per 1000, i.e. a few bytes "
                     "a connection) | %.2f KiB per 1000 connections over %s connections (RSS %.1f -> %.1f MiB) "
                     "| %s |" % (MEMORY_GROWTH_LIMIT, growth, "{:,}".format(d["made_between"]["median"]),
                                 d["rss_first_mib"]["median"], d["rss_last_mib"]["median"],
                                 verdict(growth < MEMORY_GROWTH_LIMIT)))
    return lines


def markdown(results, summary):
    info = results["machine"]
    cfgs = results["configs"]
    out = ["# bypass4netns.py benchmark", "",
           "Measured %s on Linux %s, %s (%d CPUs), commit %s (bypass4netns.py sha256 %s); %s, %d round(s)%s; "
           "medians." % (
               info["date"], info["kernel"], info["cpu"], info["cpus"], info["commit"],
               info["bypass4netns.py sha256"],
               "quick mode" if results["quick"] else "full mode", results["rounds"],
               ", runtime " + results["runtime"]),
           "",
           "Each cell: the median, then its speed relative to the host (higher is better: "
           "for rates this / host, for times and latencies host / this); in the rows that say \"ratio to "
           "no profile\", relative to the slirp4netns container instead (the same container without the "
           "seccomp profile%s)." % ("; the podman 5 columns relative to podman 5 + pasta, the same container "
                                    "without the profile" if any(c["key"] in PODMAN5_CONFIGS for c in cfgs) else ""),
           "",
           "| workload | unit | " + " | ".join(c["label"] for c in cfgs) + " |",
           "|---|---|" + "---:|" * len(cfgs)]
    for row_key, row in summary.items():
        if row_key == "daemon":
            continue
        cells = []
        for c in cfgs:
            e = row["configs"][c["key"]]
            if e["median"] is None:
                cells.append("n/a")
            elif "base" in row:
                cells.append(fmt(e["median"], row["unit"]) + (
                    " (%.2fx)" % e["vs_base"] if "vs_base" in e and c["key"] != e.get("base", row["base"]) else ""))
            elif "vs_host" in e and c["key"] != "host":
                cells.append("%s (%.2fx)" % (fmt(e["median"], row["unit"]), e["vs_host"]))
            else:
                cells.append(fmt(e["median"], row["unit"]))
        out.append("| %s | %s | %s |" % (row["label"], row["unit"], " | ".join(cells)))
    notes = []
    for row_key, row in summary.items():
        if row_key == "daemon":
            continue
        for c in cfgs:
            if row["configs"][c["key"]].get("failed"):
                notes.append("%s, %s: %d request(s) or lookup(s) failed over the rounds (a lookup's timeout "
                             "is in the wall time)" % (c["label"], row["label"], row["configs"][c["key"]]["failed"]))
            for error in row["configs"][c["key"]].get("errors", []) + row["configs"][c["key"]].get("warnings", []):
                note = "%s, %s: %s" % (c["label"], row["label"], error)
                if note not in notes:
                    notes.append(note)
    for c in cfgs:
        for why in c.get("restarts", []):
            notes.append("%s: the daemon had ended (%s) and was started again before the next measurement"
                         % (c["label"], why))
    if notes:
        out += ["", "Not measured (n/a) or failed in some rounds:", ""] + ["- " + n for n in notes]
    outliers = []
    for row_key, row in summary.items():
        if row_key == "daemon" or row["unit"] not in ("Gbit/s", "req/s", "conn/s", "s"):
            continue
        for c in cfgs:
            e = row["configs"][c["key"]]
            for rnd, v in enumerate(e["values"]):
                if e["median"] and v and not 1 / 3 <= v / e["median"] <= 3:
                    outliers.append("%s, %s: %s %s in one round (median %s)" % (
                        c["label"], row["label"], fmt(v, row["unit"]), row["unit"], fmt(e["median"], row["unit"])))
    if outliers:
        out += ["", "Rounds more than 3x away from their median (kept in the medians and in results.json):",
                ""] + ["- " + o for o in outliers]
    daemons = [c for c in cfgs if c["daemon"]]
    if daemons:
        out += ["", "## Daemon cost", "",
                "Read from /proc/PID/stat and /proc/PID/status of the daemon around the connect workloads "
                "(medians over the rounds; CPU cores = CPU seconds / wall seconds of the connecting window; "
                "RSS samples taken once the clients had exited; connections made counts ab requests and "
                "the C clients' connections).  The syscall rows: `strace -c -f -p PID` on the daemon and each "
                "of its child processes, during a connect/close loop of its own after the rounds (syscalls "
                "per connection attempt; the container's exit adds a few calls).", "",
                "| | " + " | ".join(c["label"] for c in daemons) + " |", "|---|" + "---:|" * len(daemons)]
        for key, label, form in DAEMON_ROWS:
            cells = []
            for c in daemons:
                v = summary["daemon"].get(c["key"], {}).get(key, {}).get("median")
                cells.append("n/a" if v is None else (form.format(v) if "{" in form else form % v))
            out.append("| %s | %s |" % (label, " | ".join(cells)))
        counted = [results.get("syscalls", {}).get(c["key"], {}) for c in daemons]
        if any(counted):
            out.append("| syscalls per connect, strace -c -f over %s connections (untimed) | %s |" % (
                "{:,}".format(results["durations"]["syscalls_n"]),
                " | ".join("%.1f" % e["value"] if "value" in e else "n/a" for e in counted)))
            out.append("| top 5 syscalls, per connect | %s |" % " | ".join(
                top_syscalls(e) if "value" in e else "n/a" for e in counted))
        for c, e in zip(daemons, counted):
            if "error" in e:
                out += ["", "%s: syscalls not counted: %s" % (c["label"], e["error"])]
        for c in daemons:
            if c.get("log_errors"):
                out += ["", "%s's log had %d error line(s), e.g.: `%s`" % (
                    c["label"], c.get("log_error_count", len(c["log_errors"])), c["log_errors"][0][:200])]
    checked = results.get("run_length") or {}
    if checked:
        d = results["durations"]
        out += ["", "## Run length", "",
                "The connect/close loop run for %g s and for %g s in each configuration (interleaved like the "
                "other workloads; fresh server ports, see Setup): the figure must not fall with the run's length. "
                "It falls if the long run is below %.2f of the short one and its own second half below %.2f of "
                "its first (a long run slower than the short one but steady within itself met a busier "
                "machine)." % (d["runlen_short_ms"] / 1000, d["runlen_long_ms"] / 1000, RUN_LENGTH_TOLERANCE,
                               RUN_LENGTH_TOLERANCE), "",
                "| | " + " | ".join(c["label"] for c in cfgs if c["key"] in checked) + " |",
                "|---|" + "---:|" * sum(1 for c in cfgs if c["key"] in checked)]
        for what, label in (("short", "%g s run, conn/s" % (d["runlen_short_ms"] / 1000)),
                            ("long", "%g s run, conn/s" % (d["runlen_long_ms"] / 1000))):
            out.append("| %s | %s |" % (label, " | ".join(
                fmt(checked[c["key"]][what], "conn/s") for c in cfgs if c["key"] in checked)))
        out.append("| long / short | %s |" % " | ".join(
            "n/a" if checked[c["key"]]["ratio"] is None else "%.2f" % checked[c["key"]]["ratio"]
            for c in cfgs if c["key"] in checked))
        out.append("| long run: its second half / its first (first second left out) | %s |" % " | ".join(
            "n/a" if checked[c["key"]]["late_over_early"] is None else
            "%.2f" % checked[c["key"]]["late_over_early"] for c in cfgs if c["key"] in checked))
        out.append("| the figure | %s |" % " | ".join(
            "n/a" if checked[c["key"]]["holds"] is None else ("holds" if checked[c["key"]]["holds"] else "**falls**")
            for c in cfgs if c["key"] in checked))
    vs_floor = results.get("vs_floor")
    if vs_floor:
        out += ["", "## bypass4netns.py against the floor", "",
                "The floor (`--floor %s`): a minimal, unsafe switcher, the mechanism's cost and nothing else. "
                "Ratios are bypass4netns.py / floor: of the connect rate (below 1: slower than the floor) and of "
                "the daemon's CPU per connect (above 1: more CPU a connect; CPU is sampled around the C "
                "clients' loops, and over Node.js's whole run)." % results["floor"], "",
                "| workload | bypass4netns.py | floor | rate ratio | CPU ms per connect, bypass4netns.py "
                "| floor | CPU ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in vs_floor:
            unit = summary[r["workload"]]["unit"]
            out.append("| %s | %s %s | %s | %s | %s | %s | %s |" % (
                r["label"].replace("; ratio to no profile", ""), fmt(r["rate"], unit), unit, fmt(r["floor_rate"], unit),
                "n/a" if r["rate_ratio"] is None else "%.2fx" % r["rate_ratio"],
                "n/a" if r["cpu_ms"] is None else "%.3f" % r["cpu_ms"],
                "n/a" if r["floor_cpu_ms"] is None else "%.3f" % r["floor_cpu_ms"],
                "n/a" if r["cpu_ratio"] is None else "%.2fx" % r["cpu_ratio"]))
    pair = results.get("podman5_pair")
    if pair:
        labels = {c["key"]: c["label"] for c in cfgs}
        out += ["", "## podman 5: pasta alone and with bypass4netns.py", "",
                "The trade a podman 5 user makes: %s against %s, the same rootless container of the Debian 13 bed "
                "(crun, podman 5's default network, pasta), interleaved with the other columns.  Speed: with the "
                "daemon relative to without it (higher is better; below 1 the daemon costs)." % (
                    labels["podman5_bypass"], labels["podman5"]), "",
                "| workload | unit | %s | %s | speed |" % (labels["podman5"], labels["podman5_bypass"]),
                "|---|---|---:|---:|---:|"]
        for r in pair:
            out.append("| %s | %s | %s | %s | %s |" % (
                r["label"].replace("; ratio to no profile", ""), r["unit"], fmt(r["base"], r["unit"]),
                fmt(r["with"], r["unit"]), "n/a" if r["speed"] is None else "%.2fx" % r["speed"]))
    lines = targets(results, summary)
    if lines:
        out += ["", "## Targets (issues 6 and 9)", "", "| target | measured | |", "|---|---|---|"] + lines
    out += ["", "## Setup", "",
            "- host: the client runs directly in the test namespace, as the test user.",
            "- slirp4netns: `podman run --network slirp4netns` (rootless, %s), podman's default seccomp "
            "profile." % results["runtime"],
            "- pasta: `pasta --config-net -- CLIENT` as the test user; its clients use 198.18.1.1 (pasta "
            "copies 198.18.0.1 into its namespace).",
            "- bypass4netns.py: the same container with the profile from seccomp-gen.py and "
            "`bypass4netns.py --ignore=%s -p HOSTPORT:%d` running (no --debug)." % (IGNORE, PUBLISHED_PORT)]
    if any(c["key"] == "unguarded" for c in cfgs):
        out.append("- unguarded: the bypass4netns.py configuration with `--no-fd-swap-guard "
                   "--no-udp-loopback-guard` added.")
    if any(c["key"] in PODMAN5_CONFIGS for c in cfgs):
        b13 = results.get("bed13", {})
        out.append("- podman 5 + pasta: `podman run --network pasta` (rootless, crun) in tests/bed13.py's Debian 13 "
                   "bed (%s; %s; %s), podman 5's default seccomp profile; pasta copies 198.18.0.1/24 into the "
                   "container, so its clients use 198.18.1.1, as the pasta column's.  Workloads whose tools the "
                   "Debian 13 root lacks are n/a (see above)." % (
                       b13.get("podman", "?"), b13.get("crun", "?"), b13.get("pasta", "?")))
        out.append("- podman 5 + pasta + bypass4netns.py: the same container with the profile seccomp-gen.py "
                   "merges into podman 5's own (`--base %s`) and `bypass4netns.py --ignore=%s -p HOSTPORT:%d` "
                   "running; in the rows that say \"ratio to no profile\", its ratio is to podman 5 + pasta." % (
                       b13.get("profile base", "?"), IGNORE, PUBLISHED_PORT))
    if any(c["key"] == "peer" for c in cfgs):
        if results.get("peer_debian"):
            out.append("- peer: the Go tool, %s, with the same flags, on the slirp4netns container." % results["peer"])
        else:
            out.append("- peer: `%s` with the same flags." % results["peer"])
    if any(c["key"] == "floor" for c in cfgs):
        out.append("- floor: `%s` (outside the project) with the same flags and seccomp-gen.py's profile."
                   % results["floor"])
    if results.get("stages"):
        out.append("- bypass4netns.py ran under tests/stages.py (`--stages`): its figures include the cost of "
                   "a clock around each stage; the stage profile is in %s/stages.md." % results["stages"])
    out += ["- Servers in the test namespace, as root: iperf3 -s, nginx (1 worker, keep-alive off), "
            "redis-server, and the C client's accept-and-close server; dnsmasq on 198.18.0.1 and 198.18.1.1 "
            "port 53 (--no-resolv --no-hosts, address=/bench.test/198.18.0.5), every container given "
            "`--dns 198.18.0.1`, the host's and pasta's clients a resolv.conf of their own (pasta's: "
            "198.18.1.1, since 198.18.0.1 is its own address).",
            "- Server ports: no server port takes more than %s connections a minute (slirp4netns and pasta "
            "leave a client-side TIME_WAIT a connection, and past ~28,000 of them towards one port every "
            "connect() there slows down in the kernel's ephemeral-port search).  The C clients connect to "
            "each port of a range in turn, a range of one port for each %s connections the loop could make "
            "at %s conn/s; ab moves to the next port every %s requests; a port is used again only %d s "
            "after its last measurement." % ("{:,}".format(PORT_LIMIT), "{:,}".format(PER_PORT),
                                             "{:,}".format(RATE_CAP), "{:,}".format(AB_CHUNK), REUSE_AFTER),
            "- Pinned connect loop: the client under `taskset -c {cpu}`, and for the daemon configurations "
            "every thread of the daemon and of its child processes on CPU {cpu} too while the client connects "
            "(their affinity restored afterwards); slirp4netns and pasta are not pinned.  20 clients at "
            "once: 20 containers (20 pastas, 20 processes for the host), or 20 processes forked by one client "
            "in one container (one pasta).".format(cpu=PINNED_CPU),
            "- Durations: iperf3 {iperf} s a test, ab {ab} s, connect loops {connect_ms} ms, redis-benchmark "
            "{redis_n} requests a test, tar {tar_passes} passes in a row, sendto {sendto_ms} ms, {getent_n} getent "
            "and {dig_n} dig lookups, nginx + php-fpm {php_n} requests (from inside and from the host), Node.js {ab} s; each once per round (the "
            "run-length check: {runlen_short_ms} and {runlen_long_ms} ms).".format(
                **results["durations"]),
            "- Tools: %s." % "; ".join("%s" % info[k] for k in ("podman", "runc", "crun", "slirp4netns", "pasta",
                                                               "iperf3", "nginx", "redis-benchmark")),
            "- Command: `%s`; it took %.0f s; load average %s at the start, %s at the end." % (
                results["command"], results["seconds"], info["loadavg_start"], info["loadavg_end"]), "",
            "The machine is shared and the numbers are noisy: they are reported as measured.", ""]
    return "\n".join(out)


CHART_ROWS = ["iperf1", "iperf4", "iperf_pub", "ab1", "ab8", "connect", "connect_pinned", "redis_get_p50",
              "redis_set_p50", "tar", "crowd", "crowd1", "udp_connect"]


def chart(json_path, png_path):
    """Draw the chart (run with the bench venv's python, which has matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(json_path) as f:
        results = json.load(f)
    summary, info = results["summary"], results["machine"]
    cfgs = [c for c in results["configs"]]
    rows = [r for r in CHART_ROWS if r in summary]
    fig, ax = plt.subplots(figsize=(11, 0.9 * len(rows) + 2.2))
    height = 0.8 / len(cfgs)
    missing = []
    colors = ["#4d4d4d", "#d9822b", "#7b5ea7", "#2a9d4b", "#3070b3", "#c03a3a", "#e6b422", "#1b9e9e"]
    for i, c in enumerate(cfgs):
        ys, xs, labels = [], [], []
        for j, r in enumerate(rows):
            e = summary[r]["configs"][c["key"]]
            y = len(rows) - 1 - j + (len(cfgs) - 1 - i - (len(cfgs) - 1) / 2) * height
            v = e.get("vs_host")
            if e.get("median") is None or v is None:
                missing.append((y, c["label"]))
                continue
            ys.append(y)
            xs.append(v)
            unit = summary[r]["unit"]
            labels.append("%s %s" % (fmt(e["median"], unit), unit))
        bars = ax.barh(ys, xs, height=height * 0.92, color=colors[i % len(colors)], label=c["label"])
        for bar, text in zip(bars, labels):
            ax.text(bar.get_width() * 1.03, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([summary[r]["label"] for r in reversed(rows)], fontsize=8)
    ax.set_xscale("log")
    ratios = [summary[r]["configs"][c["key"]].get("vs_host") for r in rows for c in cfgs]
    low = min([v for v in ratios if v] + [1.0])
    ax.set_xlim(next(t for t in (0.3, 0.1, 0.03, 0.01, 0.001) if t <= low * 0.8), 8)
    for y, label in missing:
        ax.text(ax.get_xlim()[0] * 1.05, y, "%s: n/a" % label, va="center", fontsize=7, color="#888888")
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("speed relative to the host (log scale; higher is better; 1 = host)")
    ticks = [t for t in (0.001, 0.01, 0.03, 0.1, 0.3, 0.6, 1, 2) if t >= ax.get_xlim()[0]]
    ax.set_xticks(ticks)
    ax.set_xticklabels(["%g" % t for t in ticks])
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("bypass4netns.py vs host, slirp4netns, pasta: %s\n%s, Linux %s, %s x%d, commit %s" % (
        "quick mode, 1 run each" if results["quick"] else "medians of %d interleaved rounds" % results["rounds"],
        info["date"], info["kernel"], info["cpu"], info["cpus"], info["commit"]), fontsize=10)
    ax.grid(axis="x", linestyle=":", alpha=0.5)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def ensure_venv(package="matplotlib"):
    """The bench's own virtualenv (dev-only tools from PyPI) with package in it.

    Returns (its python, None), or (None, why) when it cannot be made.
    """
    python = os.path.join(VENV, "bin", "python")
    installed = os.path.exists(os.path.join(VENV, "bin", package)) if package == "py-spy" else \
        os.path.exists(python) and subprocess.run([python, "-c", "import " + package],
                                                  stderr=subprocess.DEVNULL).returncode == 0
    if installed:
        return python, None
    try:
        if not os.path.exists(python):
            subprocess.run(["/usr/bin/python3", "-m", "venv", VENV], check=True, stdout=subprocess.DEVNULL)
        log("installing %s into %s" % (package, VENV))
        subprocess.run([python, "-m", "pip", "install", "-q", package], check=True, timeout=600)
        return python, None
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return None, "no %s in %s: %s" % (package, VENV, exc)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def attempt(measure, bench, cfg, workload=None):
    """measure(bench, cfg), timed; a failure is the result's "error" (that configuration's n/a); a workload
    the configuration cannot run (cfg.unavailable) is not measured: n/a, with the reason.

    The configuration's daemon runs only meanwhile: stopped, it cannot take
    CPU from the others (the Go tool spins on RECV once a container is gone).
    """
    t0 = time.monotonic()
    why = cfg.unavailable(workload) if workload else None
    if why:
        return {"error": why, "not_applicable": True, "seconds": 0.0}
    peer = cfg.daemon if isinstance(cfg.daemon, PeerDaemon) else None
    revived = None
    if cfg.daemon:
        signal_tree(cfg.daemon.pid, signal.SIGCONT)
    try:
        if peer:
            # Gone since its last measurement, or about to go: a connection that reached its socket while
            # it was stopped is accepted first, and one that is not a runtime's ends the floor at once.
            # Started again here, either costs no measurement.
            time.sleep(PEER_SETTLE)
            revived = peer.revive()
        result = measure(bench, cfg)
    except NotApplicable as exc:
        result = {"error": str(exc), "not_applicable": True}
    except Failed as exc:
        result = {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one failed measurement, not the whole run
        result = {"error": "%s: %s" % (type(exc).__name__, exc)}
    finally:
        if cfg.daemon:
            signal_tree(cfg.daemon.pid, signal.SIGSTOP)
    gone = peer.exited() if peer else None
    if gone and not result.get("not_applicable"):
        # What the client saw (runc's "connection refused", a client that never started) says less than why.
        result["error"] = "%s, during this measurement%s" % (
            gone, " (%s)" % result["error"][:200] if "error" in result else "")
    if revived:
        result["restarted"] = revived  # it had ended after the previous measurement, or between them
    result["seconds"] = round(time.monotonic() - t0, 2)
    return result


def parse_args(argv):
    known = [w[0] for w in WORKLOADS] + ["syscalls"]  # syscalls: the strace pass
    p = argparse.ArgumentParser(prog="tests/bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=textwrap.dedent(__doc__.split("\n\n", 2)[2]))
    p.add_argument("--quick", action="store_true", help="every configuration once, short durations (CI)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5; 1 with --quick)")
    p.add_argument("--unguarded", action="store_true",
                   help="one more column: bypass4netns.py with its guards given up (%s)" % " ".join(UNGUARDED))
    p.add_argument("--peer", metavar="PATH", help="another bypass4netns-compatible daemon (same flags)")
    p.add_argument("--peer-debian", action="store_true",
                   help="the peer column is the Go tool from Debian 13's package bypass4netns (installed into "
                        "tests/bed13.py's Debian 13 root once), with its own profile (its seccomp.json.sh), on "
                        "the Debian 12 bed's containers like any --peer")
    p.add_argument("--podman5", action="store_true",
                   help="two more columns, in the same interleaved rounds: podman5, a rootless podman 5 container "
                        "(crun) on pasta, podman 5's default network, in tests/bed13.py's Debian 13 bed; and "
                        "podman5_bypass, the same with bypass4netns.py (profile merged into podman 5's own)")
    p.add_argument("--floor", metavar="PATH",
                   help="the floor: a minimal bypass4netns-compatible switcher (e.g. ../shared/floor/floor.py), "
                        "one more column, \"floor\"; results.md gives bypass4netns.py's connect rates and daemon "
                        "CPU per connect as ratios to its")
    p.add_argument("--run-length", action="store_true",
                   help="the run-length check: the connect loop short (1 s) and long (10 s; 5 s with --quick) "
                        "in every configuration; alone, only that (with --only, those workloads too); the full "
                        "run includes it")
    p.add_argument("--peer-profile", metavar="FILE",
                   help="the seccomp profile the peer needs (its listenerPath is rewritten); default: "
                        "seccomp-gen.py's")
    p.add_argument("--runtime", default="runc", choices=["runc", "crun"], help="OCI runtime (default runc)")
    p.add_argument("--out", metavar="DIR", default=os.path.join(ROOT, "docs", "bench"),
                   help="where results.json, results.md and chart.png go (default docs/bench)")
    p.add_argument("--only", metavar="WORKLOAD[,...]",
                   help="run only these workloads: " + ",".join(known))
    p.add_argument("--configs", metavar="CONFIG[,...]",
                   help="run only these configurations: host,slirp4netns,pasta,bypass,unguarded,peer,floor,"
                        "podman5,podman5_bypass (host is always run; a podman5 one implies --podman5)")
    p.add_argument("--py-spy", metavar="DIR",
                   help="record the daemons with py-spy (installed into the bench venv) during the connect loop; "
                        "raw stacks and a hot-spot summary go to DIR")
    p.add_argument("--stages", metavar="DIR",
                   help="run the bypass4netns.py configuration under tests/stages.py, a clock around each "
                        "function of its notification path: DIR/stages.md gives the time per notification, "
                        "stage by stage (the configuration's own figures then include the clocks' cost; with one "
                        "workload in --only, that workload's profile)")
    p.add_argument("--chart", nargs=2, metavar=("JSON", "PNG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.rounds < 1 or args.rounds > 50:
        p.error("--rounds: between 1 and 50, not %d" % args.rounds)
    if args.peer and not os.path.isfile(args.peer):
        p.error("--peer: no such file: %s" % args.peer)
    if args.peer and args.peer_debian:
        p.error("--peer and --peer-debian: one peer column, one or the other")
    if args.peer_debian and args.peer_profile:
        p.error("--peer-debian uses the Go tool's own profile: no --peer-profile")
    if args.peer_profile and not os.path.isfile(args.peer_profile):
        p.error("--peer-profile: no such file: %s" % args.peer_profile)
    if args.floor and not os.path.isfile(args.floor):
        p.error("--floor: no such file: %s" % args.floor)
    if args.only:
        args.only = args.only.split(",") + (list(RUN_LENGTH_WORKLOADS) if args.run_length else [])
    elif args.run_length:
        args.only = list(RUN_LENGTH_WORKLOADS)
    elif args.quick:
        args.only = [w for w in known if w not in RUN_LENGTH_WORKLOADS]
    else:
        args.only = known
    for w in args.only:
        if w not in known:
            p.error("--only: unknown workload %r (one of %s)" % (w, ",".join(known)))
    args.configs = args.configs.split(",") if args.configs else None
    if args.configs and any(c in PODMAN5_CONFIGS for c in args.configs):
        args.podman5 = True
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.chart:
        chart(*args.chart)
        return 0
    if os.geteuid() != 0:
        print("tests/bench: the test bed needs root: sudo ./tests/bench", file=sys.stderr)
        return 1
    started = time.monotonic()
    tb.up()
    bench = Bench(args)
    daemons, configs = [], []
    results = {"command": "sudo ./tests/bench " + " ".join(sys.argv[1:] if argv is None else argv),
               "quick": args.quick, "rounds": args.rounds, "runtime": args.runtime, "durations": bench.t,
               "peer": args.peer, "peer_debian": args.peer_debian, "floor": args.floor, "machine": machine_info()}
    try:
        bench.build_client()
        configs = [Host(), Container("slirp4netns", "slirp4netns", args.runtime), Pasta()]
        if args.stages:
            os.makedirs(args.stages, exist_ok=True)
            for old in glob.glob(os.path.join(args.stages, "stages-*.json")):
                os.unlink(old)
            os.chown(args.stages, tb.user_uid(), tb.user_gid())
            results["stages"] = args.stages
        engine = start_engine(tb.free_port(), stages=args.stages)
        daemons.append(engine)
        configs.append(Container("bypass", "bypass4netns.py", args.runtime, engine))
        if args.unguarded:
            unguarded = start_engine(tb.free_port(), UNGUARDED)
            daemons.append(unguarded)
            configs.append(Container("unguarded", "bypass4netns.py " + " ".join(UNGUARDED), args.runtime,
                                     unguarded))
        if args.podman5:
            bed13.up()  # idempotent: the Debian 13 root and its mount namespace
            results["bed13"] = bed13_info()
            configs.append(Podman5("podman5", "podman 5 + pasta"))
            engine5 = start_engine(tb.free_port(), base=bed13.default_profile_base())
            daemons.append(engine5)
            configs.append(Podman5("podman5_bypass", "podman 5 + pasta + bypass4netns.py", engine5))
        if args.peer:
            peer = PeerDaemon(os.path.abspath(args.peer), args.peer_profile, tb.free_port())
            daemons.append(peer)
            configs.append(Container("peer", "peer: " + os.path.basename(args.peer), args.runtime, peer))
        if args.peer_debian:
            label = "peer: bypass4netns (Debian 13)"
            try:
                binary, version = ensure_debian_peer()
                label = "peer: bypass4netns %s (Debian 13)" % version.split("-")[0]
                on_host = runs_on_host(binary)
                results["peer"] = "%s %s (Debian 13's package; run %s), its own profile (its seccomp.json.sh: " \
                                  "%s trapped, every other syscall allowed)" % (
                                      GO_PEER_BINARY, version, "on the host" if on_host else
                                      "in the Debian 13 root's mount namespace", ", ".join(GO_PEER_TRAPPED))
                peer = PeerDaemon(binary, go_peer_profile(), tb.free_port(), in_bed13=not on_host)
                peer.drop_logs = True
            except Exception as exc:  # noqa: BLE001 - the peer's column is n/a, with why; the rest runs
                why = "the Go tool did not start: %s" % (str(exc).strip().splitlines() or ["?"])[-1][:300]
                log(why)
                results["peer"] = "Debian 13's package %s (%s)" % (GO_PEER_PACKAGE, why)
                configs.append(NotRunning("peer", label, why))
            else:
                daemons.append(peer)
                configs.append(Container("peer", label, args.runtime, peer))
        if args.floor:
            floor = PeerDaemon(os.path.abspath(args.floor), None, None,
                               publish_off="the floor publishes no port (it ignores -p)")
            daemons.append(floor)
            configs.append(Container("floor", "floor", args.runtime, floor))
        if args.configs:
            configs = [c for c in configs if c.key == "host" or c.key in args.configs]
        for d in daemons:
            signal_tree(d.pid, signal.SIGSTOP)  # until attempt() measures it
        log("starting servers in the test namespace")
        bench.start_servers(configs)
        results["configs"] = [{"key": c.key, "label": c.label, "daemon": bool(c.daemon)} for c in configs]
        raw = results["raw"] = {w[0]: {c.key: [] for c in configs} for w in WORKLOADS if w[0] in args.only}
        # A warm page cache for tar, before any configuration is timed.
        subprocess.run(["/bin/sh", "-c", "/usr/bin/tar -cf /dev/zero /usr/share 2>/dev/null"])
        for rnd in range(args.rounds):
            for key, label, unit, _, measure in WORKLOADS:
                if key not in args.only:
                    continue
                # Interleaved, and rotated by one each round (A B C D, B C D A, ...): no configuration
                # always runs first after a workload change, or right after the same neighbour.
                for cfg in configs[rnd % len(configs):] + configs[:rnd % len(configs)]:
                    result = attempt(measure, bench, cfg, key)
                    result["round"] = rnd
                    raw[key][cfg.key].append(result)
                    shown = result.get("error") or (
                        "%s %s" % (fmt(result["value"], unit), unit) if "value" in result else "ok")
                    log("round %d/%d %-9s %-16s %s" % (rnd + 1, args.rounds, key, cfg.label, shown))
        # Once, after the timed rounds: a count of calls needs no rounds, and strace slows the daemon down.
        if "syscalls" in args.only:
            results["syscalls"] = {}
            for cfg in configs:
                if cfg.daemon:
                    result = results["syscalls"][cfg.key] = attempt(Bench.syscalls, bench, cfg)
                    log("syscalls %-16s %s" % (cfg.label, result.get("error") or "%.1f per connect: %s" % (
                        result["value"], top_syscalls(result))))
    finally:
        for d in daemons:
            signal_tree(d.pid, signal.SIGCONT)
            d.stop()
        bench.stop_servers()
    if "configs" not in results:
        return 1
    if args.stages:
        with open(os.path.join(args.stages, "stages.md"), "w") as f:
            f.write("# Stage profile of bypass4netns.py\n\n`%s`: wall-clock time in the daemon's processes "
                    "per notification, stage by stage (tests/stages.py).\n\n%s\n"
                    % (results["command"], stages.report(args.stages)))
    for c in configs:
        if c.daemon:
            entry = next(e for e in results["configs"] if e["key"] == c.key)
            entry["log_errors"], entry["log_error_count"] = log_problems(
                [c.daemon.log_path, getattr(c.daemon, "stderr_path", "")])
            if getattr(c.daemon, "restarts", None):
                entry["restarts"] = c.daemon.restarts
            if getattr(c.daemon, "drop_logs", False):
                # The Go tool logs an error for every failed RECV once a container is gone: ~160 MB a minute
                # here, twice (--log-file and stderr).  Their first error lines are in results.json.
                for path in (c.daemon.log_path, c.daemon.stderr_path):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
    results["machine"]["loadavg_end"] = loadavg()
    results["summary"] = summarize(results)
    results["run_length"] = run_length(results["summary"])
    if args.floor:
        results["vs_floor"] = floor_ratios(results["summary"])
    if all(any(c.key == k for c in configs) for k in PODMAN5_CONFIGS):
        results["podman5_pair"] = pair_ratios(results["summary"])
    results["seconds"] = round(time.monotonic() - started, 1)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
        f.write("\n")
    md = markdown(results, results["summary"])
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    python, why = ensure_venv()
    png = os.path.join(args.out, "chart.png")
    if python:
        subprocess.run([python, os.path.abspath(__file__), "--chart", json_path, png], check=True)
    else:
        log("no chart: " + why)
    print(md)
    log("done in %.0fs: %s" % (time.monotonic() - started, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
