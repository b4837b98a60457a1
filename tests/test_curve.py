"""CURVE over real tcp sockets on 127.0.0.1 (free ports): encryption plus the clients/ allow-list.

Each test's server side gets its own context (so its ZAP authenticator is its own) and the clients
another, as separate processes would have.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from streamer.cli import main
from streamer.publish import EventPublisher, EventSubscriber, Heartbeat, StreamStatus, print_events
from streamer.sockets import (
    ClientKeys,
    ServerKeys,
    SocketDefaults,
    SocketKind,
    bound_endpoint,
    client_files,
    generate_keys,
    has_authenticator,
    make_socket,
    server_files,
    stop_authenticators,
)

ANY_PORT = "tcp://127.0.0.1:*"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """A server folder allowing "allowed", and a stranger's folder whose client key the server never lists."""
    root = tmp_path_factory.mktemp("curve")
    generate_keys(root / "server", ["allowed"])
    generate_keys(root / "elsewhere", ["stranger"])
    return {"server": root / "server", "elsewhere": root / "elsewhere"}


def client(keys: dict[str, Path], folder: str, name: str) -> ClientKeys:
    """Client keys trusting our server, with the client pair taken from `folder`."""
    return ClientKeys.load(client_files(keys[folder], name)[1], server_files(keys["server"])[0])


@pytest.fixture()
def contexts():
    server, clients = zmq.Context(), zmq.Context()
    yield server, clients
    stop_authenticators(server)
    server.destroy(linger=0)
    clients.destroy(linger=0)


def connect_and_watch(socket: zmq.Socket, endpoint: str, wanted: int | set[int],
                      send: list[bytes] | None = None) -> set[int]:
    """Connect `socket`, queue `send` on it, and read its monitor events until one of `wanted` shows up (10 s
    at most); returns every event seen."""
    wanted = {wanted} if isinstance(wanted, int) else wanted
    monitor = socket.get_monitor_socket()  # before connect, so no event is missed
    seen: set[int] = set()
    try:
        socket.connect(endpoint)
        if send is not None:
            socket.send_multipart(send, zmq.NOBLOCK)  # queued on the connecting pipe until a handshake succeeds
        timeout_s = 10
        deadline = time.monotonic() + timeout_s
        while not wanted & seen and time.monotonic() < deadline:
            if monitor.poll(100):
                seen.add(recv_monitor_message(monitor)["event"])
    finally:
        socket.disable_monitor()
        monitor.close(linger=0)
    return seen


def test_curve_pub_sub_lets_only_listed_subscribers_in(keys, contexts):
    server_context, client_context = contexts
    with EventPublisher(ANY_PORT, context=server_context, keys=ServerKeys.load(keys["server"])) as publisher, \
            EventSubscriber(publisher.endpoint, context=client_context, keys=client(keys, "server", "allowed"),
                            timeout_ms=100) as allowed, \
            EventSubscriber(publisher.endpoint, context=client_context, timeout_ms=0) as keyless, \
            EventSubscriber(publisher.endpoint, context=client_context, keys=client(keys, "elsewhere", "stranger"),
                            timeout_ms=0) as stranger:
        assert publisher.encrypted and allowed.encrypted
        event = StreamStatus(stream="cam1", status="connected")
        deadline = time.monotonic() + 10
        while allowed.received == 0:  # slow joiner: publish until the listed subscriber is in
            assert time.monotonic() < deadline, "the listed subscriber never got an event"
            publisher.publish(event)
            allowed.receive(20)
        # Keep going well past the time a localhost handshake takes; the listed one keeps receiving.
        first_seq = allowed.last_seq
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            publisher.publish(event)
            allowed.receive(5)
            keyless.receive(0)
            stranger.receive(0)
        while allowed.receive(200) is not None:
            pass
        assert allowed.last_seq == publisher.seq and allowed.last_seq > first_seq + 50
        assert allowed.gaps == 0
        assert keyless.received == 0 and keyless.invalid == 0
        assert stranger.received == 0 and stranger.invalid == 0


def test_print_events_and_cli_subscribe_with_keys(keys, contexts, capfd):
    server_context, _ = contexts
    server_public, _ = server_files(keys["server"])
    _, client_secret = client_files(keys["server"], "allowed")
    with EventPublisher(ANY_PORT, context=server_context, keys=keys["server"]) as publisher:  # a folder works too
        results: list[int] = []
        out = io.StringIO()
        printers = [
            threading.Thread(target=lambda: results.append(print_events(
                publisher.endpoint, ["heartbeat."], out=out, count=3, timeout=10,
                keys=ClientKeys.load(client_secret, server_public)))),
            threading.Thread(target=lambda: results.append(main([
                "subscribe", publisher.endpoint, "--topic", "heartbeat.", "--count", "3", "--timeout", "10",
                "--server-key", str(server_public), "--client-key", str(client_secret)]))),
        ]
        for printer in printers:
            printer.start()
        while any(p.is_alive() for p in printers):
            publisher.publish(Heartbeat(streams={}, queues={}, uptime=1.0))
            time.sleep(0.005)
    assert sorted(results) == [0, 3]  # print_events returns the count, the CLI its exit code
    assert len(out.getvalue().splitlines()) == 3
    captured = capfd.readouterr()
    assert [line.split(" ", 1)[0] for line in captured.out.splitlines()] == ["heartbeat.*"] * 3


def test_curve_dealer_router_and_unlisted_dealers_never_reach_the_router(keys, contexts):
    server_context, client_context = contexts
    router = make_socket(server_context, SocketKind.ROUTER, hwm=SocketDefaults.RESULT_HWM, bind=ANY_PORT,
                         max_message_bytes=SocketDefaults.MAX_MESSAGE_BYTES,
                         server_keys=ServerKeys.load(keys["server"], "inference.keys"), setting="inference.bind")
    endpoint = bound_endpoint(router)
    dealers = []
    try:
        stranger = make_socket(client_context, SocketKind.DEALER, hwm=10,
                               client_keys=client(keys, "elsewhere", "stranger"), setting="inference.endpoint")
        keyless = make_socket(client_context, SocketKind.DEALER, hwm=10)
        dealers += [stranger, keyless]
        # A keyless (NULL mechanism) dealer is refused at the greeting: libzmq reports that as a protocol
        # failure when the server's ERROR command arrives first, and without detail when the server's close
        # does (CI saw both). Either way the handshake must fail and never succeed.
        for socket, failures in [(stranger, {zmq.EVENT_HANDSHAKE_FAILED_AUTH}),
                                 (keyless, {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL})]:
            seen = connect_and_watch(socket, endpoint, failures, send=[b"request", b"from an unlisted dealer"])
            assert failures & seen, f"expected the server to refuse the handshake, saw {seen}"
            assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in seen

        allowed = make_socket(client_context, SocketKind.DEALER, hwm=10, connect=endpoint,
                              client_keys=client(keys, "server", "allowed"), setting="inference.endpoint")
        dealers.append(allowed)
        received = []
        for i in range(20):
            allowed.send_multipart([b"request", str(i).encode()])
            assert router.poll(5000), "the listed dealer's request never arrived"
            identity, *frames = router.recv_multipart()
            received.append(frames)
            router.send_multipart([identity, b"result", frames[1]])
            assert allowed.poll(5000) and allowed.recv_multipart() == [b"result", str(i).encode()]
        assert received == [[b"request", str(i).encode()] for i in range(20)]
        assert not router.poll(500), "a message from an unlisted dealer reached the router"
    finally:
        for socket in dealers:
            socket.close(linger=0)
        router.close(linger=0)


def test_max_message_size_drops_oversized_frames_before_the_application(keys, contexts):
    server_context, client_context = contexts
    router = make_socket(server_context, SocketKind.ROUTER, hwm=10, bind=ANY_PORT, max_message_bytes=1024)
    dealer = make_socket(client_context, SocketKind.DEALER, hwm=10, connect=bound_endpoint(router))
    try:
        dealer.send(b"x" * 100)
        assert router.poll(5000) and router.recv_multipart()[1] == b"x" * 100
        dealer.send(b"y" * 4096)
        assert not router.poll(500)
    finally:
        dealer.close(linger=0)
        router.close(linger=0)


def test_two_servers_on_one_context_keep_their_own_allow_lists(keys, tmp_path, contexts):
    server_context, client_context = contexts
    generate_keys(tmp_path / "second", ["only-here"])
    first = make_socket(server_context, SocketKind.ROUTER, hwm=10, bind=ANY_PORT,
                        server_keys=ServerKeys.load(keys["server"]))
    second = make_socket(server_context, SocketKind.ROUTER, hwm=10, bind=ANY_PORT,
                         server_keys=ServerKeys.load(tmp_path / "second"))
    # "allowed" is listed for the first server only; it trusts the second server's key but is not on its list.
    second_public = server_files(tmp_path / "second")[0]
    allowed_secret = client_files(keys["server"], "allowed")[1]
    to_first = make_socket(client_context, SocketKind.DEALER, hwm=10, connect=bound_endpoint(first),
                           client_keys=ClientKeys.load(allowed_secret, server_files(keys["server"])[0]))
    to_second = make_socket(client_context, SocketKind.DEALER, hwm=10,
                            client_keys=ClientKeys.load(allowed_secret, second_public))
    try:
        to_first.send(b"hello first")
        assert first.poll(5000) and first.recv_multipart()[1] == b"hello first"
        seen = connect_and_watch(to_second, bound_endpoint(second), zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                                 send=[b"hello second"])
        assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in seen and zmq.EVENT_HANDSHAKE_SUCCEEDED not in seen
        assert not second.poll(300)
    finally:
        for socket in (to_first, to_second, first, second):
            socket.close(linger=0)


def test_stopped_authenticator_fails_closed_and_term_does_not_hang(keys):
    server_context, client_context = zmq.Context(), zmq.Context()
    router = make_socket(server_context, SocketKind.ROUTER, hwm=10, bind=ANY_PORT,
                         server_keys=ServerKeys.load(keys["server"]))
    assert has_authenticator(server_context)
    stop_authenticators(server_context)
    assert not has_authenticator(server_context)
    # Even the listed client is refused now: without its ZAP handler the server admits nobody.
    dealer = make_socket(client_context, SocketKind.DEALER, hwm=10, connect=bound_endpoint(router),
                         client_keys=client(keys, "server", "allowed"))
    dealer.send(b"anyone there?")
    assert not router.poll(1000)
    dealer.close()
    router.close()
    stop_authenticators(server_context)  # a second stop is harmless
    closer = threading.Thread(target=lambda: (server_context.term(), client_context.term()))
    closer.start()
    closer.join(5)
    assert not closer.is_alive(), "context.term() hung"
