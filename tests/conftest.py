"""Shared pytest setup: the test bed fixture and the no-skip switch.

Unit tests (tests/unit) use neither the test bed nor root; only tests that
ask for the `testbed` fixture need them.
"""

import os

import pytest

import testbed as tb

# In CI (CI=true) or with B4NS_NO_SKIP=1 a skip is a failure, so a green run
# means every test really ran.
NO_SKIP = (os.environ.get("CI", "").lower() == "true"
           or os.environ.get("B4NS_NO_SKIP") == "1")


def _skip_to_failure(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) \
            else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = ("skip turned into a failure (CI=true or "
                           "B4NS_NO_SKIP=1): " + reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if NO_SKIP:
        _skip_to_failure(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    if NO_SKIP:
        _skip_to_failure(outcome.get_result())


@pytest.fixture(scope="session")
def testbed():
    """The test bed, brought up (idempotently) once per session."""
    if os.geteuid() != 0:
        pytest.skip("the test bed needs root (run: sudo ./tests/run)")
    tb.up()
    return tb


@pytest.fixture
def server(testbed):
    """start(argv, **kw) -> Popen via testbed.start_server, stopped at teardown."""
    procs = []

    def start(argv, **kwargs):
        proc = testbed.start_server(argv, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        testbed.stop_server(proc)


ACCEPT_AND_CLOSE = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4096)
while True:
    s.accept()[0].close()
"""


@pytest.fixture
def acceptor(testbed, server):
    """The port of a server in the test namespace that accepts connections and closes them."""
    port = testbed.free_port(testbed.HOST_IP4)
    server(["python3", "-c", ACCEPT_AND_CLOSE, testbed.HOST_IP4, str(port)])
    testbed.wait_port(testbed.HOST_IP4, port)
    return port
