"""seccomp-gen.py and test/seccomp.json.sh: pure logic and CLI, no root needed."""

import ast
import importlib.util
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "seccomp-gen.py"
WRAPPER = ROOT / "test" / "seccomp.json.sh"
PODMAN_DEFAULT = pathlib.Path("/usr/share/containers/seccomp.json")
TRAPPED = {"connect", "bind", "sendto", "sendmsg", "sendmmsg", "socketcall"}
LISTENER = "/run/user/4242/bypass4netns.sock"

spec = importlib.util.spec_from_file_location("seccomp_gen", SCRIPT)
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)


def load_daemon():
    """bypass4netns.py from the repository root, imported as a file."""
    daemon_spec = importlib.util.spec_from_file_location("bypass4netns_for_test", ROOT / "bypass4netns.py")
    daemon = importlib.util.module_from_spec(daemon_spec)
    daemon_spec.loader.exec_module(daemon)
    return daemon


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
        {"names": ["read", "write", "connect", "bind", "sendto", "sendmsg", "sendmmsg", "socket"],
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
    ops = {"SCMP_CMP_EQ": lambda a, v: a == v, "SCMP_CMP_NE": lambda a, v: a != v,
           "SCMP_CMP_LT": lambda a, v: a < v, "SCMP_CMP_LE": lambda a, v: a <= v,
           "SCMP_CMP_GT": lambda a, v: a > v, "SCMP_CMP_GE": lambda a, v: a >= v}
    return all(ops[f["op"]](call_args[f["index"]], f["value"]) for f in filters or [])


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
    argument values its filters compare to (and their neighbours)."""
    names = set(TRAPPED)
    values = {0, 1}
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


# -- one source of truth ----------------------------------------------------

def test_embedded_rules_match_the_daemon():
    daemon = load_daemon()
    assert daemon.SECCOMP_NOTIFY_RULES == gen.EMBEDDED_NOTIFY_RULES


def test_embedded_rules_are_valid():
    gen.validate_notify_rules(gen.EMBEDDED_NOTIFY_RULES)
    assert {name for name, _ in gen.EMBEDDED_NOTIFY_RULES} == TRAPPED


@pytest.mark.parametrize("rules", [
    (),
    (("connect", ()), ("connect", ())),
    (("connect", [{"index": 4, "value": 0, "op": "SCMP_CMP_NE"}]),),
    (("sendto", ({"index": 4, "value": 0, "op": "SCMP_CMP_MASKED_EQ"},)),),
    (("sendto", ({"index": 6, "value": 0, "op": "SCMP_CMP_NE"},)),),
    (("sendto", ({"index": 4, "value": -1, "op": "SCMP_CMP_NE"},)),),
    (("sendto", ({"index": 4, "value": 0, "op": "SCMP_CMP_NE", "extra": 1},)),),
    ((42, ()),),
    ("connect",),
])
def test_malformed_rules_are_rejected(rules):
    with pytest.raises(ValueError):
        gen.validate_notify_rules(rules)


def test_rules_come_from_bypass4netns_beside_the_script(tmp_path):
    (tmp_path / "seccomp-gen.py").write_text(SCRIPT.read_text())
    (tmp_path / "bypass4netns.py").write_text('SECCOMP_NOTIFY_RULES = (("connect", ()),)\n')
    profile = generate(["--base", "none"], argv0=[sys.executable, str(tmp_path / "seccomp-gen.py")])
    assert [r["names"] for r in profile["syscalls"]] == [["connect"], gen.IO_URING]
    assert not (tmp_path / "__pycache__").exists()


@pytest.mark.parametrize("source", [
    "raise RuntimeError('half written')\n",
    "SECCOMP_NOTIFY_RULES = 'connect'\n",
    "import no_such_module_here\n",
    "def broken(:\n",
])
def test_a_broken_daemon_falls_back_to_the_embedded_copy(tmp_path, source):
    (tmp_path / "seccomp-gen.py").write_text(SCRIPT.read_text())
    (tmp_path / "bypass4netns.py").write_text(source)
    res = run(["--base", "none"], argv0=[sys.executable, str(tmp_path / "seccomp-gen.py")])
    assert res.returncode == 0, res.stderr
    assert "warning" in res.stderr and "embedded" in res.stderr
    assert json.loads(res.stdout) == generate(["--base", "none"])


def test_runs_piped_without_a_file(tmp_path):
    """curl ... | python3 - ARGS: no __file__, no bypass4netns.py around."""
    res = run(["--base", "none", "--arch", "aarch64"], cwd=str(tmp_path),
              stdin=SCRIPT.read_text(), argv0=[sys.executable, "-"])
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    profile = json.loads(res.stdout)
    assert profile["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert {n for r in profile["syscalls"] for n in r["names"]} == TRAPPED | set(gen.IO_URING)
    assert os.listdir(str(tmp_path)) == []


def test_source_is_python39_syntax():
    ast.parse(SCRIPT.read_text(), feature_version=(3, 9))


def test_vermin_finds_nothing_newer_than_python39():
    """Syntax and standard-library APIs (tests/run installs vermin)."""
    vermin = shutil.which("vermin")
    if not vermin:
        pytest.skip("vermin is not installed")
    res = subprocess.run([vermin, "-t=3.9-", "--violations", "--no-tips", str(SCRIPT)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert res.returncode == 0, res.stdout


# -- the allow-all profile (--base none) ------------------------------------

def test_allow_all_profile():
    profile = generate(["--base", "none", "--arch", "x86_64"])
    assert list(profile) == ["defaultAction", "architectures", "listenerPath", "syscalls"]
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    assert profile["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert profile["listenerPath"] == LISTENER
    assert profile["syscalls"] == [
        {"names": ["connect", "bind", "sendmsg", "sendmmsg", "socketcall"], "action": "SCMP_ACT_NOTIFY",
         "comment": gen.NOTIFY_COMMENT},
        {"names": ["sendto"], "action": "SCMP_ACT_NOTIFY",
         "args": [{"index": 4, "value": 0, "op": "SCMP_CMP_NE"}], "comment": gen.NOTIFY_COMMENT},
        gen.IO_URING_RULE,
    ]


def test_every_trapped_call_is_notified_and_others_allowed():
    profile = generate(["--base", "none", "--arch", "x86_64"])
    assert verdict(profile, "sendto", (3, 0, 0, 0, 0, 0)) == "SCMP_ACT_ALLOW"
    assert verdict(profile, "sendto", (3, 0, 0, 0, 0x7fff0000, 16)) == "SCMP_ACT_NOTIFY"
    for name in TRAPPED - {"sendto"}:
        assert verdict(profile, name) == "SCMP_ACT_NOTIFY"
    assert verdict(profile, "add_key") == "SCMP_ACT_ALLOW"


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


def test_listener_metadata():
    profile = generate(["--base", "none", "--listener-metadata", "name=web"])
    assert profile["listenerMetadata"] == "name=web"
    assert "listenerMetadata" not in generate(["--base", "none"])


def test_wait_killable_recv_flag_and_its_warning():
    res = run(["--base", "none", "--wait-killable-recv"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["flags"] == ["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]
    assert "warning" in res.stderr and "runc" in res.stderr
    assert "flags" not in generate(["--base", "none"])


def test_help_explains_every_option():
    res = run(["--help"])
    assert res.returncode == 0
    for option in ("--base", "--listener-path", "--listener-metadata", "--arch",
                   "--wait-killable-recv", "--output", "auto", "none", "podman", "docker",
                   "runc", "crun"):
        assert option in res.stdout


def test_unknown_option_is_one_line_error():
    assert_one_line_error(run(["--bogus"]), "--bogus")


# -- merging into a base profile ---------------------------------------------

def test_merge_keeps_the_base_and_traps_first(tmp_path):
    base = write_json(tmp_path / "base.json", PODMAN_LIKE)
    profile = generate(["--base", base])
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 38
    assert profile["archMap"] == PODMAN_LIKE["archMap"]
    assert "architectures" not in profile  # podman refuses both at once
    assert profile["listenerPath"] == LISTENER
    rules = profile["syscalls"]
    assert [r["action"] for r in rules[:3]] == ["SCMP_ACT_NOTIFY", "SCMP_ACT_NOTIFY", "SCMP_ACT_ALLOW"]
    assert rules[2] == {"names": ["sendto"], "action": "SCMP_ACT_ALLOW",
                        "args": [{"index": 4, "value": 0, "op": "SCMP_CMP_EQ"}],
                        "comment": gen.UNTRAPPED_COMMENT}
    # Every base rule is kept, less the trapped names; the one left empty goes.
    assert rules[-1] == gen.IO_URING_RULE
    rest = rules[3:-1]
    assert rest[1] == dict(PODMAN_LIKE["syscalls"][1], names=["read", "write", "socket"])
    assert rest[6] == dict(PODMAN_LIKE["syscalls"][6], names=["recvmmsg"])
    assert rest == [r if not set(names_of(r)) & TRAPPED else
                    dict(r, names=[n for n in names_of(r) if n not in TRAPPED])
                    for r in PODMAN_LIKE["syscalls"][:-1]]


def test_merge_answers_every_other_call_as_the_base_did(tmp_path):
    base = write_json(tmp_path / "base.json", PODMAN_LIKE)
    profile = generate(["--base", base])
    for caps in ((), ("CAP_SYS_ADMIN",)):
        for name, call_args in sample_calls(PODMAN_LIKE):
            trapped = name in TRAPPED and (name != "sendto" or call_args[4] != 0) and (
                name not in gen.TRAPPED_ONLY_IF_ALLOWED or verdict(PODMAN_LIKE, name) == "SCMP_ACT_ALLOW")
            expected = "SCMP_ACT_NOTIFY" if trapped else verdict(PODMAN_LIKE, name, call_args, caps)
            assert verdict(profile, name, call_args, caps) == expected, (name, call_args, caps)


@pytest.mark.skipif(not PODMAN_DEFAULT.exists(), reason="podman's default profile is not installed")
def test_merge_into_podmans_default_answers_every_other_call_as_it_did():
    base = json.loads(PODMAN_DEFAULT.read_text())
    profile = generate(["--base", str(PODMAN_DEFAULT)])
    for caps in ((), ("CAP_SYS_ADMIN", "CAP_AUDIT_WRITE", "CAP_SYS_PTRACE")):
        for name, call_args in sample_calls(base):
            if name in TRAPPED and not (name == "sendto" and call_args[4] == 0):
                continue  # trapped: below
            assert verdict(profile, name, call_args, caps) == verdict(base, name, call_args, caps)
    for name in TRAPPED - {"sendto"}:
        assert verdict(profile, name) == "SCMP_ACT_NOTIFY"
    assert verdict(profile, "sendto", (3, 0, 0, 0, 0x1000, 16)) == "SCMP_ACT_NOTIFY"


def test_merge_under_allowing_default_needs_no_extra_rule(tmp_path):
    base = write_json(tmp_path / "base.json", {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["add_key", "keyctl"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]})
    profile = generate(["--base", base])
    assert [r["action"] for r in profile["syscalls"]] == ["SCMP_ACT_NOTIFY", "SCMP_ACT_NOTIFY", "SCMP_ACT_ERRNO",
                                                         "SCMP_ACT_ERRNO"]
    assert "architectures" not in profile  # the base's choice (none: native only) is kept


def test_log_allowed_syscalls_stay_logged(tmp_path):
    base = write_json(tmp_path / "base.json", {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["connect", "bind", "sendmsg", "sendmmsg", "sendto"],
                      "action": "SCMP_ACT_LOG"}]})
    profile = generate(["--base", base])
    assert profile["syscalls"][2]["action"] == "SCMP_ACT_LOG"
    again = write_json(tmp_path / "again.json", profile)
    assert generate(["--base", again]) == profile


def test_arch_option_replaces_the_bases_architectures(tmp_path):
    base = write_json(tmp_path / "base.json", PODMAN_LIKE)
    profile = generate(["--base", base, "--arch", "aarch64"])
    assert "archMap" not in profile
    assert profile["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]


def test_empty_conditions_count_as_none(tmp_path):
    base = write_json(tmp_path / "base.json", podman_like(syscalls=[
        {"names": sorted(TRAPPED), "action": "SCMP_ACT_ALLOW", "includes": {"caps": []}, "excludes": {}}]))
    assert [r["action"] for r in generate(["--base", base])["syscalls"]] == [
        "SCMP_ACT_NOTIFY", "SCMP_ACT_NOTIFY", "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO"]


def test_base_flags_are_kept_and_extended(tmp_path):
    base = write_json(tmp_path / "base.json", dict(PODMAN_LIKE, flags=["SECCOMP_FILTER_FLAG_LOG"]))
    assert generate(["--base", base])["flags"] == ["SECCOMP_FILTER_FLAG_LOG"]
    assert generate(["--base", base, "--wait-killable-recv"])["flags"] == [
        "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]


@pytest.mark.parametrize("options", [
    [],
    ["--wait-killable-recv", "--listener-metadata", "m"],
    ["--arch", "x86_64"],
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

@pytest.mark.parametrize("options", [["--base", "none"], ["--base", "BASE", "--listener-metadata", "x"]])
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
