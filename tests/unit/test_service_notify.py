"""sd_notify READY=1 over $NOTIFY_SOCKET, to a real unix datagram socket."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from mxrules.service import notify_ready


@pytest.fixture
def receiver(tmp_path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.setblocking(False)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"mxrules-test-{uuid.uuid4().hex}"
    sock.bind("\0" + name)
    sock.setblocking(False)
    yield sock, "@" + name
    sock.close()


@pytest.mark.parametrize("fixture", [pytest.param("receiver", id="path"),
                                     pytest.param("abstract_receiver", id="abstract")])
def test_ready_is_one_datagram(request, monkeypatch, fixture: str) -> None:
    sock, address = request.getfixturevalue(fixture)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notify_ready()
    assert sock.recv(4096) == b"READY=1"
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_nothing_without_notify_socket(monkeypatch, receiver) -> None:
    sock, _ = receiver
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify_ready()
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_an_unreachable_socket_is_logged_not_raised(monkeypatch, tmp_path, caplog) -> None:
    missing = str(tmp_path / "gone")
    monkeypatch.setenv("NOTIFY_SOCKET", missing)
    with caplog.at_level(logging.ERROR):
        notify_ready()
    assert not os.path.exists(missing)
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot tell systemd the service is ready (NOTIFY_SOCKET={missing}): "
        "[Errno 2] No such file or directory"]
