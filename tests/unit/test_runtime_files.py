"""The two runtime files keep their promises: stdlib only, Python 3.9, runnable from a pipe."""

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNTIME_FILES = ["bypass4netns.py", "seccomp-gen.py"]


@pytest.mark.parametrize("name", RUNTIME_FILES)
def test_imports_only_the_standard_library(name):
    tree = ast.parse((ROOT / name).read_text(), name)
    stdlib = set(sys.stdlib_module_names) | {"__future__", "bypass4netns"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        else:
            continue
        for module in modules:
            assert module.split(".")[0] in stdlib, "%s imports %s" % (name, module)


@pytest.mark.parametrize("name", RUNTIME_FILES)
def test_compatible_with_python_3_9(name):
    vermin = shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (tests/run installs it)")
    result = subprocess.run([vermin, "-t=3.9-", "--no-tips", "--violations", str(ROOT / name)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name,args", [("bypass4netns.py", ["--version"]), ("seccomp-gen.py", ["--help"])])
def test_runs_from_a_pipe_in_an_empty_directory(name, args, tmp_path):
    """`curl ... | python3 - ARGS`: no __file__, no neighbour file."""
    result = subprocess.run([sys.executable, "-", *args], input=(ROOT / name).read_bytes(), cwd=tmp_path,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout


def test_importing_the_daemon_has_no_side_effects(tmp_path):
    code = "import sys; sys.path.insert(0, %r); import bypass4netns; print(bypass4netns.__version__)" % str(ROOT)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() and not result.stderr
