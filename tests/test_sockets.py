"""streamer.sockets without traffic: endpoint rules, defaults, key files, settings checks and the CLI."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq

from streamer.cli import main
from streamer.config import InferenceSettings, load_settings
from streamer.errors import ConfigError
from streamer.publish import EventPublisher, ZmqDefaults
from streamer.sockets import (
    ClientKeys,
    ServerKeys,
    SocketDefaults,
    SocketKind,
    bound_endpoint,
    check_bind,
    client_files,
    generate_keys,
    is_loopback,
    make_socket,
    server_files,
)

LOOPBACK_ANY_PORT = "tcp://127.0.0.1:*"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("STREAMER_"):
            monkeypatch.delenv(key)


@pytest.fixture()
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("keys") / "keys"
    generate_keys(directory, ["alice"])
    return directory


@pytest.mark.parametrize(
    "endpoint, local",
    [
        ("ipc:///tmp/streamer/events", True),
        ("inproc://events", True),
        ("tcp://127.0.0.1:5556", True),
        ("tcp://127.0.0.1:*", True),
        ("tcp://127.3.4.5:5556", True),
        ("tcp://localhost:5556", True),
        ("tcp://LOCALHOST:5556", True),
        ("tcp://[::1]:5556", True),
        ("tcp://eth0;127.0.0.1:5556", True),  # connect with a source interface: the target counts
        ("tcp://*:5556", False),
        ("tcp://0.0.0.0:5556", False),
        ("tcp://[::]:5556", False),
        ("tcp://192.168.1.20:5556", False),
        ("tcp://10.0.0.1:5556", False),
        ("tcp://[fe80::1]:5556", False),
        ("tcp://gpu-box:5560", False),
        ("tcp://eth0:5556", False),
        ("tcp://lo:5556", False),  # an interface name is not resolved: treated as reachable
        ("tcp://127.0.0.1.example.com:5556", False),
        ("tcp://127.0.0.1", False),  # no port: not an endpoint we understand
        ("udp://127.0.0.1:5556", False),
        ("ws://127.0.0.1:5556", False),
        ("", False),
    ],
)
def test_is_loopback(endpoint, local):
    assert is_loopback(endpoint) is local


def test_defaults_live_in_one_class():
    assert ZmqDefaults is SocketDefaults  # the publisher's old name still works
    assert SocketDefaults.LINGER_MS == 0 and SocketDefaults.PUB_LINGER_MS == 500 and SocketDefaults.SUB_LINGER_MS == 0
    assert (SocketDefaults.REQUEST_HWM, SocketDefaults.RESULT_HWM, SocketDefaults.EVENT_HWM) == (64, 256, 10_000)
    assert SocketDefaults.MAX_MESSAGE_BYTES == 64 * 1024 * 1024
    assert {kind.name: int(kind) for kind in SocketKind} == {
        "PUB": zmq.PUB, "SUB": zmq.SUB, "PUSH": zmq.PUSH, "PULL": zmq.PULL, "DEALER": zmq.DEALER, "ROUTER": zmq.ROUTER,
    }


def test_make_socket_sets_linger_hwm_and_max_message_size(context):
    socket = make_socket(context, SocketKind.PULL, hwm=17, bind=LOOPBACK_ANY_PORT, max_message_bytes=4096)
    try:
        assert socket.getsockopt(zmq.LINGER) == SocketDefaults.LINGER_MS
        assert socket.getsockopt(zmq.SNDHWM) == 17 and socket.getsockopt(zmq.RCVHWM) == 17
        assert socket.getsockopt(zmq.MAXMSGSIZE) == 4096
        assert socket.getsockopt(zmq.CURVE_SERVER) == 0
        assert bound_endpoint(socket).startswith("tcp://127.0.0.1:")
    finally:
        socket.close()
    socket = make_socket(context, SocketKind.PUSH, hwm=3, connect="ipc:///tmp/nobody-there", linger_ms=250)
    try:
        assert socket.getsockopt(zmq.LINGER) == 250 and socket.getsockopt(zmq.MAXMSGSIZE) == -1
    finally:
        socket.close()


@pytest.mark.parametrize(
    "endpoint", ["tcp://0.0.0.0:5556", "tcp://*:5556", "tcp://[::]:5556", "tcp://192.168.1.20:5556"]
)
def test_binding_beyond_loopback_without_keys_is_refused(context, endpoint):
    with pytest.raises(ConfigError, match=r"^publish\.endpoint: .*beyond this machine.*set publish\.keys") as info:
        make_socket(context, SocketKind.PUB, hwm=10, bind=endpoint, setting="publish.endpoint")
    assert "\n" not in str(info.value) and "streamer keys generate" in str(info.value)
    with pytest.raises(ConfigError, match=r"^inference\.bind: .*set inference\.keys"):
        make_socket(context, SocketKind.ROUTER, hwm=10, bind=endpoint, setting="inference.bind")
    with pytest.raises(ConfigError, match=r"^publish\.endpoint: .*publish\.keys"):
        EventPublisher(endpoint)


def test_check_bind_is_usable_before_any_key_is_read(keys_dir):
    check_bind("tcp://127.0.0.1:5556", None, "publish.endpoint")
    check_bind("ipc:///tmp/x", None, "publish.endpoint")
    check_bind("tcp://0.0.0.0:5556", Path("/not/read/yet"), "publish.endpoint")  # a configured folder is enough
    check_bind("tcp://0.0.0.0:5556", ServerKeys.load(keys_dir), "publish.endpoint")
    with pytest.raises(ConfigError, match=r"^inference\.bind: tcp://\*:5560 .*inference\.keys"):
        check_bind("tcp://*:5560", None, "inference.bind")


def test_bind_and_connect_failures_name_the_setting(context):
    first = make_socket(context, SocketKind.ROUTER, hwm=10, bind=LOOPBACK_ANY_PORT, setting="inference.bind")
    try:
        with pytest.raises(ConfigError, match=r"^inference\.bind: cannot bind .*in use"):
            make_socket(context, SocketKind.ROUTER, hwm=10, bind=bound_endpoint(first), setting="inference.bind")
    finally:
        first.close()
    with pytest.raises(ConfigError, match=r"^inference\.endpoint: cannot connect to 'tcp://nowhere'"):
        make_socket(context, SocketKind.DEALER, hwm=10, connect="tcp://nowhere", setting="inference.endpoint")


# -- key files --------------------------------------------------------------------------------------------
def test_generate_keys_layout_and_permissions(tmp_path):
    directory = tmp_path / "keys"
    written = generate_keys(directory, ["dashboard", "cam-host.2"])
    server_public, server_secret = server_files(directory)
    expected = [
        server_public, server_secret, *client_files(directory, "dashboard"), *client_files(directory, "cam-host.2")
    ]
    assert written == expected and all(p.is_file() for p in expected)
    assert sorted(p.name for p in directory.iterdir()) == ["clients", "server.key", "server.key_secret"]  # no leftovers
    for path in expected:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.name.endswith(".key_secret") else 0o644), path
    keys = ServerKeys.load(directory)
    assert keys.clients_dir == directory / "clients" and len(keys.clients) == 2
    client = ClientKeys.load(client_files(directory, "dashboard")[1], server_public)
    assert client.server_public == keys.public and client.public in keys.clients
    assert keys.secret not in repr(keys).encode() and client.secret not in repr(client).encode()


def test_generate_keys_refuses_to_overwrite_and_can_add_clients(tmp_path):
    directory = tmp_path / "keys"
    generate_keys(directory, ["client"])
    before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="refusing to overwrite.*client.key"):
        generate_keys(directory, ["client"])
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_keys(directory, ["newcomer", "client"])  # all or nothing
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before
    added = generate_keys(directory, ["newcomer"])  # the server pair is kept, one more client
    assert added == list(client_files(directory, "newcomer"))
    assert ServerKeys.load(directory).public == ServerKeys.load(directory).public
    assert server_files(directory)[1].read_bytes() == before[server_files(directory)[1]]
    assert len(ServerKeys.load(directory).clients) == 2


@pytest.mark.parametrize(
    "names, message", [(["../evil"], "client name"), ([""], "client name"), (["a", "a"], "differ")]
)
def test_generate_keys_checks_client_names(tmp_path, names, message):
    with pytest.raises(ConfigError, match=message):
        generate_keys(tmp_path / "keys", names)
    assert not (tmp_path / "keys").exists()


def _break(directory: Path, how: str) -> None:
    public, secret = server_files(directory)
    if how == "no folder":
        for path in sorted(directory.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        directory.rmdir()
    elif how == "no secret":
        secret.unlink()
    elif how == "not a key":
        secret.write_text("hello\n")
    elif how == "malformed":
        secret.write_text('curve\n    public-key = "short"\n    secret-key = "short"\n')
    elif how == "not a pair":
        generate_keys(directory.parent / "other", [])
        public.write_bytes(server_files(directory.parent / "other")[0].read_bytes())
    elif how == "no clients":
        for path in (directory / "clients").iterdir():
            path.unlink()
    elif how == "bad client":
        (directory / "clients" / "junk.key").write_text("not a key\n")


@pytest.mark.parametrize(
    "how, message",
    [
        ("no folder", "does not exist"),
        ("no secret", "server.key_secret does not exist"),
        ("not a key", "not a CURVE key file"),
        ("malformed", "malformed key"),
        ("not a pair", "not one pair"),
        ("no clients", "holds no client keys.*--client NAME"),
        ("bad client", "junk.key is not a CURVE key file"),
    ],
)
def test_server_keys_problems_are_one_line_config_errors(tmp_path, how, message):
    directory = tmp_path / "keys"
    generate_keys(directory, ["client"])
    _break(directory, how)
    with pytest.raises(ConfigError, match=rf"^publish\.keys: .*{message}") as info:
        ServerKeys.load(directory)
    assert "\n" not in str(info.value) and "streamer keys generate" in str(info.value)  # and the remedy


def test_client_keys_problems_name_the_setting(keys_dir):
    public, secret = client_files(keys_dir, "alice")
    server_public, server_secret = server_files(keys_dir)
    with pytest.raises(ConfigError, match=r"^inference\.client_key: .*only a public key.*\.key_secret"):
        ClientKeys.load(public, server_public)
    with pytest.raises(ConfigError, match=r"^inference\.server_key: .*holds a secret key"):
        ClientKeys.load(secret, server_secret)
    with pytest.raises(ConfigError, match=r"^--server-key: .*missing\.key does not exist.*streamer keys generate"):
        ClientKeys.load(secret, keys_dir / "missing.key", secret_setting="--client-key", server_setting="--server-key")
    with pytest.raises(ConfigError, match=r"^--client-key: .* is a folder"):
        ClientKeys.load(keys_dir, server_public, secret_setting="--client-key")


# -- settings ---------------------------------------------------------------------------------------------
def test_publish_beyond_loopback_needs_keys_at_settings_load(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMER_PUBLISH__ENDPOINT", "tcp://0.0.0.0:5556")
    with pytest.raises(ConfigError, match=r"^setting publish\.endpoint \(STREAMER_PUBLISH__ENDPOINT\): ") as info:
        load_settings()
    assert "set publish.keys" in str(info.value)
    # The folder is only named here; it is read when the socket is made, so a missing one fails there.
    monkeypatch.setenv("STREAMER_PUBLISH__KEYS", str(tmp_path / "absent"))
    settings = load_settings()
    assert settings.publish.keys == tmp_path / "absent"
    with pytest.raises(ConfigError, match=r"^publish\.keys: keys folder .*absent does not exist.*keys generate"):
        EventPublisher(settings.publish.endpoint, keys=settings.publish.keys)
    monkeypatch.delenv("STREAMER_PUBLISH__ENDPOINT")
    assert load_settings().publish.endpoint == "tcp://127.0.0.1:5556"  # keys on loopback are allowed too


def test_shipped_cctv_config_listens_only_with_keys():
    settings = load_settings(Path(__file__).resolve().parents[1] / "configs" / "cctv.yaml")
    assert not is_loopback(settings.publish.endpoint) and settings.publish.keys is not None


@pytest.mark.parametrize(
    "values, setting, message",
    [
        ({"endpoint": "gpu:5560"}, "inference.endpoint", "tcp://HOST:PORT"),
        ({"endpoint": "tcp://gpu"}, "inference.endpoint", "tcp://HOST:PORT"),
        ({"endpoint": "tcp://gpu:http"}, "inference.endpoint", "port 1-65535"),
        ({"endpoint": "tcp://gpu:0"}, "inference.endpoint", "port 1-65535"),
        ({"endpoint": "tcp://gpu:70000"}, "inference.endpoint", "port 1-65535"),
        ({"endpoint": "tcp://*:5560"}, "inference.endpoint", "tcp://HOST:PORT"),
        ({"endpoint": "ipc://"}, "inference.endpoint", "ipc://PATH"),
        ({"endpoint": "tcp://gpu-box:5560"}, "inference.endpoint", "needs CURVE keys.*server_key.*client_key"),
        ({"endpoint": "tcp://10.0.0.7:5560"}, "inference.endpoint", "needs CURVE keys"),
        ({"server_key": "server.key"}, "inference.client_key", "must be too"),
        ({"client_key": "me.key_secret"}, "inference.client_key", "needs inference.server_key"),
        ({"bind": "tcp://0.0.0.0:5560"}, "inference.bind", "needs CURVE keys: set inference.keys"),
        ({"bind": "5560"}, "inference.bind", "tcp://HOST:PORT"),
    ],
)
def test_inference_settings_fail_naming_the_setting(tmp_path, values, setting, message):
    config = tmp_path / "c.yaml"
    config.write_text("inference:\n" + "".join(f"  {k}: {v!r}\n" for k, v in values.items()))
    env = "STREAMER_" + setting.upper().replace(".", "__")
    with pytest.raises(ConfigError, match=rf"^setting {setting} \({env}\): .*{message}") as info:
        load_settings(config)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"endpoint": "ipc:///tmp/streamer/inference"},
        {"endpoint": "tcp://127.0.0.1:5560"},
        {"endpoint": "tcp://localhost:5560"},
        {"endpoint": "tcp://gpu-box:5560", "server_key": "/k/server.key", "client_key": "/k/me.key_secret"},
        {"endpoint": "tcp://[::1]:5560"},
        {"bind": "tcp://*:5560", "keys": "/etc/streamer/keys"},
        {"bind": "tcp://eth0:5560", "keys": "/etc/streamer/keys"},
        {"bind": "tcp://127.0.0.1:*"},
    ],
)
def test_inference_settings_accept(values):
    settings = InferenceSettings(**values)
    assert settings.bind == values.get("bind", "tcp://127.0.0.1:5560")


def test_key_paths_expand_the_home_folder():
    settings = InferenceSettings(server_key="~/k/server.key", client_key="~/k/me.key_secret", keys="~/k")
    assert all(not str(p).startswith("~") for p in (settings.server_key, settings.client_key, settings.keys))


# -- command line -----------------------------------------------------------------------------------------
def test_cli_keys_generate(tmp_path, capsys):
    directory = tmp_path / "keys"
    assert main(["keys", "generate", str(directory)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    for path in (*server_files(directory), *client_files(directory, "client")):
        assert path.is_file()
        assert any(line.startswith(f"{path}\t") for line in lines), path
    assert "copy to every client" in out and "--client-key" in out and "publish.keys" in out and err == ""

    assert main(["keys", "generate", str(directory)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("streamer: error: refusing to overwrite")

    assert main(["keys", "generate", str(directory), "--client", "a", "--client", "b"]) == 0
    assert len(ServerKeys.load(directory).clients) == 3
    capsys.readouterr()


def test_cli_subscribe_key_flags_go_together(keys_dir, capsys):
    server_public, _ = server_files(keys_dir)
    _, client_secret = client_files(keys_dir, "alice")
    for flags, missing in [(["--server-key", str(server_public)], "--client-key"),
                           (["--client-key", str(client_secret)], "--server-key")]:
        assert main(["subscribe", "tcp://127.0.0.1:5556", *flags, "--timeout", "0"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and f"needs {missing} too" in err
    # Swapped files: a one-line error naming the flag, nothing is connected.
    swapped = ["--server-key", str(client_secret), "--client-key", str(server_public)]
    assert main(["subscribe", *swapped, "--timeout", "0"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("streamer: error: --client-key: ")
