"""The keeper's side of bypass4netns.py with real sockets and fds, no root needed: the state
wire format (hand-over and keeper link), what the keeper holds as the daemon's snapshots change,
and systemd's notify socket."""

import os
import socket

import pytest

from . import load

b4ns = load("bypass4netns.py", "bypass4netns")


def same_file(fd_a, fd_b):
    a, b = os.fstat(fd_a), os.fstat(fd_b)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@pytest.fixture
def link():
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for end in pair:
        end.settimeout(10)
    yield pair
    for end in pair:
        end.close()


@pytest.fixture
def pipes():
    """Pipes whose read ends stand for a daemon's fds."""
    made = []

    def make(count):
        for _ in range(count):
            made.append(os.pipe())
        return [r for r, _w in made[-count:]]
    yield make
    for r, w in made:
        for fd in (r, w):
            try:
                os.close(fd)
            except OSError:
                pass


def test_state_and_more_fds_than_one_message_carries(link, pipes):
    sender, receiver = link
    fds = pipes(b4ns.FDS_PER_MESSAGE * 2 + 3)
    b4ns.send_state(sender, {"filters": list(range(len(fds)))}, fds)
    state, received = b4ns.receive_state(receiver, "the test")
    try:
        assert state["filters"] == list(range(len(fds))) and state["fd_count"] == len(fds)
        assert len(received) == len(fds) and all(same_file(a, b) for a, b in zip(fds, received))
    finally:
        for fd in received:
            os.close(fd)


def test_end_of_file_before_a_state_is_none_and_within_one_an_error(link):
    sender, receiver = link
    sender.sendall(b4ns._U32.pack(100) + b"{")
    sender.shutdown(socket.SHUT_WR)
    with pytest.raises(b4ns.Error, match="the test broke off"):
        b4ns.receive_state(receiver, "the test")
    other, end = socket.socketpair()
    other.close()
    with end:
        assert b4ns.receive_state(end, "the test") is None


def fresh_keeper():
    return b4ns.Keeper([], 1, None, None)


def snapshot(listeners=(), filters=()):
    """A HandOver.snapshot()'s shape, with idents for fds as the keeper link sends it."""
    return {"listeners": [{"fd": ident, "path": "/x", "api": False, "bypass": None} for ident in listeners],
            "filters": [{"fd": ident, "cid": "c", "pid": 1, "metadata": None} for ident in filters],
            "containers": {}, "claims": []}


def send(sender, state, new, fds):
    b4ns.send_state(sender, dict(state, new=new), fds)


def test_the_keeper_holds_what_the_daemon_names_and_closes_the_rest(link, pipes):
    sender, receiver = link
    keeper = fresh_keeper()
    keeper.link = receiver
    try:
        listener, first, second = pipes(3)
        send(sender, snapshot(["s1"], ["f1"]), ["s1", "f1"], [listener, first])
        keeper.on_link()
        assert sorted(keeper.held) == ["f1", "s1"] and same_file(keeper.held["f1"], first)
        held_listener = keeper.held["s1"]

        # A container comes: only its fd is sent; another goes: its duplicate is closed.
        send(sender, snapshot(["s1"], ["f1", "f2"]), ["f2"], [second])
        keeper.on_link()
        assert keeper.held["s1"] == held_listener and same_file(keeper.held["f2"], second)
        gone = keeper.held["f1"]
        send(sender, snapshot(["s1"], ["f2"]), [], [])
        keeper.on_link()
        assert sorted(keeper.held) == ["f2", "s1"]
        with pytest.raises(OSError):
            os.fstat(gone)

        # A new daemon after a crash sends everything anew, idents of its own that may
        # repeat the last one's: what it names replaces what the keeper held.
        replaced = keeper.held["f2"]
        send(sender, snapshot(["s1"], ["f2"]), ["s1", "f2"], [listener, first])
        keeper.on_link()
        assert same_file(keeper.held["f2"], first)
        with pytest.raises(OSError):
            os.fstat(replaced)
        assert keeper.state["filters"][0]["fd"] == "f2" and "new" not in keeper.state
    finally:
        keeper.link = None  # the fixture closes it
        keeper.close()


def test_the_keeper_leaves_nothing_held_once_the_daemon_names_nothing(link, pipes):
    sender, receiver = link
    keeper = fresh_keeper()
    keeper.link = receiver
    try:
        send(sender, snapshot(["s1"], ["f1"]), ["s1", "f1"], pipes(2))
        keeper.on_link()
        held = list(keeper.held.values())
        send(sender, snapshot(), [], [])
        keeper.on_link()
        assert keeper.held == {}
        for fd in held:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        keeper.link = None
        keeper.close()


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_sends_to_the_socket_systemd_names(tmp_path, monkeypatch, abstract):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        if abstract:
            name = "b4ns-test-%d" % os.getpid()
            systemd.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            systemd.bind(str(tmp_path / "notify"))
            monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        systemd.settimeout(10)
        b4ns.sd_notify("READY=1\nMAINPID=42")
        assert systemd.recv(100) == b"READY=1\nMAINPID=42"
    monkeypatch.delenv("NOTIFY_SOCKET")
    b4ns.sd_notify("READY=1")  # outside systemd: nothing, no error


def test_what_a_dead_worker_left_is_answered_or_handled_anew_once():
    """What the keeper and the daemon do for a dead worker: the calls under way in its loop or
    with its helpers get EINTR (never CONTINUE); the notification RECV last wrote into its row
    (the call it was handling, or had just taken) goes to a live server to handle anew; the row
    is free afterwards."""
    table = b4ns.InflightTable(2)
    inflight = table.writer(1)
    slot = inflight.add_pending(7, 1002)
    helper_slot = inflight.add_pending(8, 1003)
    inflight.end_pending(slot)              # answered
    inflight.cells[b4ns.InflightTable.RECEIVING] = 9
    notif = b4ns._NOTIF.pack(1004, 4242, 0, 42, b4ns.AUDIT_ARCH_X86_64, 0, 3, 0, 16, 0, 0, 0)
    inflight.notif_view[:] = notif          # what RECV wrote
    inflight.begin(9, 1004)
    assert helper_slot and table.orphans(0) == ([], [])
    assert table.orphans(1) == ([(8, 1003)], [(9, notif)])
    assert table.orphans(1) == ([], [])
