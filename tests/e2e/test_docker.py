"""Rootless Docker, end to end, and the OCI runtime wrapper seccomp-gen.py writes for it.

Docker 20.10 (Debian 12's docker.io) reads a --security-opt seccomp=FILE
profile into its own structure, which has no listenerPath: the NOTIFY rules
reach runc, the daemon's socket does not, and runc refuses the container.
`seccomp-gen.py --docker-runtime-wrapper PATH` writes a runtime wrapper that
puts listenerPath back into the bundle's config.json; dockerd runs it when
registered with --add-runtime.

The first tests run the wrapper against a stand-in runtime (no root, no
Docker). The others install docker.io and rootlesskit on demand (no
recommends), start a rootless dockerd of their own as the test user inside
the test namespace (rootlesskit with slirp4netns, vfs storage, state under
per-run directories), import the test bed's busybox root filesystem as an
image (nothing is ever pulled), and run containers against bypass4netns.py.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

pytest.register_assert_rewrite("e2e.rootless_docker")  # its checks report as this module's do

from e2e import rootless_docker  # noqa: E402
from e2e.daemon import ROOT  # noqa: E402
from e2e.fileserver import serve_file  # noqa: E402
from e2e.rootless_docker import (  # noqa: E402
    assert_fetch_bypassed, assert_fetch_left_alone, docker_run, exec_fetch, probe_denials)

GENERATOR = ROOT / "seccomp-gen.py"
RUNTIME_NAME = "bypass4netns"
# Per-run state: ~/PREFIX<pid> (data root, settings, wrapper) and
# $XDG_RUNTIME_DIR/PREFIX<pid> (dockerd's runtime dir: sockets, pid file).
PREFIX = "b4ns-docker-"
NOT_SET = "listenerPath is not set"

NOTIFY_CONFIG = {
    "ociVersion": "1.0.2-dev",
    "process": {"args": ["true"]},
    "linux": {"seccomp": {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["connect"], "action": "SCMP_ACT_NOTIFY"}],
    }},
}
LISTENER = "/run/user/4242/bypass4netns.sock"


# -- the wrapper against a stand-in runtime (no root) ---------------------------

@pytest.fixture
def wrapper(tmp_path):
    """make(*options) -> path of a wrapper around a runtime that records its argv."""
    fake = tmp_path / "fake-runc"
    fake.write_text('#!/bin/sh\nprintf "%%s\\n" "$@" > %s/argv\n' % tmp_path)
    fake.chmod(0o755)

    def make(*options):
        path = tmp_path / "bypass4netns-runc"
        res = subprocess.run([sys.executable, str(GENERATOR), "--docker-runtime-wrapper", str(path),
                              "--runtime", str(fake), "--listener-path", LISTENER, *options],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        assert res.returncode == 0 and res.stdout == "", res.stderr
        assert os.access(str(path), os.X_OK)
        return str(path)
    return make


def bundle(tmp_path, config=NOTIFY_CONFIG, name="bundle"):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def call(wrapper_path, args, cwd=None):
    return subprocess.run([wrapper_path] + list(args), cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=30)


def recorded_argv(tmp_path):
    return (tmp_path / "argv").read_text().splitlines()


def seccomp_of(bundle_dir):
    return json.loads((bundle_dir / "config.json").read_text())["linux"]["seccomp"]


# containerd's runc shim calls: global options, then the command and its own.
SHIM_GLOBALS = ["--root", "/run/runc/moby", "--log", "LOG", "--log-format", "json"]


@pytest.mark.parametrize("form", ["--bundle DIR", "--bundle=DIR", "-b DIR", "cwd"])
@pytest.mark.parametrize("command", ["create", "run"])
def test_wrapper_sets_the_listener_and_runs_the_runtime_with_the_same_argv(wrapper, tmp_path, form, command):
    path = wrapper()
    b = bundle(tmp_path)
    where = {"--bundle DIR": ["--bundle", str(b)], "--bundle=DIR": ["--bundle=" + str(b)],
             "-b DIR": ["-b", str(b)], "cwd": []}[form]
    args = SHIM_GLOBALS + [command] + where + ["--pid-file", str(tmp_path / "pid"), "ctr-1"]
    res = call(path, args, cwd=str(b))
    assert res.returncode == 0, res.stderr
    assert recorded_argv(tmp_path) == args
    seccomp = seccomp_of(b)
    assert seccomp["listenerPath"] == LISTENER
    assert "listenerMetadata" not in seccomp
    assert seccomp["syscalls"] == NOTIFY_CONFIG["linux"]["seccomp"]["syscalls"]
    assert os.listdir(str(b)) == ["config.json"]  # no temporary file left


def test_wrapper_adds_listener_metadata_when_asked(wrapper, tmp_path):
    path = wrapper("--listener-metadata", "name=web")
    b = bundle(tmp_path)
    assert call(path, ["create", "--bundle", str(b), "ctr"]).returncode == 0
    assert seccomp_of(b)["listenerMetadata"] == "name=web"


@pytest.mark.parametrize("case", ["no NOTIFY rule", "listenerPath already set", "no seccomp",
                                  "other command"])
def test_wrapper_leaves_everything_else_untouched(wrapper, tmp_path, case):
    path = wrapper()
    config = json.loads(json.dumps(NOTIFY_CONFIG))
    args = SHIM_GLOBALS + ["create", "--bundle", "DIR", "ctr"]
    if case == "no NOTIFY rule":
        config["linux"]["seccomp"]["syscalls"][0]["action"] = "SCMP_ACT_ERRNO"
    elif case == "listenerPath already set":
        config["linux"]["seccomp"]["listenerPath"] = "/elsewhere.sock"
    elif case == "no seccomp":
        del config["linux"]["seccomp"]
    else:
        args = SHIM_GLOBALS + ["start", "ctr"]
    b = bundle(tmp_path, config)
    before = (b / "config.json").read_bytes()
    args = [str(b) if a == "DIR" else a for a in args]
    res = call(path, args, cwd=str(b))
    assert res.returncode == 0, res.stderr
    assert recorded_argv(tmp_path) == args
    assert (b / "config.json").read_bytes() == before


def test_wrapper_finds_the_command_after_global_options_with_values(wrapper, tmp_path):
    """A global option's value that looks like a command is not taken for one."""
    path = wrapper()
    b = bundle(tmp_path)
    args = ["--log", "create", "--debug", "--root=/r", "--log-format", "text", "delete", "--force", "ctr"]
    assert call(path, args, cwd=str(b)).returncode == 0
    assert recorded_argv(tmp_path) == args
    assert "listenerPath" not in seccomp_of(b)


def test_wrapper_refuses_to_start_what_it_cannot_patch_and_says_so_in_the_runtime_log(wrapper, tmp_path):
    path = wrapper()
    b = tmp_path / "broken"
    b.mkdir()
    (b / "config.json").write_text("{not json")
    log = tmp_path / "log.json"
    res = call(path, ["--log", str(log), "--log-format", "json", "create", "--bundle", str(b), "ctr"])
    assert res.returncode == 1
    assert not (tmp_path / "argv").exists(), "the runtime ran"
    assert "cannot set listenerPath in %s/config.json" % b in res.stderr
    entry = json.loads(log.read_text().splitlines()[-1])  # where containerd's shim reads runc's error
    assert entry["level"] == "error" and "cannot set listenerPath" in entry["msg"]


@pytest.mark.parametrize("options, fragment", [
    (["--docker-runtime-wrapper", "W", "-o", "P"], "--output applies to the profile"),
    (["--docker-runtime-wrapper", "W", "--base", "none"], "--base applies to the profile"),
    (["--runtime", "runc"], "--runtime applies only with --docker-runtime-wrapper"),
    (["--docker-runtime-wrapper", "W", "--runtime", "no-such-runtime-b4ns"], "not found"),
    (["--docker-runtime-wrapper", "RUNTIME", "--runtime", "RUNTIME"], "is the runtime itself"),
    (["--docker-runtime-wrapper", "W", "--listener-path", "relative.sock"], "not an absolute path"),
])
def test_generator_refuses_bad_wrapper_options_in_one_line(tmp_path, options, fragment):
    runtime = tmp_path / "runc"
    runtime.write_text("#!/bin/sh\n")
    runtime.chmod(0o755)
    names = {"W": str(tmp_path / "wrapper"), "P": str(tmp_path / "profile.json"), "RUNTIME": str(runtime)}
    res = subprocess.run([sys.executable, str(GENERATOR)] + [names.get(o, o) for o in options],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                         env=dict(os.environ, XDG_RUNTIME_DIR="/run/user/4242"))
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and fragment in res.stderr, res.stderr
    assert sorted(os.listdir(str(tmp_path))) == ["runc"], "something was written"
    assert runtime.read_text() == "#!/bin/sh\n"


def test_help_explains_the_wrapper():
    res = subprocess.run([sys.executable, str(GENERATOR), "--help"], stdout=subprocess.PIPE,
                         universal_newlines=True)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for words in ("--docker-runtime-wrapper PATH", "--runtime RUNTIME", "--add-runtime",
                  "docker run --runtime", NOT_SET):
        assert words in text, words


# -- rootless Docker -------------------------------------------------------------

class Dockerd(rootless_docker.Dockerd):
    """A rootless dockerd of the test user, in the test namespace, with the wrapper."""

    def __init__(self, testbed, listener_path):
        self.home = os.path.join(testbed.user_home(), PREFIX + str(os.getpid()))
        self.xdg = os.path.join(testbed.runtime_dir(), PREFIX + str(os.getpid()))
        self.host_dirs = [self.home, self.xdg]
        self.remove_dirs()
        for d in self.host_dirs:
            os.mkdir(d, 0o700)
            os.chown(d, testbed.user_uid(), testbed.user_gid())
        self.wrapper = os.path.join(self.home, "bypass4netns-runc")
        # As README says: piped, as the user, who then owns the wrapper.
        subprocess.run(testbed.as_user(["python3", "-", "--docker-runtime-wrapper", self.wrapper,
                                        "--listener-path", listener_path], netns=False),
                       input=GENERATOR.read_text(), universal_newlines=True, check=True, timeout=60)
        self.start(testbed, testbed.as_user, os.path.join(self.home, "dockerd.log"),
                   ["--add-runtime", "%s=%s" % (RUNTIME_NAME, self.wrapper)])


def remove_stale_runs(testbed):
    """Directories of earlier runs whose pytest and dockerd are both gone."""
    for parent in (testbed.user_home(), testbed.runtime_dir()):
        for name in os.listdir(parent):
            m = re.match(re.escape(PREFIX) + r"(\d+)$", name)
            if not m or os.path.exists("/proc/" + m.group(1)):
                continue
            pid_file = os.path.join(testbed.runtime_dir(), name, "docker.pid")
            try:
                with open(pid_file) as f:
                    if os.path.exists("/proc/" + f.read().strip()):
                        continue  # its dockerd still runs: `testbed.py down` stops it by pid
            except (OSError, ValueError):
                pass
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


@pytest.fixture(scope="module")
def b4ns(testbed):
    yield from rootless_docker.b4ns_daemon("podman")


@pytest.fixture(scope="module")
def dockerd(testbed, b4ns):
    testbed.ensure_docker()  # docker.io and rootlesskit, on first use
    remove_stale_runs(testbed)
    # The busybox root filesystem of the test bed, imported (never pulled).
    yield from rootless_docker.run_dockerd(lambda: Dockerd(testbed, b4ns.socket), testbed.ROOTFS,
                                           "b4ns-busybox:%d" % os.getpid())


@pytest.fixture
def http(testbed, server, tmp_path):
    """(port, body) of a file served by python3 -m http.server at 198.18.0.1."""
    return serve_file(testbed, server, tmp_path, testbed.HOST_IP4, "b4ns-docker-")


def version_tuple(version):
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2])


@pytest.mark.parametrize("base", ["podman", "none"])
def test_wrapper_makes_the_bypass_work_under_rootless_docker(testbed, b4ns, dockerd, http, base):
    assert_fetch_bypassed(testbed, b4ns, dockerd, http, b4ns.profiles[base], RUNTIME_NAME)


@pytest.mark.parametrize("base", ["podman", "none"])
def test_without_the_wrapper_docker_drops_the_listener_and_runc_refuses(testbed, b4ns, dockerd, base):
    if version_tuple(dockerd.version) >= (23, 0):
        pytest.skip("Docker %s: only 20.10's handling of listenerPath was observed" % dockerd.version)
    res = docker_run(dockerd, ["echo", "started"], profile=b4ns.profiles[base])
    assert res.returncode == 125 and "started" not in res.stdout
    assert NOT_SET in res.stderr, res.stderr


def test_wrapper_leaves_containers_without_the_profile_alone(testbed, b4ns, dockerd, http):
    """Docker's own default profile traps nothing: the wrapper changes nothing
    and the connection goes through Docker's bridge and slirp4netns."""
    assert_fetch_left_alone(testbed, b4ns, dockerd, http, RUNTIME_NAME)


def test_docker_exec_is_bypassed_too(testbed, b4ns, dockerd, http):
    port, body = http
    res, removed = exec_fetch(testbed, dockerd, port, b4ns.profiles["podman"], RUNTIME_NAME)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["sockname"] == testbed.HOST_IP4
    assert ("198.18.0.1:%d" % port, "bypassed") in b4ns.decisions()
    assert removed.returncode == 0, removed.stderr


def test_merged_profile_denies_what_dockers_default_denies(testbed, b4ns, dockerd):
    """Merged into podman's default profile, the trap keeps Docker's denials
    (Docker 20.10 drops defaultErrnoRet, so both answer EPERM); the
    allow-all profile (--base none) gives them away."""
    results = probe_denials(dockerd, b4ns.profiles["podman"], b4ns.profiles["none"], RUNTIME_NAME)
    assert results["merged"] == results["docker"]
    assert set(results["docker"].values()) == {"EPERM"}, results
    for name, denied in results["docker"].items():
        assert results["allow-all"][name] != denied, name
