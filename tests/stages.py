#!/usr/bin/env python3
"""Where a trapped call's time goes, stage by stage: bypass4netns.py with a clock around each
function of its notification path.  A dev tool: the stage profile that py-spy's sampling (which
stops the process at every sample and blurs what syscalls cost) cannot give.

    stages.py run DIR python3 bypass4netns.py ARGS...   the daemon, timed; each of its processes
                                                         writes DIR/stages-PID.json now and then
    stages.py report DIR                                 the table: calls and wall-clock time per
                                                         notification, per stage (nested stages
                                                         included in their callers' figures)

`tests/bench --stages DIR` runs the bypass4netns.py configuration so and writes DIR/stages.md.
Each clock costs about 0.4 us, which the figures include: read them as shares, next to the
daemon's CPU per connect from a run without it.
"""

import functools
import glob
import importlib.util
import json
import os
import sys
import time

# The stages, by qualified name: a method, or a function of the module's (patched in its
# namespace, which is where the daemon looks it up).  A name the file no longer has is skipped.
STAGES = (
    "Server.on_notify", "Inflight.receive", "Call.__init__", "Switcher.handle",
    "Switcher.target_socket", "TargetAccess.fd", "TargetAccess.read_sockaddr", "Call.still_valid",
    "Switcher.judge", "HostSockets.is_host_socket", "Switcher.bypass_connect", "Switcher.switch",
    "HostInterfaces.on_loopback", "HostSockets.differences", "Switcher.host_twin", "TargetAccess.fd_flags",
    "carry_options", "start_connect", "HostSockets.pin", "HostSockets.install", "PendingConnects.wait",
    "PendingConnects.finish", "Switcher.connect_in_place", "SharedSocket.close",
    "SharedSocket.close_unconnected", "Call.result", "Switcher.other_family", "Switcher.delegate",
    "NamespaceHelpers.for_call", "NamespaceHelper.request", "ThreadHandle.ids", "Switcher.let_run",
)
ROOT_STAGE = "Server.on_notify"  # one per notification received: the per-notification divisor
DUMP_EVERY = 1000                # notifications between two writes of a process's figures


def timed(stats, name, function, dump):
    cell = stats.setdefault(name, [0, 0])  # calls, nanoseconds
    clock = time.perf_counter_ns

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return function(*args, **kwargs)
        finally:
            cell[0] += 1
            cell[1] += clock() - start
            if name == ROOT_STAGE and cell[0] % DUMP_EVERY == 0:
                dump()
    return wrapper


def run(out, script, argv):
    sys.dont_write_bytecode = True  # no __pycache__ left beside the bench's copy of the daemon
    spec = importlib.util.spec_from_file_location("bypass4netns", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bypass4netns"] = module
    spec.loader.exec_module(module)
    stats = {}

    def dump():
        path = os.path.join(out, "stages-%d.json" % os.getpid())
        with open(path + ".tmp", "w") as f:
            json.dump(stats, f)
        os.replace(path + ".tmp", path)

    for name in STAGES:
        owner_name, _, attribute = name.rpartition(".")
        owner = getattr(module, owner_name, None) if owner_name else module
        if owner is None or attribute not in vars(owner):
            continue
        original = vars(owner)[attribute]
        if isinstance(original, staticmethod):
            setattr(owner, attribute, staticmethod(timed(stats, name, original.__func__, dump)))
        else:
            setattr(owner, attribute, timed(stats, name, original, dump))
    # Handlers are looked up in Switcher.HANDLERS, built from the functions themselves.
    for trap, handler in list(module.Switcher.HANDLERS.items()):
        module.Switcher.HANDLERS[trap] = timed(stats, "handler %s" % trap, handler, dump)
    sys.argv = [script, *argv]
    return module.main()


def report(out):
    totals = {}
    for path in glob.glob(os.path.join(out, "stages-*.json")):
        with open(path) as f:
            for name, (calls, nanos) in json.load(f).items():
                cell = totals.setdefault(name, [0, 0])
                cell[0] += calls
                cell[1] += nanos
    notifications = totals.get(ROOT_STAGE, [0])[0]
    if not notifications:
        return "No notification was timed in %s." % out
    lines = ["%d notifications timed." % notifications, "",
             "| stage | calls per notification | us per call | us per notification |", "|---|---:|---:|---:|"]
    for name, (calls, nanos) in sorted(totals.items(), key=lambda item: -item[1][1]):
        if calls:
            lines.append("| %s | %.2f | %.2f | %.2f |" % (name, calls / notifications, nanos / calls / 1000,
                                                          nanos / notifications / 1000))
    return "\n".join(lines)


def main(argv):
    if len(argv) >= 4 and argv[0] == "run" and argv[2].startswith("python"):
        return run(argv[1], argv[3], argv[4:])
    if len(argv) == 2 and argv[0] == "report":
        print(report(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
