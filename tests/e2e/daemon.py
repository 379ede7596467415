"""Run bypass4netns.py for real: as the test user, in the test namespace, with a profile.

Used by the end-to-end tests and the benchmark.  The daemon and its profile
are copied into the test bed's WORKDIR (the checkout may not be readable by
the test user); each Daemon gets its own socket, profile and log.
"""

import itertools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import testbed as tb
from unit import load

b4ns = load("bypass4netns.py", "bypass4netns")  # its declared log formats

ROOT = pathlib.Path(__file__).resolve().parents[2]
_serial = itertools.count()
# What each Daemon leaves in WORKDIR and the runtime dir, named after the test run's pid: the
# e2e daemons' b4ns-PID-N.*, seccomp-PID-N.json, and the bench's b4ns-peer-PID-*.* (a peer's log
# and stderr outlive it, for the results) and b4ns-stages-PID.py.
_LEFTOVER = re.compile(r"^(?:b4ns-(?:peer-|stages-)?|seccomp-)(\d+)(?:-[^./]*)?\.(?:py|log|json|sock|stderr)$")


def prune_leftovers():
    """Remove the files of test runs that are over (their pid is gone)."""
    for directory in (tb.WORKDIR, tb.runtime_dir()):
        for name in os.listdir(directory):
            match = _LEFTOVER.match(name)
            if match and not os.path.exists("/proc/%s" % match.group(1)):
                try:
                    os.unlink(os.path.join(directory, name))
                except FileNotFoundError:
                    pass


def generate_profile(socket_path, base="podman", extra=()):
    """A seccomp profile (path) whose listenerPath is socket_path, readable by the test user."""
    path = os.path.join(tb.WORKDIR, "seccomp-%d-%d.json" % (os.getpid(), next(_serial)))
    subprocess.run([sys.executable, str(ROOT / "seccomp-gen.py"), "--listener-path", socket_path,
                    "--base", base, "-o", path, *extra], check=True, timeout=60)
    os.chmod(path, 0o644)
    return path


class Daemon:
    """bypass4netns.py started as the test user; stop() ends it by pid."""

    def __init__(self, args=(), base="podman", debug=True, prefix=(), take_over=None, env=None,
                 user=tb.USER):
        serial = next(_serial)
        if serial == 0:
            prune_leftovers()
        name = "b4ns-%d-%d" % (os.getpid(), serial)
        # A copy of its own: concurrent runs from other checkouts must not swap it.
        self.script = os.path.join(tb.WORKDIR, name + ".py")
        shutil.copy(str(ROOT / "bypass4netns.py"), self.script)
        os.chmod(self.script, 0o644)
        self.log_path = os.path.join(tb.WORKDIR, name + ".log")
        self.user = user
        if user != tb.USER:  # WORKDIR is the test user's: the log is made for this one
            open(self.log_path, "a").close()
            os.chown(self.log_path, tb.user_uid(user), tb.user_gid(user))
        if take_over is not None:  # the Daemon it takes over from: its socket and profile
            self.socket, self.profile = take_over.socket, take_over.profile
            args = ["--take-over", *args]
        else:
            self.socket = os.path.join(tb.runtime_dir(user), name + ".sock")
            self.profile = generate_profile(self.socket, base)
        # prefix: a command that execs the rest (prlimit ...), so the pid stays the daemon's.
        self.args = list(args)
        argv = [*prefix, "python3", self.script, "--socket", self.socket, "--log-file", self.log_path, *args]
        if debug:
            argv.append("--debug")
        ready_r, ready_w = os.pipe()
        try:
            self.proc = tb.start_server(argv + ["--ready-fd", str(ready_w)], user=user, pass_fds=[ready_w], env=env)
            os.close(ready_w)
            ready_w = None
            if os.read(ready_r, 1) != b"1":
                self.proc.wait(10)
                raise RuntimeError("bypass4netns.py did not start: %s" % self.log())
            os.read(ready_r, 1)  # end of file: no process holds the pipe any more
        finally:
            os.close(ready_r)
            if ready_w is not None:
                os.close(ready_w)

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        try:
            with open(self.log_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def decisions(self, what="connect"):
        """[(destination, outcome)] of the `what` calls' decisions in the debug log, read with the
        daemon's own parser (bypass4netns.parse_decisions)."""
        return [(dest, outcome) for _cid, _tid, _fd, call, dest, outcome in b4ns.parse_decisions(self.log())
                if call == what]

    def pids(self):
        """The process started (the keeper, unless --no-keeper) and every process under it."""
        def tree(pid):
            try:
                with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
                    children = [int(child) for child in f.read().split()]
            except FileNotFoundError:
                children = []
            return [pid] + [each for child in children for each in tree(child)]
        return tree(self.pid)

    def daemon_pid(self):
        """The process that accepts the runtimes' messages: the keeper's child, if it has one
        (the last one the keeper started, from the log: after a crash the dead daemon's workers
        are the keeper's children for a moment too)."""
        if "--no-keeper" in self.args:
            return self.pid
        started = re.findall(r" INFO daemon: pid (\d+)$", self.log(), re.M)
        if started:
            return int(started[-1])
        with open("/proc/%d/task/%d/children" % (self.pid, self.pid)) as f:
            children = f.read().split()
        return int(children[0]) if children else None

    def worker_pids(self):
        """The daemon's worker processes (none with --workers 1)."""
        daemon = self.daemon_pid()
        return [pid for pid in self.pids() if pid not in (self.pid, daemon)]

    def fd_count(self):
        return sum(len(os.listdir("/proc/%d/fd" % pid)) for pid in self.pids())

    def rss_kib(self):
        total = 0
        for pid in self.pids():
            with open("/proc/%d/status" % pid) as f:
                total += int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
        return total

    def cpu_seconds(self):
        total = 0
        for pid in self.pids():
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self):
        """SIGTERM; the daemon must exit 0 and remove its socket."""
        status = tb.stop_server(self.proc)
        deadline = time.monotonic() + 5
        while os.path.exists(self.socket) and time.monotonic() < deadline:
            time.sleep(0.05)
        return status


def run(argv, timeout=180, check=False):
    """Run argv, capturing text output; raise with its stderr when check fails."""
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError("%s exited %d:\n%s\n%s" % (argv[-3:], result.returncode, result.stdout[-2000:],
                                                         result.stderr[-3000:]))
    return result
