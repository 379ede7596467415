"""The benchmark (tests/bench.py) in its quick mode, end to end, so that it never rots.

Every configuration (host, slirp4netns, pasta, bypass4netns.py, and a peer:
bypass4netns.py itself through --peer) runs every workload once, and each
daemon's syscalls are counted once; the test checks that each produced a
number and that results.json, results.md and chart.png are there and well
formed.  No performance threshold: the numbers of a shared machine are not a
test.
"""

import json
import math
import pathlib
import platform
import struct
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ["host", "slirp4netns", "pasta", "bypass", "peer"]


def png_size(path):
    """(width, height) of a PNG file, from its IHDR chunk; raises on anything else."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_quick_benchmark_runs_every_configuration_and_writes_its_outputs(testbed, tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "bench.py"), "--quick", "--out", str(out),
                             "--peer", str(ROOT / "bypass4netns.py")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["rounds"] == 1
    assert [c["key"] for c in results["configs"]] == CONFIGS
    info = results["machine"]
    assert info["kernel"] == platform.release() and info["cpu"] and info["date"]
    assert all(math.isfinite(n) for n in numbers(results)), "NaN or infinity in results.json"

    failures, not_applicable = [], set()
    for workload, per_config in results["raw"].items():
        for key in CONFIGS:
            runs = per_config[key]
            assert len(runs) == 1, (workload, key, runs)
            if runs[0].get("not_applicable"):  # by design: a row of podman containers only, say
                not_applicable.add((workload, key))
            elif "error" in runs[0] or "warning" in runs[0]:
                failures.append((workload, key, runs[0].get("error") or runs[0]["warning"]))
    assert not failures, failures
    assert {workload for workload, _key in not_applicable} <= {"php_pub"}, not_applicable

    summary = results["summary"]
    for row_key, row in summary.items():
        if row_key == "daemon":
            continue
        for key in CONFIGS:
            entry = row["configs"][key]
            if (row_key, key) in not_applicable:
                assert entry["median"] is None, (row_key, key, entry)
                continue
            assert entry["median"] is not None and entry["median"] >= 0, (row_key, key, entry)
            assert entry.get("vs_host", entry.get("vs_base")) > 0, (row_key, key, entry)
        if (row_key, "host") not in not_applicable and "vs_host" in row["configs"]["host"]:
            assert row["configs"]["host"]["vs_host"] == 1.0
    for key in ("bypass", "peer"):
        daemon = summary["daemon"][key]
        assert daemon["connect.cpu_s_per_1000"]["median"] >= 0
        assert daemon["hwm_mib"]["median"] > 1
        assert daemon["made_between"]["median"] > 0
        counted = results["syscalls"][key]
        assert "error" not in counted, counted
        assert counted["connections"] + counted["errors"] == results["durations"]["syscalls_n"], counted
        assert counted["value"] > 0 and 0 < len(counted["top5"]) <= 5, counted

    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| workload |"))
    assert [cell.strip() for cell in header.strip("|").split("|")][2:] == [c["label"] for c in results["configs"]]
    table = [line for line in md.splitlines() if line.startswith("| ") and " | " in line]
    for row_key, row in summary.items():
        if "label" in row:
            line = next((t for t in table if t.startswith("| %s |" % row["label"])), None)
            assert line, "no row for %s in results.md" % row["label"]
            assert line.count("n/a") == sum(workload == row_key for workload, _key in not_applicable), line
    assert info["kernel"] in md and info["cpu"] in md and info["date"] in md
    assert "## Daemon cost" in md and "## Targets (issues 6 and 9)" in md
    for label in ("| syscalls per connect", "| top 5 syscalls"):
        line = next((t for t in table if t.startswith(label)), None)
        assert line and "n/a" not in line, "no %s row in results.md: %s" % (label, line)

    width, height = png_size(out / "chart.png")
    assert width >= 600 and height >= 400
