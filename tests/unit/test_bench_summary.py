"""The benchmark's summary of the daemon's memory: pure arithmetic over recorded samples."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import bench  # noqa: E402


def recorded(rounds):
    """raw results of one configuration: rounds[i] lists (workload, RSS KiB after exit, connections so far)."""
    raw = {workload: {"bypass": []} for workload in bench.CONNECT_WORKLOADS}
    for rnd, samples in enumerate(rounds):
        for workload, rss, made in samples:
            raw[workload]["bypass"].append({"round": rnd, "daemon": {
                "rss_kib_after_exit": rss, "connections_made_so_far": made, "hwm_kib": rss,
                "cpu_s_per_1000": 0.1, "cores": 1.0, "rss_kib_window_end": rss}})
    return raw


@pytest.mark.parametrize("rounds, first_kib, last_kib, made, growth", [
    # One round: from its first sample.  The storm warms the other workers up: counted.
    ([[("connect", 1000, 10000), ("crowd1", 2000, 20000)]], 1000, 2000, 10000, 100.0),
    # Several: from the end of the first round, once every worker has served.
    ([[("connect", 1000, 10000), ("crowd1", 2000, 20000)],
      [("connect", 2000, 30000), ("crowd1", 2002, 40000)],
      [("connect", 2002, 50000), ("crowd1", 2004, 60000)]], 2000, 2004, 40000, 0.1),
])
def test_memory_growth_is_counted_from_the_end_of_the_first_round(rounds, first_kib, last_kib, made, growth):
    summary = bench.daemon_summary(recorded(rounds), "bypass")
    assert summary["rss_first_mib"]["median"] == first_kib / 1024
    assert summary["rss_last_mib"]["median"] == last_kib / 1024
    assert summary["made_between"]["median"] == made
    assert summary["rss_growth_kib_per_1000"]["median"] == pytest.approx(growth)
