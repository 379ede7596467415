#!/usr/bin/env python3
"""seccomp-gen.py: the seccomp profile that hands a container to bypass4netns.

    python3 seccomp-gen.py > ~/seccomp.json
    podman run --security-opt seccomp=$HOME/seccomp.json ...

For rootless Docker, which drops listenerPath, it also writes an OCI runtime
wrapper that puts it back (--docker-runtime-wrapper).

The profile traps (SCMP_ACT_NOTIFY) exactly the syscalls bypass4netns.py
answers and names its socket as listenerPath; merged into the runtime's
default profile it keeps every other protection of that profile.

Single file, standard library only, Python >= 3.9; also runs piped:
    curl -fsSL URL | python3 - [OPTIONS]
"""

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile

PROG = "seccomp-gen.py"

# ---------------------------------------------------------------------------
# What bypass4netns answers
# ---------------------------------------------------------------------------

# sendto/sendmsg/sendmmsg flag of a TCP Fast Open send, which also connects.
MSG_FASTOPEN = 0x20000000


def flag_set(index, flag):
    """An OCI filter: argument index has flag set (value is the mask, valueTwo the datum)."""
    return ({"index": index, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"},)


# A copy of bypass4netns.SECCOMP_NOTIFY_RULES for when this file runs alone
# (piped, or copied elsewhere); unit tests fail if it and the daemon's
# disagree.  Syscall name, then the OCI seccomp "args" filters (all must
# match).  There is one profile: it traps no send but a TCP Fast Open one,
# which connects too; the daemon switches UDP sockets at connect and pins
# each to a host interface, so their sends need no check.
EMBEDDED_NOTIFY_RULES = (
    ("connect", ()),
    ("bind", ()),
    ("listen", ()),
    ("sendto", flag_set(3, MSG_FASTOPEN)),
    ("sendmsg", flag_set(2, MSG_FASTOPEN)),
    ("sendmmsg", flag_set(3, MSG_FASTOPEN)),
    ("socketcall", ()),  # i386 only: its calls carry their arguments in memory
)
# The listenerMetadata token by which profiles of earlier versions made with
# --udp (which trapped every send with a destination) asked the daemon to
# switch UDP sockets.  The daemon switches them under any profile now and
# ignores the token: it is dropped wherever it is found.
OLD_UDP_METADATA = "bypass4netns:udp"

# Trapped only where the base allows them, else left as the base has them:
# i386's socketcall multiplexer, which many profiles deny outright.
TRAPPED_ONLY_IF_ALLOWED = {"socketcall"}

# Each comparison with the one that matches exactly the other calls: needed to
# keep allowing, under a deny-by-default base, the calls a filter does not
# trap.
OPPOSITE_OP = {
    "SCMP_CMP_NE": "SCMP_CMP_EQ", "SCMP_CMP_EQ": "SCMP_CMP_NE",
    "SCMP_CMP_LT": "SCMP_CMP_GE", "SCMP_CMP_GE": "SCMP_CMP_LT",
    "SCMP_CMP_LE": "SCMP_CMP_GT", "SCMP_CMP_GT": "SCMP_CMP_LE",
}
# Seccomp compares 64-bit arguments.
ARG_LIMIT = 1 << 64


def opposite(cmp_):
    """The comparison that matches exactly the calls cmp_ does not, or None.

    SCMP_CMP_MASKED_EQ ((arg & value) == valueTwo) has one only when the mask
    is a single bit: that bit set or clear.  A wider mask would need one rule
    per other value of the masked bits."""
    op, mask, datum = cmp_.get("op"), cmp_.get("value"), cmp_.get("valueTwo")
    if op in OPPOSITE_OP:
        return dict(cmp_, op=OPPOSITE_OP[op])
    if op == "SCMP_CMP_MASKED_EQ" and isinstance(mask, int) and mask > 0 \
            and mask & (mask - 1) == 0 and datum in (0, mask):
        return dict(cmp_, valueTwo=mask ^ datum)
    return None


def validate_notify_rules(rules):
    """Raise ValueError unless rules has the shape of SECCOMP_NOTIFY_RULES."""
    seen = set()
    for entry in rules:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise ValueError("entry %r is not a (name, filters) pair" % (entry,))
        name, filters = entry
        if not isinstance(name, str) or not name:
            raise ValueError("syscall name %r is not a string" % (name,))
        if name in seen:
            raise ValueError("%s is listed twice" % name)
        seen.add(name)
        if not isinstance(filters, tuple):
            raise ValueError("the filters of %s are not a tuple" % name)
        for cmp_ in filters:
            if not (isinstance(cmp_, dict) and set(cmp_) <= {"index", "value", "valueTwo", "op"}
                    and isinstance(cmp_.get("index"), int) and 0 <= cmp_["index"] <= 5
                    and isinstance(cmp_.get("value"), int) and 0 <= cmp_["value"] < ARG_LIMIT
                    and opposite(cmp_) is not None):
                raise ValueError("filter %r of %s is not a supported comparison" % (cmp_, name))
    if not seen:
        raise ValueError("no syscall listed")


def load_notify_rules():
    """The profile's rules: the daemon's SECCOMP_NOTIFY_RULES when
    bypass4netns.py sits beside this file (or in the current directory when
    piped), else the embedded copy."""
    # Importing must not leave __pycache__ beside the user's files.
    sys.dont_write_bytecode = True
    try:
        import bypass4netns
        rules = bypass4netns.SECCOMP_NOTIFY_RULES
        validate_notify_rules(rules)
        return rules
    except ImportError as exc:
        if exc.name != "bypass4netns":
            warn("bypass4netns.py could not be imported (%s); using the embedded syscall list" % exc)
    except Exception as exc:  # a broken, half-written or older daemon must not stop us
        warn("bypass4netns.py is unusable (%s: %s); using the embedded syscall list"
             % (type(exc).__name__, exc))
    return EMBEDDED_NOTIFY_RULES


# ---------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------

# Machine (uname -m) -> the seccomp architectures its kernel runs, native
# first, as in the archMap of podman's and Docker's default profiles.
ARCHITECTURES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
    "ppc64le": ["SCMP_ARCH_PPC64LE"],
    "s390x": ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"],
    "riscv64": ["SCMP_ARCH_RISCV64"],
}
# Other spellings of the same machines (Go's GOARCH, Debian's).
ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "ppc64el": "ppc64le"}


def architectures_for(machine):
    machine = ARCH_ALIASES.get(machine, machine)
    if machine not in ARCHITECTURES:
        raise ProfileError("unsupported architecture %r (supported: %s; choose with --arch)"
                           % (machine, ", ".join(sorted(ARCHITECTURES))))
    return list(ARCHITECTURES[machine])


# ---------------------------------------------------------------------------
# Base profiles
# ---------------------------------------------------------------------------

# Where podman (containers-common) finds its default profile: the first that
# exists, unless containers.conf names another.
PODMAN_PROFILES = ("/etc/containers/seccomp.json", "/usr/share/containers/seccomp.json")
# containers.conf files in the order podman reads them (a later one wins);
# CONTAINERS_CONF, when set, replaces them all.
CONTAINERS_CONFS = ("/usr/share/containers/containers.conf",
                    "/etc/containers/containers.conf",
                    "/etc/containers/containers.conf.d/*.conf",
                    "~/.config/containers/containers.conf",
                    "~/.config/containers/containers.conf.d/*.conf")
# dockerd's settings: a rootless daemon's first, then the system one.
DOCKER_DAEMON_JSONS = ("~/.config/docker/daemon.json", "/etc/docker/daemon.json")
# Docker keeps its default profile inside dockerd: there is no file to read
# unless daemon.json's "seccomp-profile" names one.
DOCKER_BUILTIN_HINT = ("Docker's default profile is built into dockerd, with no file on disk "
                       "(set \"seccomp-profile\" in daemon.json, or save "
                       "profiles/seccomp/default.json of your Docker version and pass --base FILE)")

# Actions under which a syscall runs (SCMP_ACT_LOG logs it first).
ALLOWING_ACTIONS = ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG")
# Marks the rules this program writes, so that merging its own output again
# replaces them instead of stacking a second copy.
RULE_MARK = "bypass4netns: "
NOTIFY_COMMENT = RULE_MARK + "answered by the bypass4netns daemon"
UNTRAPPED_COMMENT = RULE_MARK + "the calls not trapped, allowed as the base profile allowed them"
IO_URING_COMMENT = RULE_MARK + "io_uring makes socket calls where seccomp cannot see them"
# io_uring's connect, bind and send operations never reach seccomp, so a
# container that had io_uring could point a switched socket anywhere.
IO_URING = ["io_uring_setup", "io_uring_enter", "io_uring_register"]
IO_URING_RULE = {"names": IO_URING, "action": "SCMP_ACT_ERRNO", "errnoRet": 38,  # ENOSYS
                 "comment": IO_URING_COMMENT}
WAIT_KILLABLE_RECV = "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"


class ProfileError(Exception):
    """A user error: reported as one line, exit code 2."""


def expand(path):
    """~ and $XDG_CONFIG_HOME as the tools that read the file see them."""
    if path.startswith("~/.config/") and os.environ.get("XDG_CONFIG_HOME"):
        path = os.path.join(os.environ["XDG_CONFIG_HOME"], path[len("~/.config/"):])
    return os.path.expanduser(path)


def containers_conf_seccomp_profile():
    """seccomp_profile from [containers] in containers.conf, or None."""
    patterns = [os.environ["CONTAINERS_CONF"]] if os.environ.get("CONTAINERS_CONF") else CONTAINERS_CONFS
    value = None
    for pattern in patterns:
        for path in sorted(glob.glob(expand(pattern))):
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue  # podman would fail on it too; not ours to report
            table = None
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                if line.startswith("["):
                    table = line.strip("[] ")
                elif table == "containers" and line.partition("=")[0].strip() == "seccomp_profile":
                    value = line.partition("=")[2].strip().strip("\"'")
    return value


def podman_profile_path():
    """The profile podman applies by default, or None when there is none."""
    configured = containers_conf_seccomp_profile()
    if configured:
        return configured
    for path in PODMAN_PROFILES:
        if os.path.exists(path):
            return path
    return None


def docker_profile_path():
    """daemon.json's "seccomp-profile" (a file, or "unconfined"), or None when
    dockerd uses its built-in default."""
    for candidate in DOCKER_DAEMON_JSONS:
        path = expand(candidate)
        if os.path.exists(path):
            settings = read_json(path, "Docker's daemon.json")
            value = settings.get("seccomp-profile") if isinstance(settings, dict) else None
            return None if value in (None, "", "builtin") else value
    return None


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise ProfileError("cannot read %s %s: %s" % (what, path, exc.strerror or exc))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ProfileError("%s %s is not valid JSON: %s" % (what, path, exc))


def resolve_base(choice):
    """--base -> (profile dict or None for allow-all, a description)."""
    if choice == "none":
        return None, "none"
    if choice in ("podman", "auto"):
        path = podman_profile_path()
        if path:
            return read_json(path, "base profile"), "podman's default profile " + path
        if choice == "podman":
            raise ProfileError("podman's default profile not found (looked for %s)"
                               % " and ".join(PODMAN_PROFILES))
    if choice in ("docker", "auto"):
        path = docker_profile_path()
        if path == "unconfined":  # Docker's own default is then no seccomp at all
            return None, "Docker's daemon.json (seccomp-profile: unconfined)"
        if path:
            return read_json(path, "base profile"), "Docker's seccomp-profile " + path
        if choice == "docker":
            raise ProfileError(DOCKER_BUILTIN_HINT)
    if choice == "auto":
        warn("no default seccomp profile found (podman: %s; Docker: built into dockerd): "
             "the profile allows every syscall but the trapped ones, as the original "
             "seccomp.json.sh did; pass --base FILE to keep your runtime's protection, "
             "or --base none to silence this warning" % " or ".join(PODMAN_PROFILES))
        return None, "none"
    return read_json(choice, "base profile"), choice


# ---------------------------------------------------------------------------
# Building the profile
# ---------------------------------------------------------------------------

def rule_names(rule):
    """A rule's syscall names; Docker's older format has a single "name"."""
    names = rule.get("names")
    if names is None:
        names = [rule["name"]] if "name" in rule else []
    return names


def is_unconditional(rule):
    """True when the rule applies to every call of its syscalls, whatever the
    arguments, the container's capabilities, the architecture or the kernel."""
    conditions = list((rule.get("includes") or {}).values()) + list((rule.get("excludes") or {}).values())
    return not rule.get("args") and not any(conditions)


def check_base_shape(base):
    if not isinstance(base, dict):
        raise ProfileError("the base profile is not a JSON object")
    if not isinstance(base.get("defaultAction"), str):
        raise ProfileError("the base profile has no defaultAction")
    syscalls = base.get("syscalls") or []
    if not isinstance(syscalls, list):
        raise ProfileError("the base profile's syscalls is not a list")
    for i, rule in enumerate(syscalls):
        if not isinstance(rule, dict) or not isinstance(rule.get("action"), str):
            raise ProfileError("syscalls[%d] of the base profile is not a rule with an action" % i)
        names = rule_names(rule)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ProfileError("syscalls[%d] of the base profile has malformed names" % i)
        if not all(isinstance(rule.get(k) or {}, dict) for k in ("includes", "excludes")) \
                or not isinstance(rule.get("args") or [], list):
            raise ProfileError("syscalls[%d] of the base profile has malformed args, includes or excludes" % i)
    flags = base.get("flags")
    if flags is not None and not (isinstance(flags, list) and all(isinstance(f, str) for f in flags)):
        raise ProfileError("the base profile's flags is not a list of strings")
    if not isinstance(base.get("listenerMetadata", ""), str):
        raise ProfileError("the base profile's listenerMetadata is not a string")


def same_path(a, b):
    return os.path.normpath(a) == os.path.normpath(b)


def strip_previous_merge(base, listener_path, trapped):
    """Remove the rules an earlier run of this program added to base.

    Returns (the other rules, {syscall it trapped: action the base allowed it
    under}): an earlier run only trapped syscalls the base allowed.  A merge
    of an earlier version that trapped the same syscalls with other filters
    (one made with --udp trapped every sendmsg and sendmmsg and each sendto
    with a destination) is replaced the same way; a base made for a
    bypass4netns that trapped more is refused, since what the base did with
    those is lost."""
    other, trapped_before, untrapped_action = [], set(), {}
    for rule in base.get("syscalls") or []:
        ours = str(rule.get("comment", "")).startswith(RULE_MARK)
        if rule["action"] == "SCMP_ACT_NOTIFY":
            if not ours:
                raise ProfileError("the base profile already traps %s for another seccomp agent"
                                   % ", ".join(rule_names(rule)))
            trapped_before.update(rule_names(rule))
        elif ours:
            untrapped_action.update(dict.fromkeys(rule_names(rule), rule["action"]))
        else:
            other.append(rule)
    # Without an untrapped rule, a trapped syscall's other calls fell to the
    # default, which allowed them; or it had none (a trap without filters),
    # and all that is known is that the base allowed them.
    unknown = base["defaultAction"] if base["defaultAction"] in ALLOWING_ACTIONS else "SCMP_ACT_ALLOW"
    previously = {name: untrapped_action.get(name, unknown) for name in trapped_before}
    base_listener = base.get("listenerPath")
    if base_listener and not same_path(base_listener, listener_path):
        raise ProfileError("the base profile's listenerPath is %s, not %s (pass --listener-path %s "
                           "if that is bypass4netns's socket)" % (base_listener, listener_path, base_listener))
    dropped = sorted(set(previously) - set(trapped))
    if dropped:
        raise ProfileError("the base profile was made for a bypass4netns that also trapped %s; "
                           "merge into the original base profile instead" % ", ".join(dropped))
    return other, previously


def allowing_action(base, rules, name, previously):
    """The action under which base runs every call of syscall name, or raise:
    trapping a syscall the base denies would hand the daemon calls the
    container must not make."""
    if name in previously:
        return previously[name]
    naming = [r for r in rules if name in rule_names(r)]
    for rule in naming:
        if rule["action"] not in ALLOWING_ACTIONS:
            raise ProfileError("the base profile applies %s to %s%s; bypass4netns needs it allowed"
                               % (rule["action"], name, "" if is_unconditional(rule) else " (under conditions)"))
    for rule in naming:
        if is_unconditional(rule):
            return rule["action"]
    if base["defaultAction"] in ALLOWING_ACTIONS:
        return base["defaultAction"]
    raise ProfileError("the base profile does not allow %s unconditionally (defaultAction %s%s); "
                       "bypass4netns needs it allowed"
                       % (name, base["defaultAction"], ", some calls allowed under conditions" if naming else ""))


def allowed(base, rules, name, previously):
    """Whether base lets every call of syscall name run."""
    try:
        allowing_action(base, rules, name, previously)
    except ProfileError:
        return False
    return True


def notify_rules(trapped):
    """One SCMP_ACT_NOTIFY rule per distinct filter set: a rule's args apply
    to all its names, so filtered syscalls cannot share a rule with others."""
    groups = {}
    for name, filters in trapped:
        key = json.dumps(filters, sort_keys=True)
        groups.setdefault(key, ([], [dict(f) for f in filters]))[0].append(name)
    rules = []
    for names, args in groups.values():
        rule = {"names": names, "action": "SCMP_ACT_NOTIFY"}
        if args:
            rule["args"] = args
        rule["comment"] = NOTIFY_COMMENT
        rules.append(rule)
    return rules


def untrapped_rules(name, filters, action):
    """Rules that keep allowing the calls of name that filters do not trap:
    not (a and b) is (not a) or (not b), one rule each."""
    return [{"names": [name], "action": action, "args": [opposite(cmp_)], "comment": UNTRAPPED_COMMENT}
            for cmp_ in filters]


def without_names(rules, names):
    """rules with names removed from each, dropping a rule left with none."""
    kept = []
    for rule in rules:
        current = rule_names(rule)
        remaining = [n for n in current if n not in names]
        if len(remaining) == len(current):
            kept.append(rule)
        elif remaining:
            rule = dict(rule, names=remaining)
            rule.pop("name", None)
            kept.append(rule)
    return kept


def with_settings(profile, settings):
    """profile with settings (replacing those keys), placed just before syscalls."""
    result = {}
    for key, value in profile.items():
        if key == "syscalls":
            result.update(settings)
        if key not in settings:
            result[key] = value
    return result


def listener_metadata(value):
    """listenerMetadata: value (the user's, else the base's; kept as given)
    less the token of earlier --udp profiles, which means nothing now; None
    when nothing is left."""
    tokens = (value or "").split()
    if OLD_UDP_METADATA in tokens:
        value = " ".join(t for t in tokens if t != OLD_UDP_METADATA)
    return value or None


def build_profile(base, trapped, listener_path, architectures=None, metadata=None,
                  wait_killable_recv=False):
    """The profile: base (None: allow everything) plus the NOTIFY rules.

    architectures replaces the base's; None keeps them (with no base: the
    caller must give them).  metadata replaces the base's listenerMetadata;
    None keeps it (either less the token of earlier --udp profiles)."""
    if base is None:
        base = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": architectures, "syscalls": []}
    check_base_shape(base)
    others, previously = strip_previous_merge(base, listener_path, [name for name, _ in trapped])
    trapped = [(name, filters) for name, filters in trapped
               if name not in TRAPPED_ONLY_IF_ALLOWED or allowed(base, others, name, previously)]
    names = [name for name, _ in trapped]
    syscalls = notify_rules(trapped)
    for name, filters in trapped:
        action = allowing_action(base, others, name, previously)
        # The untrapped calls fall to the default where it is what the base
        # gave them; otherwise they need their own rule, since the base's
        # rule for name goes.
        if filters and action != base["defaultAction"]:
            syscalls += untrapped_rules(name, filters, action)
    syscalls += without_names(others, set(names) | set(IO_URING))
    syscalls.append(IO_URING_RULE)

    settings, replaced = {}, {"listenerMetadata"}
    if architectures is not None:
        replaced.update(("archMap", "architectures"))
        settings["architectures"] = architectures
    settings["listenerPath"] = listener_path
    metadata = listener_metadata(base.get("listenerMetadata") if metadata is None else metadata)
    if metadata is not None:
        settings["listenerMetadata"] = metadata
    if wait_killable_recv:
        flags = list(base.get("flags") or [])
        settings["flags"] = flags if WAIT_KILLABLE_RECV in flags else flags + [WAIT_KILLABLE_RECV]
    base = {k: v for k, v in base.items() if k not in replaced}
    return with_settings(dict(base, syscalls=syscalls), settings)


# ---------------------------------------------------------------------------
# Docker: the OCI runtime wrapper
# ---------------------------------------------------------------------------

# Docker 20.10 reads a --security-opt seccomp=FILE profile into its own
# structure, which has no listenerPath (nor listenerMetadata, flags or
# defaultErrnoRet): the SCMP_ACT_NOTIFY rules reach the runtime, the socket
# does not, and runc refuses to start the container ("listenerPath is not
# set").  The wrapper, registered with `dockerd --add-runtime NAME=PATH`, puts
# the socket back into the bundle's config.json before running the real
# runtime.  The shim calls it as it calls runc: global options, the command,
# the command's options ("create --bundle DIR ... ID").
WRAPPER_TEMPLATE = r'''#!@INTERPRETER@
# bypass4netns: OCI runtime wrapper for Docker, written by seccomp-gen.py.
#
# Register it with rootless dockerd and pick it per container:
#   dockerd-rootless.sh --add-runtime bypass4netns=@SELF@
#   docker run --runtime bypass4netns --security-opt seccomp=PROFILE ...
#
# Docker drops listenerPath and listenerMetadata from seccomp profiles.  On
# `create` and `run`, when the bundle's config.json has SCMP_ACT_NOTIFY rules
# and no listenerPath, this sets linux.seccomp.listenerPath to bypass4netns's
# socket and listenerMetadata (when the profile has none) to the one given;
# then, for every command, it execs the real runtime with the same
# arguments.  Anything it
# cannot patch stops the container with a message: the runtime would refuse
# it anyway.
import json
import os
import sys

RUNTIME = @RUNTIME@
LISTENER_PATH = @LISTENER_PATH@
LISTENER_METADATA = @LISTENER_METADATA@

PROG = "bypass4netns runtime wrapper"
# Global options of runc and crun that take their value as the next argument.
VALUE_OPTIONS = {"log", "log-format", "log-level", "root", "criu", "rootless", "cgroup-manager"}
BUNDLE_OPTIONS = {"--bundle", "-bundle", "-b"}


def command_at(argv):
    """Index of the runtime command (create, start, ...) in argv, or None."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return i + 1 if i + 1 < len(argv) else None
        if not arg.startswith("-") or arg == "-":
            return i
        if "=" not in arg and arg.lstrip("-") in VALUE_OPTIONS:
            i += 1
        i += 1
    return None


def bundle_of(args):
    """The bundle directory named in a create/run's arguments (default: cwd)."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name in BUNDLE_OPTIONS:
            if eq:
                return value
            return args[i + 1] if i + 1 < len(args) else None
    return "."


def add_listener(bundle):
    """Set the listener in bundle/config.json where the profile traps syscalls."""
    path = os.path.join(bundle, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    seccomp = (config.get("linux") or {}).get("seccomp") if isinstance(config, dict) else None
    if not isinstance(seccomp, dict) or seccomp.get("listenerPath"):
        return
    notify = [r for r in seccomp.get("syscalls") or []
              if isinstance(r, dict) and r.get("action") == "SCMP_ACT_NOTIFY"]
    if not notify:
        return
    seccomp["listenerPath"] = LISTENER_PATH
    if LISTENER_METADATA and not seccomp.get("listenerMetadata"):
        seccomp["listenerMetadata"] = LISTENER_METADATA
    tmp = "%s.bypass4netns-%d.tmp" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                 os.stat(path).st_mode & 0o777)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(config, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def fail(argv, message):
    """Report where Docker shows it (the runtime's --log) and on stderr; exit 1."""
    print("%s: %s" % (PROG, message), file=sys.stderr)
    log, json_format, i = None, False, 1
    end = command_at(argv) or len(argv)
    while i < end:
        name, eq, value = argv[i].partition("=")
        if name.lstrip("-") in ("log", "log-format"):
            if not eq and i + 1 < end:
                value, i = argv[i + 1], i + 1
            if name.lstrip("-") == "log":
                log = value
            else:
                json_format = value == "json"
        i += 1
    if log:
        try:
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"level": "error", "msg": "%s: %s" % (PROG, message)}) + "\n"
                        if json_format else "%s: %s\n" % (PROG, message))
        except OSError:
            pass
    sys.exit(1)


def main(argv):
    at = command_at(argv)
    if at is not None and argv[at] in ("create", "run"):
        bundle = bundle_of(argv[at + 1:])
        if bundle is None:
            fail(argv, "%s: --bundle without a directory" % argv[at])
        try:
            add_listener(bundle)
        except (OSError, ValueError, AttributeError) as exc:
            fail(argv, "cannot set listenerPath in %s: %s"
                 % (os.path.join(bundle, "config.json"), exc))
    try:
        os.execv(RUNTIME, [RUNTIME] + argv[1:])
    except OSError as exc:
        print("%s: cannot run %s: %s" % (PROG, RUNTIME, exc), file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv)
'''


def wrapper_interpreter():
    """The wrapper's #! line: this interpreter, isolated (-I) and without
    site-packages (-S) for a fast start, when it can be named there."""
    exe = sys.executable
    if exe and os.path.isabs(exe) and os.access(exe, os.X_OK) and len(exe) < 100 \
            and not any(c.isspace() for c in exe):
        return exe + " -IS"
    return "/usr/bin/env python3"


# Where runc and crun live, also when the user's PATH lacks the sbin dirs.
RUNTIME_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def resolve_runtime(runtime):
    """--runtime -> the absolute path of an executable OCI runtime."""
    if "/" in runtime:
        path = os.path.abspath(runtime)
    else:
        search = os.pathsep.join([os.environ.get("PATH", "")] + list(RUNTIME_DIRS))
        path = shutil.which(runtime, path=search)
        if path is None:
            raise ProfileError("OCI runtime %r not found on PATH or in %s; pass --runtime /path/to/%s"
                               % (runtime, " ".join(RUNTIME_DIRS), runtime))
        path = os.path.abspath(path)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ProfileError("--runtime %s is not an executable file" % path)
    return path


def wrapper_script(runtime, listener_path, metadata, self_path):
    """The text of the runtime wrapper (see WRAPPER_TEMPLATE)."""
    values = {"@INTERPRETER@": wrapper_interpreter(), "@SELF@": self_path,
              "@RUNTIME@": repr(runtime), "@LISTENER_PATH@": repr(listener_path),
              "@LISTENER_METADATA@": repr(metadata)}
    text = WRAPPER_TEMPLATE
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def write_wrapper(path, runtime, listener_path, metadata):
    """Write the runtime wrapper at path, executable; refuse to replace the runtime.
    metadata: --listener-metadata, less the token of earlier --udp profiles."""
    if os.path.exists(path) and os.path.realpath(path) == os.path.realpath(runtime):
        raise ProfileError("--docker-runtime-wrapper %s is the runtime itself (%s); "
                           "write the wrapper elsewhere" % (path, runtime))
    write_atomically(path, wrapper_script(runtime, listener_path, listener_metadata(metadata),
                                          os.path.abspath(path)),
                     mode=0o777)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def warn(message):
    print("%s: warning: %s" % (PROG, message), file=sys.stderr)


def render(profile):
    return json.dumps(profile, indent=2) + "\n"


def write_atomically(path, text, mode=0o666):
    """Write text to path through a temporary file in the same directory, so
    that path holds either its old content or all of the new one; mode, less
    the umask, as the shell or a compiler would create it."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as exc:
        raise ProfileError("cannot write %s: %s" % (path, exc.strerror or exc))
    renamed = False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, mode & ~umask)  # not mkstemp's 0600
        os.replace(tmp, path)
        renamed = True
    except OSError as exc:
        raise ProfileError("cannot write %s: %s" % (path, exc.strerror or exc))
    finally:
        if not renamed:
            os.unlink(tmp)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse, with errors on one line (no usage dump): exit code 2."""

    def error(self, message):
        self.exit(2, "%s: error: %s\n" % (self.prog, message))


DESCRIPTION = """\
Write the seccomp profile for containers served by bypass4netns: it traps
(SCMP_ACT_NOTIFY) the syscalls bypass4netns.py answers and sends them to the
daemon's socket (listenerPath): connect, bind and listen, for TCP and UDP
sockets alike, and TCP Fast Open sends (which connect too); no other send
waits for the daemon.  Use it with
  podman run --security-opt seccomp=$HOME/seccomp.json ...

By default (--base auto) the trap is merged into podman's default profile
when one is installed, so the container keeps the protection podman gives it
(a profile is a whole policy: a profile that only listed the trapped syscalls
would allow everything else).  Without one, the profile allows every other
syscall, like the original project's seccomp.json.sh, and says so on stderr.
"""

EPILOG = """\
Merging (--base): the base's defaultAction, defaultErrnoRet, archMap or
architectures and every rule are kept; the trapped syscalls are taken out of
the base's rules (a rule left with no syscall goes) and the trap rules are put
first; calls that a filtered trap does not catch (a send without
MSG_FASTOPEN) get their own rule with the action the base gave them, unless
the base's defaultAction is that action.  A base that denies a trapped
syscall (under any condition), allows it only under conditions, traps
syscalls for another agent or names another listenerPath is refused.
Merging this program's output again gives the same file.  A profile an
earlier version made (with or without --udp) merged is the base it was made
from merged: its rules are replaced, and the listenerMetadata token
bypass4netns:udp that --udp added, which the daemon ignores now, is dropped.

Runtimes: runc >= 1.1 and crun >= 1.6 honour listenerPath; if nothing
listens there, the runtime refuses to start the container.  Docker 20.10
drops listenerPath (and listenerMetadata, flags, defaultErrnoRet) from a
--security-opt seccomp= profile but keeps its rules, so runc refuses the
container ('listenerPath is not set').  For Docker, write the wrapper once:
  python3 seccomp-gen.py --docker-runtime-wrapper ~/.local/bin/bypass4netns-runc
  dockerd-rootless.sh --add-runtime bypass4netns=$HOME/.local/bin/bypass4netns-runc
  docker run --runtime bypass4netns --security-opt seccomp=$HOME/seccomp.json ...

Errors (unreadable or invalid base, unknown architecture, relative path) are
one line on stderr with exit code 2; -o never leaves a partial file.
"""


def parse_args(argv):
    parser = OneLineParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base", metavar="auto|none|podman|docker|FILE",
        help="profile to merge the trap into. auto (default): podman's default profile "
             "(as podman finds it: containers.conf seccomp_profile, else %s) or Docker's "
             "daemon.json seccomp-profile, else none with a warning; none: allow every "
             "other syscall (the original project's profile: drops the runtime's "
             "protection); podman, docker: that runtime's default, an error when absent "
             "(Docker's is built into dockerd unless daemon.json names a file); FILE: any "
             "OCI/podman/Docker JSON profile (./podman for a file named podman)"
             % " or ".join(PODMAN_PROFILES))
    parser.add_argument(
        "--listener-path", metavar="PATH",
        help="absolute path of bypass4netns's socket, written as listenerPath "
             "(default: $XDG_RUNTIME_DIR/bypass4netns.sock, the daemon's default --socket)")
    parser.add_argument(
        "--udp", action="store_true",
        help="changes nothing: UDP sockets are switched by the default profile (at connect; "
             "no send but a TCP Fast Open one is trapped).  The flag, which used to write a "
             "second profile, is kept for scripts that pass it: the output is the default "
             "profile, byte for byte")
    parser.add_argument(
        "--listener-metadata", metavar="STRING",
        help="listenerMetadata: a string the runtime passes to the daemon with each container, "
             "read as space-separated tokens; the token %s of earlier versions' --udp "
             "profiles, which means nothing now, is dropped from it" % OLD_UDP_METADATA)
    parser.add_argument(
        "--arch", metavar="MACHINE",
        help="write architectures for this machine instead of the one running this program: "
             "x86_64 (amd64: also x86 and x32), aarch64 (arm64: also arm), ppc64le, "
             "s390x (also s390), riscv64.  With --base, the base's archMap/architectures "
             "are kept unless --arch is given")
    parser.add_argument(
        "--wait-killable-recv", action="store_true",
        help="add the filter flag %s (Linux >= 5.19): a trapped syscall the daemon has "
             "started answering is not interrupted by a non-fatal signal, which spares Go "
             "programs (SIGURG) repeated restarts.  crun honours it (1.8.1 under podman 4.3.1 "
             "tested); runc 1.1 refuses every seccomp flag ('seccomp flags are not yet "
             "supported by runc') and does not start the container; runc knows this flag "
             "only from 1.5, built with libseccomp >= 2.6" % WAIT_KILLABLE_RECV)
    parser.add_argument(
        "--docker-runtime-wrapper", metavar="PATH",
        help="instead of a profile, write at PATH an executable OCI runtime wrapper for "
             "Docker, which drops listenerPath from profiles: on create/run it sets "
             "linux.seccomp.listenerPath (--listener-path) and listenerMetadata "
             "(--listener-metadata) in the bundle's config.json when the profile has "
             "SCMP_ACT_NOTIFY rules and no listenerPath, then runs the real runtime with the "
             "same arguments; every other container is left alone.  Register it with "
             "`dockerd --add-runtime NAME=PATH` (or daemon.json \"runtimes\") and start "
             "containers with `docker run --runtime NAME`")
    parser.add_argument(
        "--runtime", metavar="RUNTIME",
        help="with --docker-runtime-wrapper: the OCI runtime the wrapper runs, a name "
             "looked up now on PATH and in the sbin dirs, or a path (default: runc)")
    parser.add_argument(
        "-o", "--output", metavar="FILE",
        help="write the profile to FILE (atomically, via a temporary file in its "
             "directory) instead of stdout")
    args = parser.parse_args(argv)
    if args.docker_runtime_wrapper is not None:
        for given, option in ((args.base, "--base"), (args.arch, "--arch"), (args.udp, "--udp"),
                              (args.output, "--output"), (args.wait_killable_recv, "--wait-killable-recv")):
            if given:
                parser.error("%s applies to the profile, not to --docker-runtime-wrapper "
                             "(run seccomp-gen.py once for each)" % option)
    elif args.runtime is not None:
        parser.error("--runtime applies only with --docker-runtime-wrapper")
    if args.base is None:
        args.base = "auto"
    return parser, args


def listener_path_from(args):
    if args.listener_path is not None:
        path, origin = args.listener_path, "--listener-path"
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path, origin = os.path.join(os.environ["XDG_RUNTIME_DIR"], "bypass4netns.sock"), "$XDG_RUNTIME_DIR"
    else:
        raise ProfileError("XDG_RUNTIME_DIR is not set: pass --listener-path PATH (bypass4netns's --socket)")
    if not os.path.isabs(path):
        raise ProfileError("%s is not an absolute path: %r" % (origin, path))
    if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes with the NUL
        raise ProfileError("listener path is longer than a unix socket path can be (107 bytes): %s" % path)
    return path


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        listener_path = listener_path_from(args)
        if args.docker_runtime_wrapper is not None:
            write_wrapper(args.docker_runtime_wrapper, resolve_runtime(args.runtime or "runc"),
                          listener_path, args.listener_metadata)
            return
        base, description = resolve_base(args.base)
        if args.base == "auto" and base is not None:
            print("%s: merging into %s (--base none: allow-all profile)" % (PROG, description),
                  file=sys.stderr)
        architectures = None
        if args.arch is not None or base is None:
            architectures = architectures_for(args.arch or os.uname().machine)
        if args.wait_killable_recv:
            warn("%s: crun honours it, runc before 1.5 refuses to start the container "
                 "('seccomp flags are not yet supported by runc'), and so does any runtime "
                 "that does not know the flag; use it with crun" % WAIT_KILLABLE_RECV)
        # --udp changes nothing: the one profile switches UDP sockets too.
        profile = build_profile(base, load_notify_rules(), listener_path, architectures,
                                args.listener_metadata, args.wait_killable_recv)
        text = render(profile)
        if args.output:
            write_atomically(args.output, text)
        else:
            sys.stdout.write(text)
    except ProfileError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
