"""seccomp-gen.py and test/seccomp.json.sh: pure logic and CLI, no root needed."""

import ast
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest

from . import ROOT, load

SCRIPT = ROOT / "seccomp-gen.py"
WRAPPER = ROOT / "test" / "seccomp.json.sh"
PODMAN_DEFAULT = pathlib.Path("/usr/share/containers/seccomp.json")
TRAPPED = {"connect", "bind", "listen", "sendto", "sendmsg", "sendmmsg", "socketcall"}
LISTENER = "/run/user/4242/bypass4netns.sock"
MSG_FASTOPEN = 0x20000000
# Where each send keeps its flags; the default profile traps only the sends
# with MSG_FASTOPEN there.
FLAGS_ARG = {"sendto": 3, "sendmsg": 2, "sendmmsg": 3}
# Accepted, and changes nothing: the one profile switches UDP sockets too.
UDP = ["--udp"]
UDP_TOKEN = "bypass4netns:udp"  # earlier --udp profiles' listenerMetadata token

gen = load("seccomp-gen.py", "seccomp_gen")
b4ns = load("bypass4netns.py", "bypass4netns")


def run(args, cwd=None, env=None, stdin=None, argv0=None):
    """Run seccomp-gen.py (or argv0) with a controlled environment."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "CONTAINERS_CONF")}
    full_env["XDG_RUNTIME_DIR"] = "/run/user/4242"
    full_env.update(env or {})
    argv = list(argv0 or [sys.executable, str(SCRIPT)]) + list(args)
    return subprocess.run(argv, cwd=cwd, env=full_env, input=stdin, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)


def generate(args, **kwargs):
    res = run(args, **kwargs)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def assert_one_line_error(res, *fragments):
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("seccomp-gen.py: error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def names_of(rule):
    return rule.get("names") or [rule["name"]]


# A small podman-style base: deny by default, conditional rules of every kind.
PODMAN_LIKE = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 38,
    "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}],
    "syscalls": [
        {"names": ["kexec_load", "userfaultfd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
        {"names": ["read", "write", "connect", "bind", "listen", "sendto", "sendmsg", "sendmmsg", "socket"],
         "action": "SCMP_ACT_ALLOW", "args": [], "comment": "", "includes": {}, "excludes": {}},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
        {"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["bpf"], "action": "SCMP_ACT_ERRNO", "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
        {"names": ["sendmmsg", "recvmmsg"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "4.0"}},
        {"name": "bind", "action": "SCMP_ACT_ALLOW"},
    ],
}


# -- a model of how a profile answers one call ------------------------------

def args_match(filters, call_args):
    ops = {"SCMP_CMP_EQ": lambda a, f: a == f["value"], "SCMP_CMP_NE": lambda a, f: a != f["value"],
           "SCMP_CMP_LT": lambda a, f: a < f["value"], "SCMP_CMP_LE": lambda a, f: a <= f["value"],
           "SCMP_CMP_GT": lambda a, f: a > f["value"], "SCMP_CMP_GE": lambda a, f: a >= f["value"],
           "SCMP_CMP_MASKED_EQ": lambda a, f: a & f["value"] == f.get("valueTwo", 0)}
    return all(ops[f["op"]](call_args[f["index"]], f) for f in filters or [])


def verdict(profile, name, call_args=(0,) * 6, caps=()):
    """The action a profile gives a call, for a container with caps on amd64.

    Where rules with different actions match, the answer depends on
    libseccomp's internals: the model names them all instead of guessing."""
    actions = set()
    for rule in profile["syscalls"]:
        includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
        if not set(includes.get("caps", [])) <= set(caps) or set(excludes.get("caps", [])) & set(caps):
            continue
        if "arches" in includes and "amd64" not in includes["arches"]:
            continue
        if name in names_of(rule) and args_match(rule.get("args"), call_args):
            actions.add(rule["action"])
    return "|".join(sorted(actions)) if actions else profile["defaultAction"]


def sample_calls(profile):
    """Calls of every syscall the profile names plus the trapped ones, with the
    argument values its filters compare to (and their neighbours), and send
    flags with and without MSG_FASTOPEN."""
    names = set(TRAPPED)
    values = {0, 1, MSG_FASTOPEN, MSG_FASTOPEN | 0x40, 0x4040}
    for rule in profile["syscalls"]:
        names.update(names_of(rule))
        for f in rule.get("args") or []:
            values.update({f["value"], f["value"] + 1, max(f["value"] - 1, 0)})
    for name in sorted(names):
        for value in sorted(values):
            for index in range(6):
                call_args = [0] * 6
                call_args[index] = value
                yield name, tuple(call_args)


def trapped_by(name, call_args):
    """Whether the profile traps a call, as README says."""
    if name not in FLAGS_ARG:
        return name in TRAPPED
    return bool(call_args[FLAGS_ARG[name]] & MSG_FASTOPEN)  # TCP Fast Open sends only


# -- one source of truth ----------------------------------------------------

def test_embedded_rules_match_the_daemon():
    assert b4ns.SECCOMP_NOTIFY_RULES == gen.EMBEDDED_NOTIFY_RULES


def test_the_daemon_has_one_profile_and_no_udp_token():
    """Why --udp changes nothing and the token is dropped: the daemon has
    neither a second set of rules nor the token any more."""
    assert not hasattr(b4ns, "SECCOMP_NOTIFY_RULES_UDP") and not hasattr(b4ns, "UDP_METADATA")
    assert not hasattr(gen, "EMBEDDED_NOTIFY_RULES_UDP") and not hasattr(gen, "NOTIFY_RULES")
    assert gen.OLD_UDP_METADATA == UDP_TOKEN


def test_embedded_rules_are_valid():
    rules = gen.EMBEDDED_NOTIFY_RULES
    gen.validate_notify_rules(rules)
    assert {name for name, _ in rules} == TRAPPED
    # No send is trapped but a TCP Fast Open one.
    assert {name: filters for name, filters in rules if filters} == {
        name: (masked(MSG_FASTOPEN, MSG_FASTOPEN, index=index),) for name, index in FLAGS_ARG.items()}


def masked(mask, datum, index=2):
    return {"index": index, "value": mask, "valueTwo": datum, "op": "SCMP_CMP_MASKED_EQ"}


@pytest.mark.parametrize("cmp_, expected", [
    ({"index": 4, "value": 0, "op": "SCMP_CMP_NE"}, {"index": 4, "value": 0, "op": "SCMP_CMP_EQ"}),
    ({"index": 1, "value": 7, "op": "SCMP_CMP_LT"}, {"index": 1, "value": 7, "op": "SCMP_CMP_GE"}),
    ({"index": 1, "value": 7, "op": "SCMP_CMP_GT"}, {"index": 1, "value": 7, "op": "SCMP_CMP_LE"}),
    (masked(MSG_FASTOPEN, MSG_FASTOPEN), masked(MSG_FASTOPEN, 0)),
    (masked(MSG_FASTOPEN, 0), masked(MSG_FASTOPEN, MSG_FASTOPEN)),
    (masked(1 << 63, 1 << 63), masked(1 << 63, 0)),
    (masked(0x30000000, 0x30000000), None),  # two bits: three other values
    (masked(MSG_FASTOPEN, 1), None),  # never matches
    (masked(0, 0), None),  # always matches
    ({"index": 1, "value": MSG_FASTOPEN, "op": "SCMP_CMP_MASKED_EQ"}, None),  # no valueTwo: the datum must be written out
    ({"index": 1, "value": 7, "op": "SCMP_CMP_BOGUS"}, None),
])
def test_opposite_comparison(cmp_, expected):
    assert gen.opposite(cmp_) == expected
    if expected is not None:
        assert gen.opposite(expected) == cmp_
        for value in (0, 1, 6, 7, 8, MSG_FASTOPEN, MSG_FASTOPEN | 7, 1 << 63, (1 << 64) - 1):
            call_args = (value,) * 6
            assert args_match([cmp_], call_args) != args_match([expected], call_args), value


@pytest.mark.parametrize("rules", [
    (),
    (("connect", ()), ("connect", ())),
    (("connect", [{"index": 4, "value": 0, "op": "SCMP_CMP_NE"}]),),
    (("sendto", ({"index": 4, "value": 0, "op": "SCMP_CMP_MASKED_EQ"},)),),
    (("sendto", (masked(0x30000000, 0x30000000),)),),
    (("sendto", (masked(MSG_FASTOPEN, 1),)),),
    (("sendto", (masked(1 << 64, 1 << 64),)),),
    (("sendto", ({"index": 6, "value": 0, "op": "SCMP_CMP_NE"},)),),
    (("sendto", ({"index": 4, "value": -1, "op": "SCMP_CMP_NE"},)),),
    (("sendto", ({"index": 4, "value": 1 << 64, "op": "SCMP_CMP_NE"},)),),
    (("sendto", ({"index": 4, "value": 0, "op": "SCMP_CMP_NE", "extra": 1},)),),
    ((42, ()),),
    ("connect",),
])
def test_malformed_rules_are_rejected(rules):
    with pytest.raises(ValueError):
        gen.validate_notify_rules(rules)


@pytest.mark.parametrize("filters, opposites", [
    ((masked(MSG_FASTOPEN, MSG_FASTOPEN),), [masked(MSG_FASTOPEN, 0)]),
    ((masked(MSG_FASTOPEN, 0, index=3), {"index": 4, "value": 0, "op": "SCMP_CMP_NE"}),
     [masked(MSG_FASTOPEN, MSG_FASTOPEN, index=3), {"index": 4, "value": 0, "op": "SCMP_CMP_EQ"}]),
    (({"index": 4, "value": 0, "valueTwo": 0, "op": "SCMP_CMP_NE"},),
     [{"index": 4, "value": 0, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]),
])
def test_supported_filters_are_accepted(filters, opposites):
    """Accepted because a profile can carry them: under a base that denies by default, the calls
    they match are trapped and the others stay allowed, one rule per filter with its opposite."""
    rules = (("sendto", filters),)
    gen.validate_notify_rules(rules)
    base = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["sendto"], "action": "SCMP_ACT_ALLOW"}]}
    profile = gen.build_profile(base, rules, LISTENER)
    untrapped = [{"names": ["sendto"], "action": "SCMP_ACT_ALLOW", "args": [cmp_], "comment": gen.UNTRAPPED_COMMENT}
                 for cmp_ in opposites]
    assert [rule for rule in profile["syscalls"] if "sendto" in rule["names"]] == [
        notify(["sendto"], list(filters))] + untrapped


def copy_beside(tmp_path, daemon_source):
    """seccomp-gen.py in tmp_path with a bypass4netns.py of daemon_source: argv0 to run it."""
    (tmp_path / "seccomp-gen.py").write_text(SCRIPT.read_text())
    (tmp_path / "bypass4netns.py").write_text(daemon_source)
    return [sys.executable, str(tmp_path / "seccomp-gen.py")]


@pytest.mark.parametrize("options", [[], UDP])
@pytest.mark.parametrize("source", [
    'SECCOMP_NOTIFY_RULES = (("connect", ()),)\n',
    # A bypass4netns.py of the two profiles: its --udp rules are never read.
    'SECCOMP_NOTIFY_RULES = (("connect", ()),)\nSECCOMP_NOTIFY_RULES_UDP = (("bind", ()),)\n',
])
def test_rules_come_from_bypass4netns_beside_the_script(tmp_path, source, options):
    res = run(["--base", "none"] + options, argv0=copy_beside(tmp_path, source))
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert [r["names"] for r in json.loads(res.stdout)["syscalls"]] == [["connect"], gen.IO_URING]
    assert not (tmp_path / "__pycache__").exists()


@pytest.mark.parametrize("options", [[], UDP])
@pytest.mark.parametrize("source", [
    "raise RuntimeError('half written')\n",
    "SECCOMP_NOTIFY_RULES = 'connect'\n",
    "SECCOMP_NOTIFY_RULES_UDP = (('bind', ()),)\n",  # no SECCOMP_NOTIFY_RULES at all
    "import no_such_module_here\n",
    "def broken(:\n",
])
def test_a_broken_daemon_falls_back_to_the_embedded_copy(tmp_path, source, options):
    res = run(["--base", "none"] + options, argv0=copy_beside(tmp_path, source))
    assert res.returncode == 0, res.stderr
    assert "warning" in res.stderr and "embedded" in res.stderr
    assert res.stdout == run(["--base", "none"]).stdout


@pytest.mark.parametrize("options", [[], UDP])
def test_runs_piped_without_a_file(tmp_path, options):
    """curl ... | python3 - ARGS: no __file__, no bypass4netns.py around."""
    res = run(["--base", "none", "--arch", "aarch64"] + options, cwd=str(tmp_path),
              stdin=SCRIPT.read_text(), argv0=[sys.executable, "-"])
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    profile = json.loads(res.stdout)
    assert profile["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert {n for r in profile["syscalls"] for n in r["names"]} == TRAPPED | set(gen.IO_URING)
    assert profile == generate(["--base", "none", "--arch", "aarch64"] + options)
    assert os.listdir(str(tmp_path)) == []


def test_source_is_python39_syntax():
    """Python 3.9's grammar takes the file, and reads it as this interpreter does."""
    source = SCRIPT.read_text()
    assert ast.dump(ast.parse(source, feature_version=(3, 9))) == ast.dump(ast.parse(source))


def test_vermin_finds_nothing_newer_than_python39():
    """Syntax and standard-library APIs (tests/run installs vermin)."""
    vermin = shutil.which("vermin")
    if not vermin:
        pytest.skip("vermin is not installed")
    res = subprocess.run([vermin, "-t=3.9-", "--violations", "--no-tips", str(SCRIPT)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert res.returncode == 0, res.stdout


# -- the allow-all profile (--base none) ------------------------------------

def notify(names, args=None):
    rule = {"names": names, "action": "SCMP_ACT_NOTIFY"}
    if args:
        rule["args"] = args
    rule["comment"] = gen.NOTIFY_COMMENT
    return rule


@pytest.mark.parametrize("options, metadata, syscalls", [
    ([], None, [
        notify(["connect", "bind", "listen", "socketcall"]),
        notify(["sendto", "sendmmsg"], [masked(MSG_FASTOPEN, MSG_FASTOPEN, index=3)]),
        notify(["sendmsg"], [masked(MSG_FASTOPEN, MSG_FASTOPEN, index=2)]),
    ]),
    (UDP, None, [  # the same profile
        notify(["connect", "bind", "listen", "socketcall"]),
        notify(["sendto", "sendmmsg"], [masked(MSG_FASTOPEN, MSG_FASTOPEN, index=3)]),
        notify(["sendmsg"], [masked(MSG_FASTOPEN, MSG_FASTOPEN, index=2)]),
    ]),
    (["--listener-metadata", "name=web"], "name=web", [
        notify(["connect", "bind", "listen", "socketcall"]),
        notify(["sendto", "sendmmsg"], [masked(MSG_FASTOPEN, MSG_FASTOPEN, index=3)]),
        notify(["sendmsg"], [masked(MSG_FASTOPEN, MSG_FASTOPEN, index=2)]),
    ]),
])
def test_allow_all_profile(options, metadata, syscalls):
    profile = generate(["--base", "none", "--arch", "x86_64"] + options)
    assert list(profile) == ["defaultAction", "architectures", "listenerPath"] + (
        ["listenerMetadata"] if metadata else []) + ["syscalls"]
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    assert profile["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert profile["listenerPath"] == LISTENER
    assert profile.get("listenerMetadata") == metadata
    assert profile["syscalls"] == syscalls + [gen.IO_URING_RULE]


DESTINATION = 0x7fff0000  # a sockaddr pointer
MSG_DONTWAIT_NOSIGNAL = 0x4040

# (syscall, its arguments, trapped by the profile)
CALLS = [
    ("connect", (3, DESTINATION, 16, 0, 0, 0), True),  # UDP sockets' too: switched at connect
    ("bind", (3, DESTINATION, 16, 0, 0, 0), True),
    ("listen", (3, 128, 0, 0, 0, 0), True),
    ("socketcall", (3, DESTINATION, 0, 0, 0, 0), True),
    ("sendto", (3, 0, 0, 0, 0, 0), False),
    ("sendto", (3, 0, 0, MSG_DONTWAIT_NOSIGNAL, 0, 0), False),
    ("sendto", (3, 0, 0, 0, DESTINATION, 16), False),  # an unconnected UDP send: not trapped
    ("sendto", (3, 0, 0, MSG_FASTOPEN, 0, 0), True),  # fails in the kernel: no address
    ("sendto", (3, 0, 0, MSG_FASTOPEN | MSG_DONTWAIT_NOSIGNAL, DESTINATION, 16), True),
    ("sendto", (3, 0, MSG_FASTOPEN, 0, 0, 0), False),  # a length, not the flags
    ("sendmsg", (3, 0, 0, 0, 0, 0), False),
    ("sendmsg", (3, 0, MSG_DONTWAIT_NOSIGNAL, 0, 0, 0), False),
    ("sendmsg", (3, 0, MSG_FASTOPEN, 0, 0, 0), True),
    ("sendmsg", (3, 0, 0xFFFFFFFF, 0, 0, 0), True),
    ("sendmsg", (3, 0, 0, MSG_FASTOPEN, 0, 0), False),
    ("sendmmsg", (3, 0, 1, 0, 0, 0), False),
    ("sendmmsg", (3, 0, 1, MSG_FASTOPEN, 0, 0), True),
    ("sendmmsg", (3, 0, MSG_FASTOPEN, 0, 0, 0), False),  # vlen, not the flags
    ("recvmsg", (3, 0, MSG_FASTOPEN, 0, 0, 0), False),
    ("close", (3, 0, 0, 0, 0, 0), False),
]


@pytest.mark.parametrize("options", [[], UDP])
@pytest.mark.parametrize("name, call_args, trapped", CALLS)
def test_every_trapped_call_is_notified_and_others_allowed(tmp_path, name, call_args, trapped, options):
    assert trapped_by(name, call_args) == trapped  # the model the merge tests use
    deny_by_default = write_json(tmp_path / "base.json", with_rule(
        {"names": ["socketcall", "recvmsg", "close"], "action": "SCMP_ACT_ALLOW"}))
    for base in ("none", deny_by_default):
        profile = generate(["--base", base, "--arch", "x86_64"] + options)
        assert verdict(profile, name, call_args) == ("SCMP_ACT_NOTIFY" if trapped else "SCMP_ACT_ALLOW"), base


@pytest.mark.parametrize("machine, expected", [
    ("x86_64", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
    ("amd64", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
    ("aarch64", ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]),
    ("arm64", ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]),
    ("ppc64le", ["SCMP_ARCH_PPC64LE"]),
    ("s390x", ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"]),
    ("riscv64", ["SCMP_ARCH_RISCV64"]),
])
def test_architectures(machine, expected):
    assert generate(["--base", "none", "--arch", machine])["architectures"] == expected


def test_default_architectures_are_this_machines():
    machine = os.uname().machine
    profile = generate(["--base", "none"])
    assert profile["architectures"] == gen.ARCHITECTURES[machine]


def test_unknown_architecture_is_one_line_error():
    assert_one_line_error(run(["--base", "none", "--arch", "mips64"]), "mips64", "--arch")


def test_unknown_machine_is_refused_clearly():
    with pytest.raises(gen.ProfileError, match="sparc64"):
        gen.architectures_for("sparc64")


# -- listener path, metadata, flags -----------------------------------------

def test_listener_path_option_overrides_xdg_runtime_dir():
    profile = generate(["--base", "none", "--listener-path", "/tmp/b4ns.sock"])
    assert profile["listenerPath"] == "/tmp/b4ns.sock"


def test_relative_listener_path_is_refused():
    assert_one_line_error(run(["--base", "none", "--listener-path", "b4ns.sock"]), "absolute")


def test_relative_xdg_runtime_dir_is_refused():
    assert_one_line_error(run(["--base", "none"], env={"XDG_RUNTIME_DIR": "run"}), "XDG_RUNTIME_DIR")


def test_missing_xdg_runtime_dir_is_one_line_error():
    assert_one_line_error(run(["--base", "none"], env={"XDG_RUNTIME_DIR": ""}),
                          "XDG_RUNTIME_DIR", "--listener-path")


def test_too_long_listener_path_is_refused():
    assert_one_line_error(run(["--base", "none", "--listener-path", "/" + "x" * 120]), "107")


@pytest.mark.parametrize("base_metadata, options, expected", [
    (None, [], None),
    (None, ["--listener-metadata", "name=web"], "name=web"),
    (None, ["--listener-metadata", "a  b"], "a  b"),  # the user's string, as given
    (None, UDP, None),  # --udp adds no token any more
    (None, UDP + ["--listener-metadata", "a b"], "a b"),
    ("kept", [], "kept"),
    ("kept", UDP, "kept"),
    ("kept", ["--listener-metadata", "new"], "new"),
    ("kept", ["--listener-metadata", ""], None),
    # The token of earlier --udp profiles means nothing now: dropped from a
    # base made with --udp and from --listener-metadata, without an error.
    ("x bypass4netns:udp y", [], "x y"),
    ("x bypass4netns:udp y", UDP, "x y"),
    ("bypass4netns:udp", [], None),
    ("bypass4netns:udp", UDP, None),
    ("bypass4netns:udp", ["--listener-metadata", "z"], "z"),
    (None, ["--listener-metadata", "bypass4netns:udp"], None),
    (None, ["--listener-metadata", "name=web bypass4netns:udp"] + UDP, "name=web"),
    ("kept", ["--listener-metadata", "bypass4netns:udp"], None),  # replaced by nothing, as by ""
    ("bypass4netns:udp", ["--listener-metadata", "bypass4netns:udp  a"], "a"),
])
def test_listener_metadata(tmp_path, base_metadata, options, expected):
    base = podman_like() if base_metadata is None else podman_like(listenerMetadata=base_metadata)
    res = run(["--base", write_json(tmp_path / "base.json", base)] + options)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    profile = json.loads(res.stdout)
    assert profile.get("listenerMetadata") == expected
    assert list(profile)[-2:] == (["listenerMetadata"] if expected else ["listenerPath"]) + ["syscalls"]


def test_wait_killable_recv_flag_and_its_warning():
    res = run(["--base", "none", "--wait-killable-recv"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["flags"] == ["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]
    assert "warning" in res.stderr and "runc" in res.stderr
    assert "flags" not in generate(["--base", "none"])


def test_help_explains_every_option():
    res = run(["--help"])
    assert res.returncode == 0
    for option in ("--base", "--listener-path", "--listener-metadata", "--udp", "bypass4netns:udp",
                   "MSG_FASTOPEN", "--arch", "--wait-killable-recv", "--output", "auto", "none", "podman",
                   "docker", "runc", "crun"):
        assert option in res.stdout
    udp_help = " ".join(res.stdout.split("--udp  ", 1)[1].split("--listener-metadata", 1)[0].split())
    assert "changes nothing" in udp_help and "switched by the default profile" in udp_help
    assert "kept for scripts that pass it" in udp_help


# Option sets under which --udp must change nothing, byte for byte ("BASE":
# the podman-like base).
WITH_OR_WITHOUT_UDP = [
    ["--base", "none"],
    ["--base", "none", "--arch", "aarch64", "--listener-metadata", "name=web"],
    ["--base", "BASE"],
    ["--base", "BASE", "--wait-killable-recv", "--listener-path", "/run/b4ns/b.sock"],
] + ([["--base", "podman"]] if PODMAN_DEFAULT.exists() else [])


@pytest.mark.parametrize("options", WITH_OR_WITHOUT_UDP)
def test_udp_option_changes_nothing(tmp_path, options):
    options = [write_json(tmp_path / "b.json", PODMAN_LIKE) if o == "BASE" else o for o in options]
    without = run(options)
    assert without.returncode == 0, without.stderr
    for udp_options in (options + UDP, UDP + options):
        with_udp = run(udp_options)
        assert (with_udp.returncode, with_udp.stdout, with_udp.stderr) == (0, without.stdout, without.stderr)
    assert UDP_TOKEN not in without.stdout
    out = tmp_path / "udp.json"
    assert run(options + UDP + ["-o", str(out)]).returncode == 0
    assert out.read_text() == without.stdout


def test_unknown_option_is_one_line_error():
    assert_one_line_error(run(["--bogus"]), "--bogus")


# -- merging into a base profile ---------------------------------------------

UNTRAPPED_SENDS = [  # the default profile's untrapped rules, as they follow its NOTIFY rules
    {"names": ["sendto"], "action": "SCMP_ACT_ALLOW", "args": [masked(MSG_FASTOPEN, 0, index=3)],
     "comment": gen.UNTRAPPED_COMMENT},
    {"names": ["sendmsg"], "action": "SCMP_ACT_ALLOW", "args": [masked(MSG_FASTOPEN, 0, index=2)],
     "comment": gen.UNTRAPPED_COMMENT},
    {"names": ["sendmmsg"], "action": "SCMP_ACT_ALLOW", "args": [masked(MSG_FASTOPEN, 0, index=3)],
     "comment": gen.UNTRAPPED_COMMENT},
]


@pytest.mark.parametrize("options, notify_rules, untrapped", [
    ([], 3, UNTRAPPED_SENDS),
    (UDP, 3, UNTRAPPED_SENDS),
])
def test_merge_keeps_the_base_and_traps_first(tmp_path, options, notify_rules, untrapped):
    base = write_json(tmp_path / "base.json", PODMAN_LIKE)
    profile = generate(["--base", base] + options)
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 38
    assert profile["archMap"] == PODMAN_LIKE["archMap"]
    assert "architectures" not in profile  # podman refuses both at once
    assert profile["listenerPath"] == LISTENER
    rules = profile["syscalls"]
    assert {r["action"] for r in rules[:notify_rules]} == {"SCMP_ACT_NOTIFY"}
    assert rules[notify_rules:notify_rules + len(untrapped)] == untrapped
    # Every base rule is kept, less the trapped names; the one left empty goes.
    assert rules[-1] == gen.IO_URING_RULE
    rest = rules[notify_rules + len(untrapped):-1]
    assert rest[1] == dict(PODMAN_LIKE["syscalls"][1], names=["read", "write", "socket"])
    assert rest[6] == dict(PODMAN_LIKE["syscalls"][6], names=["recvmmsg"])
    assert rest == [r if not set(names_of(r)) & TRAPPED else
                    dict(r, names=[n for n in names_of(r) if n not in TRAPPED])
                    for r in PODMAN_LIKE["syscalls"][:-1]]


def assert_answers_as_the_base(base, profile, caps_sets):
    """profile traps what the model says (socketcall only where base allows
    it) and answers every other call as base does."""
    for caps in caps_sets:
        for name, call_args in sample_calls(base):
            trapped = trapped_by(name, call_args) and (
                name not in gen.TRAPPED_ONLY_IF_ALLOWED or verdict(base, name) in gen.ALLOWING_ACTIONS)
            expected = "SCMP_ACT_NOTIFY" if trapped else verdict(base, name, call_args, caps)
            assert verdict(profile, name, call_args, caps) == expected, (name, call_args, caps)


def test_merge_answers_every_other_call_as_the_base_did(tmp_path):
    base = write_json(tmp_path / "base.json", PODMAN_LIKE)
    profile = generate(["--base", base])
    assert_answers_as_the_base(PODMAN_LIKE, profile, ((), ("CAP_SYS_ADMIN",)))


@pytest.mark.skipif(not PODMAN_DEFAULT.exists(), reason="podman's default profile is not installed")
def test_merge_into_podmans_default_answers_every_other_call_as_it_did():
    base = json.loads(PODMAN_DEFAULT.read_text())
    profile = generate(["--base", str(PODMAN_DEFAULT)])
    assert_answers_as_the_base(base, profile, ((), ("CAP_SYS_ADMIN", "CAP_AUDIT_WRITE", "CAP_SYS_PTRACE")))


@pytest.mark.parametrize("default, sends, untrapped", [
    ("SCMP_ACT_ALLOW", None, None),  # the untrapped calls fall to the default
    ("SCMP_ACT_ALLOW", "SCMP_ACT_ALLOW", None),
    ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_LOG"),  # not to the default: they were logged
    ("SCMP_ACT_LOG", None, None),
    ("SCMP_ACT_LOG", "SCMP_ACT_ALLOW", "SCMP_ACT_ALLOW"),
    ("SCMP_ACT_ERRNO", "SCMP_ACT_ALLOW", "SCMP_ACT_ALLOW"),
    ("SCMP_ACT_ERRNO", "SCMP_ACT_LOG", "SCMP_ACT_LOG"),
])
def test_untrapped_sends_keep_the_bases_action(tmp_path, default, sends, untrapped):
    rules = [{"names": ["add_key", "keyctl"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
             {"names": ["connect", "bind", "listen"], "action": "SCMP_ACT_ALLOW"}]
    if sends:
        rules.append({"names": ["sendto", "sendmsg", "sendmmsg"], "action": sends})
    base = {"defaultAction": default, "syscalls": rules}
    profile = generate(["--base", write_json(tmp_path / "base.json", base)])
    expected = [dict(rule, action=untrapped) for rule in UNTRAPPED_SENDS] if untrapped else []
    assert profile["syscalls"][3:-2] == expected
    assert [r["action"] for r in profile["syscalls"][-2:]] == ["SCMP_ACT_ERRNO", "SCMP_ACT_ERRNO"]
    assert "architectures" not in profile  # the base's choice (none: native only) is kept
    assert_answers_as_the_base(base, profile, ((),))
    assert generate(["--base", write_json(tmp_path / "again.json", profile)]) == profile


@pytest.mark.parametrize("options", [[], ["--listener-metadata", "m"]])
def test_log_allowed_syscalls_stay_logged(tmp_path, options):
    base = {"defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["connect", "bind", "listen", "sendmsg", "sendmmsg", "sendto"],
                          "action": "SCMP_ACT_LOG"}]}
    profile = generate(["--base", write_json(tmp_path / "base.json", base)] + options)
    assert_answers_as_the_base(base, profile, ((),))
    assert {r["action"] for r in profile["syscalls"] if r.get("comment") == gen.UNTRAPPED_COMMENT} == {
        "SCMP_ACT_LOG"}
    again = write_json(tmp_path / "again.json", profile)
    assert generate(["--base", again] + options) == profile


def test_arch_option_replaces_the_bases_architectures(tmp_path):
    base = write_json(tmp_path / "base.json", PODMAN_LIKE)
    profile = generate(["--base", base, "--arch", "aarch64"])
    assert "archMap" not in profile
    assert profile["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]


def test_empty_conditions_count_as_none(tmp_path):
    base = write_json(tmp_path / "base.json", podman_like(syscalls=[
        {"names": sorted(TRAPPED), "action": "SCMP_ACT_ALLOW", "includes": {"caps": []}, "excludes": {}}]))
    assert [r["action"] for r in generate(["--base", base])["syscalls"]] == [
        "SCMP_ACT_NOTIFY"] * 3 + ["SCMP_ACT_ALLOW"] * 3 + ["SCMP_ACT_ERRNO"]


def test_base_flags_are_kept_and_extended(tmp_path):
    base = write_json(tmp_path / "base.json", dict(PODMAN_LIKE, flags=["SECCOMP_FILTER_FLAG_LOG"]))
    assert generate(["--base", base])["flags"] == ["SECCOMP_FILTER_FLAG_LOG"]
    assert generate(["--base", base, "--wait-killable-recv"])["flags"] == [
        "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]


@pytest.mark.parametrize("options", [
    [],
    ["--wait-killable-recv", "--listener-metadata", "m"],
    ["--arch", "x86_64"],
    UDP + ["--listener-metadata", "m"],
])
def test_merging_again_gives_the_same_file(tmp_path, options):
    base = write_json(tmp_path / "base.json", PODMAN_LIKE)
    first = run(["--base", base] + options).stdout
    second = run(["--base", write_json(tmp_path / "first.json", json.loads(first))] + options).stdout
    assert first and second == first


@pytest.mark.skipif(not PODMAN_DEFAULT.exists(), reason="podman's default profile is not installed")
def test_merging_podmans_default_again_gives_the_same_file(tmp_path):
    first = tmp_path / "first.json"
    assert run(["--base", "podman", "-o", str(first)]).returncode == 0
    second = tmp_path / "second.json"
    assert run(["--base", str(first), "-o", str(second)]).returncode == 0
    assert first.read_bytes() == second.read_bytes()


def test_allow_all_profile_merged_again_is_the_same(tmp_path):
    first = run(["--base", "none"]).stdout
    assert run(["--base", write_json(tmp_path / "p.json", json.loads(first))]).stdout == first


# Bases of the merges of earlier versions: podman-like, allow-all, and
# podman's own when installed.
OLD_MERGE_BASES = ["podman-like", "none"] + (["podman"] if PODMAN_DEFAULT.exists() else [])
# The rules of the --udp profile of earlier versions: every send that can
# carry a destination.
OLD_UDP_RULES = ('SECCOMP_NOTIFY_RULES = (("connect", ()), ("bind", ()), ("listen", ()), '
                 '("sendto", ({"index": 4, "value": 0, "op": "SCMP_CMP_NE"},)), '
                 '("sendmsg", ()), ("sendmmsg", ()), ("socketcall", ()))\n')


@pytest.mark.parametrize("base", OLD_MERGE_BASES)
@pytest.mark.parametrize("old_metadata, then", [
    (None, []),
    (None, UDP),
    ("m", []),
    ("m", ["--listener-metadata", "m"]),
    ("m", UDP + ["--listener-metadata", "other"]),
])
def test_merge_made_with_udp_by_an_earlier_version_is_replaced(tmp_path, base, old_metadata, then):
    """A profile an earlier seccomp-gen.py --udp made (every sendmsg trapped,
    the token in listenerMetadata), merged, is the base merged directly: no
    rule or token of it is left."""
    if base == "podman-like":
        base = write_json(tmp_path / "base.json", PODMAN_LIKE)
    old = generate(["--base", base] + (["--listener-metadata", old_metadata] if old_metadata else []),
                   argv0=copy_beside(tmp_path, OLD_UDP_RULES))
    old["listenerMetadata"] = " ".join(([old_metadata] if old_metadata else []) + [UDP_TOKEN])
    old = with_settings_first(old)
    # It is that profile: sendmsg trapped whatever its flags, marked as ours.
    assert any({"sendmsg", "sendmmsg"} <= set(r["names"]) and not r.get("args")
               and r["action"] == "SCMP_ACT_NOTIFY" and r["comment"] == gen.NOTIFY_COMMENT
               for r in old["syscalls"])
    made = write_json(tmp_path / "old.json", old)
    res = run(["--base", made] + then)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert UDP_TOKEN not in res.stdout
    # Its own listenerMetadata is kept (less the token) unless replaced.
    expected = (then[then.index("--listener-metadata") + 1] if "--listener-metadata" in then
                else old_metadata)
    assert json.loads(res.stdout).get("listenerMetadata") == expected
    kept = ["--listener-metadata", old_metadata] if old_metadata and "--listener-metadata" not in then else []
    assert res.stdout == run(["--base", base] + then + kept).stdout


def with_settings_first(profile):
    """profile with its listenerMetadata just before syscalls, where this program writes it."""
    syscalls = profile.pop("syscalls")
    return dict(profile, syscalls=syscalls)


def test_merge_made_by_the_previous_version_is_upgraded(tmp_path):
    """A profile of the seccomp-gen.py that trapped every send and no listen."""
    old = copy_beside(tmp_path, 'SECCOMP_NOTIFY_RULES = (("connect", ()), ("bind", ()), '
                                '("sendto", ({"index": 4, "value": 0, "op": "SCMP_CMP_NE"},)), '
                                '("sendmsg", ()), ("sendmmsg", ()), ("socketcall", ()))\n')
    base = write_json(tmp_path / "base.json", PODMAN_LIKE)
    made = write_json(tmp_path / "old.json", generate(["--base", base], argv0=old))
    for options in ([], UDP):
        assert run(["--base", made] + options).stdout == run(["--base", base] + options).stdout


# -- bases that are refused --------------------------------------------------

def podman_like(**changes):
    base = json.loads(json.dumps(PODMAN_LIKE))
    base.update(changes)
    return base


def with_rule(rule, default="SCMP_ACT_ERRNO"):
    return podman_like(defaultAction=default, syscalls=PODMAN_LIKE["syscalls"] + [rule])


@pytest.mark.parametrize("base, fragments", [
    (podman_like(listenerPath="/run/other/agent.sock"), ["listenerPath", "/run/other/agent.sock"]),
    (with_rule({"names": ["getpid"], "action": "SCMP_ACT_NOTIFY"}), ["another seccomp agent", "getpid"]),
    (with_rule({"names": ["connect"], "action": "SCMP_ACT_ERRNO"}), ["SCMP_ACT_ERRNO", "connect"]),
    (with_rule({"names": ["bind"], "action": "SCMP_ACT_KILL_PROCESS"}, default="SCMP_ACT_ALLOW"),
     ["SCMP_ACT_KILL_PROCESS", "bind"]),
    (with_rule({"names": ["sendmsg"], "action": "SCMP_ACT_ERRNO",
                "excludes": {"caps": ["CAP_NET_RAW"]}}), ["sendmsg", "under conditions"]),
    (podman_like(syscalls=[{"names": ["connect"], "action": "SCMP_ACT_ALLOW",
                            "includes": {"caps": ["CAP_NET_ADMIN"]}}]), ["connect", "unconditionally"]),
    (podman_like(syscalls=[{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]), ["connect", "SCMP_ACT_ERRNO"]),
    (podman_like(defaultAction=None), ["defaultAction"]),
    (podman_like(syscalls={"names": []}), ["syscalls"]),
    (podman_like(syscalls=["connect"]), ["syscalls[0]"]),
    (podman_like(syscalls=[{"names": "connect", "action": "SCMP_ACT_ALLOW"}]), ["syscalls[0]"]),
    (podman_like(flags="SECCOMP_FILTER_FLAG_LOG"), ["flags"]),
    (podman_like(syscalls=[{"names": ["read"], "action": "SCMP_ACT_ALLOW", "includes": ["x"]}]),
     ["syscalls[0]", "includes"]),
    ([PODMAN_LIKE], ["JSON object"]),
])
def test_refused_bases(tmp_path, base, fragments):
    assert_one_line_error(run(["--base", write_json(tmp_path / "base.json", base)]), *fragments)


def test_base_of_another_listener_is_accepted_with_that_path(tmp_path):
    base = write_json(tmp_path / "base.json", podman_like(listenerPath="/run/b4ns/b.sock"))
    assert generate(["--base", base, "--listener-path", "/run/b4ns/b.sock"])["listenerPath"] == "/run/b4ns/b.sock"


def test_merge_made_for_other_trapped_syscalls_is_refused(tmp_path):
    profile = generate(["--base", write_json(tmp_path / "base.json", PODMAN_LIKE)])
    profile["syscalls"][0]["names"].append("getsockname")
    assert_one_line_error(run(["--base", write_json(tmp_path / "old.json", profile)]), "getsockname")


def test_missing_base_is_one_line_error(tmp_path):
    assert_one_line_error(run(["--base", str(tmp_path / "nope.json")]), "nope.json", "cannot read")


def test_unreadable_base_is_one_line_error(tmp_path):
    assert_one_line_error(run(["--base", str(tmp_path)]), "cannot read")


@pytest.mark.parametrize("text", ["{", "", "\xff\xfe", "{\"defaultAction\": NaNx}"])
def test_non_json_base_is_one_line_error(tmp_path, text):
    path = tmp_path / "base.json"
    path.write_bytes(text.encode("latin-1"))
    assert_one_line_error(run(["--base", str(path)]), "not valid JSON")


# -- finding podman's and Docker's profiles ----------------------------------

def test_podman_profile_from_containers_conf(tmp_path, monkeypatch):
    (tmp_path / "a.conf").write_text('[engine]\nseccomp_profile = "/wrong"\n'
                                     '[containers]\n# seccomp_profile = "/commented"\n'
                                     'seccomp_profile = "/etc/first.json"\n')
    (tmp_path / "b.conf").write_text("[containers]\nseccomp_profile='/etc/later.json'  # wins\n")
    monkeypatch.delenv("CONTAINERS_CONF", raising=False)
    monkeypatch.setattr(gen, "CONTAINERS_CONFS", (str(tmp_path / "a.conf"), str(tmp_path / "*.none"),
                                                  str(tmp_path / "b.conf")))
    assert gen.podman_profile_path() == "/etc/later.json"
    monkeypatch.setenv("CONTAINERS_CONF", str(tmp_path / "a.conf"))
    assert gen.podman_profile_path() == "/etc/first.json"


def test_podman_profile_prefers_etc_override(tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "CONTAINERS_CONFS", ())
    override, default = tmp_path / "etc.json", tmp_path / "share.json"
    monkeypatch.setattr(gen, "PODMAN_PROFILES", (str(override), str(default)))
    assert gen.podman_profile_path() is None
    default.write_text("{}")
    assert gen.podman_profile_path() == str(default)
    override.write_text("{}")
    assert gen.podman_profile_path() == str(override)


def test_missing_podman_profile_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(gen, "CONTAINERS_CONFS", ())
    monkeypatch.setattr(gen, "PODMAN_PROFILES", (str(tmp_path / "none.json"),))
    with pytest.raises(gen.ProfileError, match="podman's default profile not found"):
        gen.resolve_base("podman")


@pytest.mark.parametrize("settings, expected", [
    (None, "built into dockerd"),
    ({}, "built into dockerd"),
    ({"seccomp-profile": "builtin"}, "built into dockerd"),
    ({"seccomp-profile": "unconfined"}, None),
    ({"seccomp-profile": "PROFILE"}, "PROFILE"),
])
def test_docker_profile_from_daemon_json(tmp_path, monkeypatch, settings, expected):
    daemon_json = tmp_path / "daemon.json"
    profile = write_json(tmp_path / "docker-profile.json", PODMAN_LIKE)
    if settings is not None:
        if settings.get("seccomp-profile") == "PROFILE":
            settings = {"seccomp-profile": profile}
        write_json(daemon_json, settings)
    monkeypatch.setattr(gen, "DOCKER_DAEMON_JSONS", (str(daemon_json),))
    if expected == "built into dockerd":
        with pytest.raises(gen.ProfileError, match=expected):
            gen.resolve_base("docker")
    elif expected is None:
        assert gen.resolve_base("docker")[0] is None
    else:
        assert gen.resolve_base("docker")[0] == PODMAN_LIKE


def test_auto_without_any_default_warns_and_allows_all(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gen, "CONTAINERS_CONFS", ())
    monkeypatch.setattr(gen, "PODMAN_PROFILES", (str(tmp_path / "none.json"),))
    monkeypatch.setattr(gen, "DOCKER_DAEMON_JSONS", (str(tmp_path / "none.json"),))
    assert gen.resolve_base("auto") == (None, "none")
    err = capsys.readouterr().err
    assert "warning" in err and "--base none" in err


def test_auto_uses_podmans_default(monkeypatch, tmp_path):
    monkeypatch.setattr(gen, "CONTAINERS_CONFS", ())
    monkeypatch.setattr(gen, "PODMAN_PROFILES", (write_json(tmp_path / "p.json", PODMAN_LIKE),))
    base, description = gen.resolve_base("auto")
    assert base == PODMAN_LIKE and "podman" in description


@pytest.mark.skipif(not PODMAN_DEFAULT.exists(), reason="podman's default profile is not installed")
def test_default_is_the_merge_into_podmans_profile(tmp_path):
    res = run([], env={"HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "merging into podman's default profile" in res.stderr
    assert json.loads(res.stdout) == generate(["--base", "podman"], env={"HOME": str(tmp_path)})


# -- output --------------------------------------------------------------------

def test_output_file_is_written_whole_and_readable(tmp_path):
    out = tmp_path / "seccomp.json"
    res = run(["--base", "none", "-o", str(out)])
    assert res.returncode == 0 and res.stdout == ""
    assert json.loads(out.read_text()) == generate(["--base", "none"])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert os.listdir(str(tmp_path)) == ["seccomp.json"]


def test_failed_run_leaves_the_output_file_untouched(tmp_path):
    out = tmp_path / "seccomp.json"
    out.write_text("old")
    assert_one_line_error(run(["--base", str(tmp_path / "missing.json"), "-o", str(out)]), "cannot read")
    assert out.read_text() == "old"
    assert os.listdir(str(tmp_path)) == ["seccomp.json"]


def test_output_failure_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "dir"
    target.mkdir()
    assert_one_line_error(run(["--base", "none", "-o", str(target)]), "cannot write")
    assert sorted(os.listdir(str(tmp_path))) == ["dir"]


def test_output_into_missing_directory_is_one_line_error(tmp_path):
    assert_one_line_error(run(["--base", "none", "-o", str(tmp_path / "no" / "p.json")]), "cannot write")


# -- the shell wrapper ---------------------------------------------------------

@pytest.mark.parametrize("options", [["--base", "none"], ["--base", "BASE", "--listener-metadata", "x"],
                                     ["--base", "BASE", "--udp"]])
def test_wrapper_gives_the_same_profile(tmp_path, options):
    options = [write_json(tmp_path / "b.json", PODMAN_LIKE) if o == "BASE" else o for o in options]
    assert os.access(str(WRAPPER), os.X_OK)
    wrapped = run(options, cwd=str(tmp_path), argv0=[str(WRAPPER)])
    assert wrapped.returncode == 0, wrapped.stderr
    assert wrapped.stdout == run(options).stdout


def test_wrapper_redirected_like_the_original_workflow(tmp_path):
    out = tmp_path / "seccomp.json"
    env = dict(os.environ, XDG_RUNTIME_DIR="/run/user/4242", HOME=str(tmp_path))
    subprocess.run("./test/seccomp.json.sh --base none > %s" % out, shell=True, check=True,
                   cwd=str(ROOT), env=env)
    assert json.loads(out.read_text()) == generate(["--base", "none"])


def test_socketcall_is_trapped_only_where_the_base_allows_it(tmp_path):
    """i386's socketcall carries connect & co. in memory: trapped so the daemon
    sees them, but never handed to the daemon where the base denies it."""
    denying = generate(["--base", write_json(tmp_path / "deny.json", PODMAN_LIKE)])
    assert verdict(denying, "socketcall") == verdict(PODMAN_LIKE, "socketcall") != "SCMP_ACT_NOTIFY"
    allowing = dict(PODMAN_LIKE, syscalls=PODMAN_LIKE["syscalls"] + [
        {"names": ["socketcall"], "action": "SCMP_ACT_ALLOW"}])
    merged = generate(["--base", write_json(tmp_path / "allow.json", allowing)])
    assert verdict(merged, "socketcall") == "SCMP_ACT_NOTIFY"


def test_io_uring_is_denied_whatever_the_base(tmp_path):
    """io_uring's socket operations never reach seccomp: no profile of ours lets them run."""
    allow_all = dict(PODMAN_LIKE, defaultAction="SCMP_ACT_ALLOW")
    for profile in (generate(["--base", "none"]), generate(["--base", write_json(tmp_path / "b.json", allow_all)])):
        for name in gen.IO_URING:
            assert verdict(profile, name) == "SCMP_ACT_ERRNO"


# -- the Docker runtime wrapper's listenerMetadata -----------------------------

def wrapper_module(metadata):
    """The runtime wrapper's code (tests/e2e/test_docker.py runs it whole), loaded."""
    namespace = {"__name__": "bypass4netns_runtime_wrapper"}
    exec(compile(gen.wrapper_script("/usr/bin/true", LISTENER, metadata, "/w"), "wrapper", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("base", ["none", "podman-like"])
@pytest.mark.parametrize("options, metadata, expected", [
    ([], None, None),
    ([], "name=web", "name=web"),
    (UDP, None, None),
    (UDP, "name=web", "name=web"),
])
def test_runtime_wrapper_puts_back_the_profiles_metadata(tmp_path, base, options, metadata, expected):
    """Docker drops listenerMetadata: the wrapper, written once, puts back
    what the profile had, and never the token of earlier --udp profiles."""
    if base == "podman-like":
        base = write_json(tmp_path / "base.json", PODMAN_LIKE)
    profile = generate(["--base", base] + options + (["--listener-metadata", metadata] if metadata else []))
    assert profile.get("listenerMetadata") == expected
    seccomp = {k: v for k, v in profile.items() if k not in ("listenerPath", "listenerMetadata")}
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    write_json(bundle / "config.json", {"ociVersion": "1.0.2-dev", "linux": {"seccomp": seccomp}})
    wrapper_module(metadata)["add_listener"](str(bundle))
    patched = json.loads((bundle / "config.json").read_text())["linux"]["seccomp"]
    assert patched == dict(seccomp, listenerPath=LISTENER, **({"listenerMetadata": expected} if expected else {}))


@pytest.mark.parametrize("metadata", [None, "name=web"])
@pytest.mark.parametrize("rule", [
    {"names": ["sendmsg"], "action": "SCMP_ACT_NOTIFY"},  # an earlier --udp profile's
    {"names": ["connect", "sendmsg"], "action": "SCMP_ACT_NOTIFY", "args": []},  # Docker's form
    {"names": ["sendmsg"], "action": "SCMP_ACT_NOTIFY", "args": [masked(MSG_FASTOPEN, MSG_FASTOPEN)]},
    {"names": ["sendmsg"], "action": "SCMP_ACT_ALLOW"},
])
def test_runtime_wrapper_adds_no_udp_token_whatever_the_rules(tmp_path, rule, metadata):
    """The wrappers of earlier versions added the token when the rules
    trapped every sendmsg; this one sets listenerMetadata to --listener-metadata only."""
    seccomp = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["bind"], "action": "SCMP_ACT_NOTIFY"}, rule]}
    write_json(tmp_path / "config.json", {"linux": {"seccomp": seccomp}})
    wrapper_module(metadata)["add_listener"](str(tmp_path))
    patched = json.loads((tmp_path / "config.json").read_text())["linux"]["seccomp"]
    assert patched == dict(seccomp, listenerPath=LISTENER, **({"listenerMetadata": metadata} if metadata else {}))
    assert UDP_TOKEN not in gen.wrapper_script("/usr/bin/true", LISTENER, metadata, "/w")


@pytest.mark.parametrize("metadata, expected", [
    ("bypass4netns:udp", None),
    ("name=web bypass4netns:udp", "name=web"),
    ("name=web", "name=web"),
])
def test_runtime_wrapper_drops_the_udp_token_from_listener_metadata(tmp_path, metadata, expected):
    """--listener-metadata with the token is no error: the wrapper is written without it."""
    path = tmp_path / "w"
    res = run(["--docker-runtime-wrapper", str(path), "--runtime", "/bin/true", "--listener-metadata", metadata])
    assert res.returncode == 0 and res.stdout == res.stderr == "", res.stderr
    namespace = {"__name__": "bypass4netns_runtime_wrapper"}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    assert namespace["LISTENER_METADATA"] == expected
    assert UDP_TOKEN not in path.read_text()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    seccomp = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["connect"], "action": "SCMP_ACT_NOTIFY"}]}
    write_json(bundle / "config.json", {"linux": {"seccomp": seccomp}})
    namespace["add_listener"](str(bundle))
    patched = json.loads((bundle / "config.json").read_text())["linux"]["seccomp"]
    assert patched.get("listenerMetadata") == expected


def test_udp_applies_to_the_profile_not_the_wrapper(tmp_path):
    assert_one_line_error(run(["--docker-runtime-wrapper", str(tmp_path / "w"), "--udp"]),
                          "--udp applies to the profile")
    assert os.listdir(str(tmp_path)) == []


# -- the embedded copy is generated from the daemon's table ---------------------

def regenerator():
    """tests/regenerate_seccomp_rules.py, the tool that writes seccomp-gen.py's generated block."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("regenerate_seccomp_rules",
                                                  str(ROOT / "tests" / "regenerate_seccomp_rules.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checked_in_block_is_what_the_daemons_table_generates():
    tool = regenerator()
    _before, block, _after = tool.split(SCRIPT.read_text())
    assert block == tool.daemon_block(b4ns), "stale: run python3 tests/regenerate_seccomp_rules.py"


def test_regenerating_a_stale_copy_gives_back_the_checked_in_file(tmp_path, capsys):
    tool = regenerator()
    before, block, after = tool.split(SCRIPT.read_text())
    stale = tmp_path / "seccomp-gen.py"
    stale.write_text(before + block.replace('    ("listen", ()),\n', "") + after)
    argv = ["--daemon", str(ROOT / "bypass4netns.py"), "--generator", str(stale)]
    assert tool.main(argv + ["--check"]) == 1
    assert '+    ("listen", ()),' in capsys.readouterr().out
    assert tool.main(argv) == 0
    assert stale.read_text() == SCRIPT.read_text()
    assert tool.main(argv + ["--check"]) == 0


@pytest.mark.parametrize("rules", [
    (("connect", ()), ("sendto", (masked(MSG_FASTOPEN, MSG_FASTOPEN, index=3),))),
    (("sendmsg", (masked(0x40, 0x40), masked(MSG_FASTOPEN, MSG_FASTOPEN, index=3))),),
    (("bind", ({"index": 0, "value": 3, "op": "SCMP_CMP_NE"}, masked(0x40, 0, index=1))),),
])
def test_a_generated_block_is_the_table_it_was_made_of(rules):
    """Whatever filters a trapped call has, the block evaluates, in seccomp-gen.py, to the table."""
    tool = regenerator()
    block = tool.render(rules, {MSG_FASTOPEN: "MSG_FASTOPEN"})
    assert tool.split(block)[1] == block
    namespace = dict(vars(gen))
    exec(compile(block, "block", "exec"), namespace)
    assert namespace["EMBEDDED_NOTIFY_RULES"] == rules
    gen.validate_notify_rules(namespace["EMBEDDED_NOTIFY_RULES"])
