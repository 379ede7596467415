"""The benchmark's summaries: pure arithmetic over recorded samples (memory, ports, ratios, run length)."""

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


def test_node_cpu_per_connect_is_the_median_of_its_runs_and_left_out_of_the_memory_samples():
    raw = recorded([[("connect", 1000, 10000)], [("connect", 1000, 20000)]])
    raw["node"] = {"bypass": [{"round": 0, "value": 2000.0, "daemon_cpu_s_per_1000": 0.2},
                              {"round": 1, "value": 2100.0, "daemon_cpu_s_per_1000": 0.3},
                              {"round": 2, "error": "node: no output"}]}
    summary = bench.daemon_summary(raw, "bypass")
    assert summary["node.cpu_s_per_1000"] == {"median": 0.25, "max": 0.3}
    assert summary["rss_samples_kib"] == [1000, 1000]
    assert "node.cpu_s_per_1000" not in bench.daemon_summary(recorded([[("connect", 1, 1)]]), "bypass")


# -- server ports: no port takes more than bench.PORT_LIMIT connections a minute ----------------------

@pytest.mark.parametrize("seconds", [0.001, 1, 3, 5, 10, 20])
def test_a_connect_loop_gets_ports_enough_for_the_rate_cap(seconds):
    ports = bench.ports_needed(seconds)
    assert ports >= 1
    assert bench.RATE_CAP * seconds / ports <= bench.PER_PORT <= bench.PORT_LIMIT


def test_ab_chunks_get_ports_enough_for_their_rate_cap():
    assert bench.ports_needed(3, bench.AB_RATE_CAP, bench.AB_CHUNK) * bench.AB_CHUNK >= 3 * bench.AB_RATE_CAP


class FakeClock:
    def __init__(self):
        self.now, self.slept = 1000.0, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def test_port_ring_hands_out_fresh_runs_and_waits_before_coming_round_again():
    clock = FakeClock()
    ring = bench.PortRing(20000, 10, reuse_after=65, clock=clock, sleep=clock.sleep)
    assert ring.take(4, 3) == (20000, 20003)
    assert ring.take(4, 3) == (20004, 20007)
    clock.now += 1
    # 2 ports left at the end: a run is never split, the ring starts over, and waits for the first run's
    # ports: 3 s of measurement + 65 s since it was handed out at 1000, now 1001.
    assert ring.take(3, 1) == (20000, 20002)
    assert clock.slept == [pytest.approx(67.0)]
    clock.now += 100
    assert ring.take(50, 1) == (20000, 20009)  # at most the whole ring
    assert len(clock.slept) == 1


# -- ab in chunks, one port each --------------------------------------------------------------------

AB_REPORT = """Complete requests:      %d
Failed requests:        %d
Time taken for tests:   %s seconds
Requests per second:    1.0 [#/sec] (mean)
"""


def test_ab_chunks_add_up_to_one_rate():
    out = AB_REPORT % (10000, 0, "0.500") + AB_REPORT % (3000, 2, "0.250")
    totals = bench.ab_totals(out)
    assert totals["requests"] == 13000 and totals["failed"] == 2 and totals["chunks"] == 2
    assert totals["value"] == pytest.approx(13000 / 0.75)
    assert totals["most_to_one_port"] == 10000


def test_ab_without_a_report_is_a_failure():
    with pytest.raises(bench.Failed):
        bench.ab_totals("apr_socket_connect(): Connection refused (111)")


# -- rows against no profile, the run-length check, the floor ---------------------------------------

def results_of(rows):
    """results with raw numbers: rows maps workload -> {config: [values]}."""
    configs = sorted({c for per in rows.values() for c in per})
    raw = {w: {c: [{"round": i, "value": v} for i, v in enumerate(per.get(c, []))] for c in configs}
           for w, per in rows.items()}
    return {"configs": [{"key": c, "label": c, "daemon": c in ("bypass", "floor")} for c in configs], "raw": raw}


def test_rows_with_a_base_are_compared_with_no_profile():
    summary = bench.summarize(results_of({
        "unix1": {"host": [100.0], "slirp4netns": [80.0], "bypass": [40.0]},
        "sendto": {"host": [1000.0], "slirp4netns": [1000.0], "bypass": [1250.0]}}))
    unix = summary["unix1"]
    assert unix["base"] == "slirp4netns"
    assert unix["configs"]["bypass"]["vs_base"] == pytest.approx(0.5)
    assert unix["configs"]["bypass"]["vs_host"] == pytest.approx(0.4)
    assert unix["configs"]["slirp4netns"]["vs_base"] == 1.0
    # A time: lower is better, so the ratio is base / this.
    assert summary["sendto"]["configs"]["bypass"]["vs_base"] == pytest.approx(0.8)
    assert "connect" not in summary  # rows of workloads not run are left out


def test_run_length_holds_unless_the_long_run_falls():
    summary = bench.summarize(results_of({
        "runlen_short": {"host": [100.0, 110.0, 90.0], "pasta": [100.0], "bypass": [100.0]},
        "runlen_long": {"host": [100.0, 120.0, 95.0], "pasta": [50.0], "bypass": []}}))
    checked = bench.run_length(summary)
    assert checked["host"] == {"short": 100.0, "long": 100.0, "ratio": 1.0, "late_over_early": None,
                               "holds": True}
    assert checked["pasta"]["ratio"] == 0.5 and checked["pasta"]["holds"] is False
    assert checked["bypass"]["holds"] is None and checked["bypass"]["ratio"] is None
    assert bench.run_length(bench.summarize(results_of({"connect": {"host": [1.0]}}))) == {}


def test_a_slower_long_run_that_is_steady_within_itself_holds():
    results = results_of({"runlen_short": {"slirp4netns": [100.0], "pasta": [100.0]},
                          "runlen_long": {"slirp4netns": [80.0], "pasta": [80.0]}})
    results["raw"]["runlen_long"]["slirp4netns"][0]["per_second"] = [20, 80, 81, 79, 80]  # steady: load
    results["raw"]["runlen_long"]["pasta"][0]["per_second"] = [50, 100, 90, 70, 60]  # decays: the run's length
    checked = bench.run_length(bench.summarize(results))
    assert checked["slirp4netns"]["late_over_early"] == pytest.approx(79.5 / 80.5)
    assert checked["slirp4netns"]["holds"] is True
    assert checked["pasta"]["late_over_early"] == pytest.approx(65 / 95) and checked["pasta"]["holds"] is False


@pytest.mark.parametrize("per_second, ratio", [
    ([], None), ([5, 10], None),  # under 3 seconds: none
    ([1, 10, 20], 2.0),  # the first second is left out
    ([1, 10, 10, 20, 20, 20], 2.0),  # halves of 5 seconds: 2 early, 3 late
    ([1, 0, 5], None),
])
def test_late_over_early(per_second, ratio):
    assert bench.late_over_early(per_second) == ratio


def test_clients_per_second_counts_add_up_over_whole_seconds():
    out = ["count 300 errors 0 elapsed_us 2500000 sum_us 3000 errno 0\nhist 10:300\npersec 100 150 50\n",
           "count 200 errors 0 elapsed_us 2400000 sum_us 2000 errno 0\nhist 10:200\npersec 90 80 30\n"]
    merged = bench.merge_clients(out)
    assert merged["per_second"] == [190, 230]  # the third, partial second left out
    assert merged["connections"] == 500 and merged["value"] == pytest.approx(200.0)
    # A client of before (no persec line) still parses.
    assert bench.merge_clients([out[0].split("\npersec")[0] + "\n"])["per_second"] == []


def test_floor_ratios_take_rates_and_cpu_per_connect_where_both_have_them():
    summary = {
        "connect": {"label": "connect loop", "configs": {"bypass": {"median": 6000.0}, "floor": {"median": 8000.0}}},
        "ab1": {"label": "ab -c 1", "configs": {"bypass": {"median": 3000.0}, "floor": {"median": 3000.0}}},
        "crowd": {"label": "crowd", "configs": {"bypass": {"median": 5000.0}, "floor": {"median": None}}},
        "daemon": {"bypass": {"connect.cpu_s_per_1000": {"median": 0.1}},
                   "floor": {"connect.cpu_s_per_1000": {"median": 0.05}}},
    }
    rows = {r["workload"]: r for r in bench.floor_ratios(summary)}
    assert set(rows) == {"connect", "ab1"}  # crowd: no floor figure
    assert rows["connect"]["rate_ratio"] == pytest.approx(0.75)
    assert rows["connect"]["cpu_ratio"] == pytest.approx(2.0)
    assert rows["ab1"]["rate_ratio"] == 1.0 and rows["ab1"]["cpu_ratio"] is None


def for_markdown(results, **fields):
    """`results` (results_of) with what bench.markdown() reads besides the figures: one quick
    round, short durations, a machine of placeholders; `fields` added or overriding."""
    durations = {"iperf": 1, "ab": 1, "connect_ms": 1000, "redis_n": 1, "tar_passes": 1, "crowd": 20, "syscalls_n": 1,
                 "runlen_short_ms": 1000, "runlen_long_ms": 5000, "sendto_ms": 1, "getent_n": 1, "dig_n": 1,
                 "php_n": 1}
    machine = {k: "x" for k in ("date", "kernel", "cpu", "commit", "bypass4netns.py sha256", "loadavg_start",
                                "loadavg_end", "podman", "runc", "crun", "slirp4netns", "pasta", "iperf3", "nginx",
                                "redis-benchmark")}
    machine["cpus"] = 2
    results.update(quick=True, rounds=1, runtime="runc", durations=durations, machine=machine, peer=None, seconds=1.0)
    results.update(fields)


def test_results_md_has_the_run_length_and_floor_sections():
    results = results_of({
        "connect": {"host": [30000.0], "slirp4netns": [3000.0], "bypass": [6000.0], "floor": [8000.0]},
        "unix1": {"host": [60000.0], "slirp4netns": [50000.0], "bypass": [20000.0], "floor": [21000.0]},
        "runlen_short": {"host": [30000.0], "slirp4netns": [3000.0], "bypass": [6000.0], "floor": [8000.0]},
        "runlen_long": {"host": [29000.0], "slirp4netns": [2000.0], "bypass": [6100.0], "floor": [8000.0]}})
    results["raw"]["runlen_long"]["slirp4netns"][0]["per_second"] = [2500, 2400, 2000, 1500, 1400]
    for_markdown(results, floor="floor.py", command="sudo ./tests/bench")
    for c in results["configs"]:
        c["label"] = {"bypass": "bypass4netns.py"}.get(c["key"], c["key"])
    summary = results["summary"] = bench.summarize(results)
    results["run_length"] = bench.run_length(summary)
    results["vs_floor"] = bench.floor_ratios(summary)
    md = bench.markdown(results, summary).splitlines()
    assert "| long / short | 1.02 | 1.00 | 0.97 | 0.67 |" in md  # configs in key order: bypass floor host slirp
    figure = next(line for line in md if line.startswith("| the figure |"))
    assert figure == "| the figure | holds | holds | holds | **falls** |"
    row = next(line for line in md if line.startswith("| connect/close loop, static C client | 6,000"))
    assert row.endswith("| 0.75x | n/a | n/a | n/a |"), row  # no daemon CPU in these results: n/a
    unix = next(line for line in md if line.startswith("| unix connect/close loop") and "conn/s |" in line)
    assert "20,000 (0.40x)" in unix and "| 50,000 |" in unix  # ratio to no profile; the base without one


# -- podman 5: the pasta pair, the Debian 13 bed's tools, the Go tool's profile ------------------------

def test_podman5_rows_with_a_base_are_compared_with_podman5_without_the_profile():
    summary = bench.summarize(results_of({
        "unix1": {"host": [100.0], "slirp4netns": [80.0], "bypass": [40.0], "podman5": [90.0],
                  "podman5_bypass": [30.0]}}))
    unix = summary["unix1"]["configs"]
    assert unix["podman5_bypass"]["vs_base"] == pytest.approx(1 / 3)  # to podman5, not to slirp4netns
    assert unix["podman5_bypass"]["base"] == "podman5"
    assert unix["podman5"]["vs_base"] == 1.0 and unix["podman5"]["base"] == "podman5"
    assert unix["bypass"]["vs_base"] == pytest.approx(0.5) and "base" not in unix["bypass"]


def test_pair_ratios_give_the_daemons_trade_on_podman5():
    summary = bench.summarize(results_of({
        "connect": {"host": [30000.0], "podman5": [10000.0], "podman5_bypass": [5000.0]},
        "iperf1": {"host": [20.0], "podman5": [8.0], "podman5_bypass": [16.0]},
        "sendto": {"host": [1000.0], "podman5": [1000.0], "podman5_bypass": [1250.0]},
        "crowd1": {"host": [40000.0], "podman5": [12000.0], "podman5_bypass": []}}))
    summary["daemon"] = {"podman5_bypass": {}}
    rows = {r["row"]: r for r in bench.pair_ratios(summary)}
    assert rows["connect"]["speed"] == pytest.approx(0.5)  # the daemon halves connection setup
    assert rows["iperf1"]["speed"] == pytest.approx(2.0)
    assert rows["sendto"]["speed"] == pytest.approx(0.8)  # a time: podman5 / with the daemon
    assert (rows["connect"]["base"], rows["connect"]["with"]) == (10000.0, 5000.0)
    assert "crowd1" not in rows and "daemon" not in rows  # no figure with the daemon: left out


def test_results_md_has_the_podman5_section():
    results = results_of({"connect": {"host": [30000.0], "podman5": [10000.0], "podman5_bypass": [5000.0]}})
    for c in results["configs"]:
        c["label"] = {"podman5": "podman 5 + pasta", "podman5_bypass": "podman 5 + pasta + bypass4netns.py"}.get(
            c["key"], c["key"])
        c["daemon"] = c["key"] == "podman5_bypass"
    for_markdown(results, floor=None, command="sudo ./tests/bench --podman5",
                 bed13={"podman": "podman version 5.4.2", "crun": "crun version 1.21", "pasta": "passt 1",
                        "profile base": "/x/seccomp.json"})
    summary = results["summary"] = bench.summarize(results)
    results["podman5_pair"] = bench.pair_ratios(summary)
    md = bench.markdown(results, summary).splitlines()
    assert "## podman 5: pasta alone and with bypass4netns.py" in md
    assert "| connect/close loop, static C client | conn/s | 10,000 | 5,000 | 0.50x |" in md
    assert any(line.startswith("- podman 5 + pasta: ") and "podman version 5.4.2" in line for line in md)


def test_podman5_workloads_without_their_tools_are_not_applicable(tmp_path):
    cfg = bench.Podman5("podman5", "podman 5 + pasta")
    assert cfg.target == bench.ADDR_B  # pasta copies ADDR_A into the container
    root = str(tmp_path)
    assert "/usr/bin/ab" in cfg.unavailable("ab1", root)
    assert cfg.unavailable("connect", root) is None and cfg.unavailable("iperf1", root) is None
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "ab").touch()
    assert cfg.unavailable("ab8", root) is None  # installed there: it runs
    assert "/usr/sbin/nginx" in cfg.unavailable("php", root)
    assert "Debian 13 root's" in cfg.unavailable("tar", root)  # runs, but compares with nothing
    assert bench.NotRunning("peer", "peer", "no binary").unavailable("connect") == "no binary"


def test_the_go_tools_own_profile_traps_what_its_seccomp_json_sh_does():
    profile = bench.go_peer_profile("x86_64")
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    assert profile["architectures"][0] == "SCMP_ARCH_X86_64"
    assert profile["syscalls"] == [{"names": bench.GO_PEER_TRAPPED, "action": "SCMP_ACT_NOTIFY"}]
    assert {"connect", "bind", "getpeername"} <= set(bench.GO_PEER_TRAPPED)


def test_podman5_configs_imply_the_flag_and_the_peers_exclude_each_other():
    args = bench.parse_args(["--quick", "--configs", "pasta,podman5_bypass"])
    assert args.podman5 and args.configs == ["pasta", "podman5_bypass"]
    assert not bench.parse_args(["--quick"]).podman5
    with pytest.raises(SystemExit):
        bench.parse_args(["--peer-debian", "--peer", __file__])


def test_no_connection_setup_target_without_slirp4netns_or_pasta_to_be_ahead_of():
    """An A/B run (--configs bypass,peer) has no slirp4netns or pasta column: the targets
    table says nothing of being ahead of them, rather than "met" against nothing."""
    results = {"configs": [{"key": "host"}, {"key": "bypass"}, {"key": "peer"}]}
    summary = {"connect": {"configs": {"bypass": {"median": 4925.0}, "peer": {"median": 4818.0}}}, "daemon": {}}
    assert not [line for line in bench.targets(results, summary) if "ahead of slirp4netns" in line]
    results["configs"].append({"key": "slirp4netns"})
    summary["connect"]["configs"]["slirp4netns"] = {"median": 2907.0}
    assert [line for line in bench.targets(results, summary) if "ahead of slirp4netns" in line] == [
        "| connection setup ahead of slirp4netns and pasta, connect/close loop | 4,925 vs slirp4netns 2,907 | met |"]


def test_stage_report_sums_the_processes_and_divides_by_notifications(tmp_path):
    import json
    import stages
    # Two processes (a worker, a helper's parent): 3 notifications, one switch among them.
    (tmp_path / "stages-1.json").write_text(json.dumps({stages.ROOT_STAGE: [2, 200000],
                                                         "Switcher.switch": [1, 90000]}))
    (tmp_path / "stages-2.json").write_text(json.dumps({stages.ROOT_STAGE: [1, 100000],
                                                         "Switcher.switch": [0, 0]}))
    lines = stages.report(str(tmp_path)).splitlines()
    assert lines[0] == "3 notifications timed."
    assert "| %s | 1.00 | 100.00 | 100.00 |" % stages.ROOT_STAGE in lines
    assert "| Switcher.switch | 0.33 | 90.00 | 30.00 |" in lines
    assert stages.report(str(tmp_path / "none")).startswith("No notification")


def test_stage_names_are_the_daemons():
    """Every stage tests/stages.py times is still a function of bypass4netns.py: a renamed one would
    silently drop out of the profile."""
    import stages
    from unit import load
    module = load("bypass4netns.py", "bypass4netns")
    for name in stages.STAGES:
        owner_name, _, attribute = name.rpartition(".")
        owner = getattr(module, owner_name, None) if owner_name else module
        assert owner is not None and attribute in vars(owner), name
