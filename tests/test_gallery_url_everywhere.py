"""A PostgreSQL gallery (gallery.url) works wherever a gallery file does: MQTT presence follows its
enrolments and removals, `streamer serve` enrols, lists and deletes in it over the REST API, and
`gallery promote` finds the pipeline that runs with it. Real PostgreSQL, mosquitto and serve process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from postgres import cluster_fixture, database_fixture

from streamer.config import load_settings
from streamer.pipeline import admin

psycopg = pytest.importorskip("psycopg")
from streamer.match.gallery_pg import PgGallery  # noqa: E402

from mosquitto import Collector, Mosquitto, available  # noqa: E402
from test_serve_cli import Served, _wait_for, env  # noqa: E402, F401 - env is a fixture

REPO = Path(__file__).resolve().parents[1]
STILL = REPO / "sample_videos" / "astronaut.jpg"
LIN = "Lin-Manuel Miranda"


cluster = pytest.fixture(scope="module", name="cluster")(cluster_fixture)
url = pytest.fixture(name="url")(database_fixture)


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))
    return folder


def vector(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(1, 128)).astype(np.float32)
    return v / np.linalg.norm(v)


def cli(*args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(extra or {})}, check=False)


# -- MQTT presence ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not available(), reason="needs the mosquitto broker (.ci/install-system-deps.sh)")
def test_mqtt_presence_entities_follow_enrolment_and_removal_in_postgresql(url, cluster, tmp_path):
    from streamer.publish.sinks import Sinks

    with PgGallery(url, create=True) as people:
        people.add(LIN, vector(1), "test-embedder")
    with Mosquitto(tmp_path / "broker") as broker:
        watcher = Collector(broker.port, ["homeassistant/#", "streamer/#"])
        # Through the settings, as `streamer run --gallery postgresql://...` builds the sinks.
        settings = load_settings(overrides={"gallery": {"url": url, "path": None},
                                            "publish": {"mqtt": {"url": broker.url}}})
        sinks = Sinks.from_settings(settings)
        try:
            lin = "homeassistant/device_tracker/streamer/person_lin_manuel_miranda/config"
            ada = "homeassistant/device_tracker/streamer/person_ada_lovelace/config"
            config = watcher.wait_for(lambda m: m.topic == lin and m.payload, 20, "Lin's entity")
            assert json.loads(config.payload)["name"] == LIN
            with PgGallery(url) as people:  # another host's enrolment
                people.add("Ada Lovelace", vector(2), "test-embedder")
            watcher.wait_for(lambda m: m.topic == ada and m.payload, 20, "Ada's entity after enrolment")
            watcher.wait_for(lambda m: m.topic == "streamer/person/ada_lovelace/presence" and m.payload, 20,
                             "Ada's presence")
            since = len(watcher.messages)
            with PgGallery(url) as people:
                people.remove("Ada Lovelace")
            watcher.wait_for(lambda m: m.topic == ada and m.payload == b"", 20, "Ada's entity cleared", since)
            watcher.wait_for(lambda m: m.topic == "streamer/person/ada_lovelace/presence" and m.payload == b"", 20,
                             "Ada's presence cleared", since)
            # The database goes away: nobody's entity flaps; back again, a new enrolment shows as before.
            mqtt, = sinks.sinks
            cluster.stop()
            try:
                _wait_for(lambda: mqtt._gallery._gallery is None, 30, "the sink to notice the database is gone")
            finally:
                cluster.start()
            with PgGallery(url) as people:
                people.add("Grace Hopper", vector(5), "test-embedder")
            grace = "homeassistant/device_tracker/streamer/person_grace_hopper/config"
            watcher.wait_for(lambda m: m.topic == grace and m.payload, 30, "Grace's entity after the restart")
            assert not [m for m in watcher.messages if m.topic == lin and m.payload == b""]
        finally:
            sinks.close()
            watcher.close()


# -- streamer serve ----------------------------------------------------------------------------------------------
def test_serve_enrols_lists_and_deletes_in_postgresql(url, cluster, env, tmp_path, runtime_dir):  # noqa: F811
    config_home = tmp_path / "config"
    served = Served(["--gallery", url], {**env, "XDG_CONFIG_HOME": str(config_home),
                                         "XDG_RUNTIME_DIR": str(runtime_dir)})
    try:
        base = served.url()
        token = next(line for line in served.lines if line.startswith("stk_"))
        # No gallery file to sit beside: the token store is this user's, and the start-up says where.
        store = config_home / "streamer" / "streamer.tokens.json"
        assert store.is_file() and any(f"created the admin token in {store}" in line for line in served.lines)
        # The pipeline's admin channel is announced under the database's name, never its password.
        registration, = admin.find_pipelines(url)
        assert registration.gallery == f"postgresql://{cluster.user}@127.0.0.1:{cluster.port}/{url.rsplit('/', 1)[1]}"
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
            assert client.get("/api/v1/people").json()["people"] == []
            with open(STILL, "rb") as photo:
                answer = client.post("/api/v1/people", data={"name": "Eileen Collins"},
                                     files={"img": ("astronaut.jpg", photo, "image/jpeg")})
            assert answer.status_code == 201, answer.text
            assert answer.json()["added"] == 1
            with open(STILL, "rb") as photo:
                again = client.post("/api/v1/people", data={"name": "Eileen Collins"},
                                    files={"img": ("astronaut.jpg", photo, "image/jpeg")})
            assert again.status_code == 409, again.text
            listed = client.get("/api/v1/people").json()["people"]
            assert [(p["name"], p["faces"]) for p in listed] == [("Eileen Collins", 1)]
            with PgGallery(url, readonly=True) as gallery:  # in the database, for every host to see
                assert gallery.names() == {"Eileen Collins"}
            assert client.delete("/api/v1/people/Eileen Collins").status_code == 204
            assert client.delete("/api/v1/people/Eileen Collins").status_code == 404
            assert client.get("/api/v1/people").json()["people"] == []
            with PgGallery(url, readonly=True) as gallery:
                assert len(gallery) == 0
        code, _ = served.stop()
        assert code == 0, "\n".join(served.lines)
        assert cluster.password not in "\n".join(served.lines)
        assert admin.find_pipelines(url) == []
    finally:
        served.kill()


def test_serve_with_a_wrong_database_password_fails_in_one_line(url, cluster, env, tmp_path):  # noqa: F811
    wrong = cluster.url(url.rsplit("/", 1)[1], password="not-the-password")
    done = subprocess.run([sys.executable, "-m", "streamer", "serve", "--gallery", wrong, "--bind", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**env, "XDG_CONFIG_HOME": str(tmp_path / "config")})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused user" in lines[0], done.stderr
    assert "not-the-password" not in done.stderr


# -- gallery promote -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("a", "b", "same"), [
    ("postgresql://u:pw@127.0.0.1:5433/db", "postgresql://u:other@127.0.0.1:5433/db?sslmode=disable", True),
    ("postgresql://u@localhost/u", "postgres://u@localhost:5432", True),
    ("postgresql://u@127.0.0.1:5433/db", "postgresql://u@127.0.0.1:5433/other", False),
    ("postgresql://u@127.0.0.1:5433/db", "postgresql://v@127.0.0.1:5433/db", False),
])
def test_a_gallery_url_is_one_registry_entry_however_spelled(a, b, same, monkeypatch):
    for name in ("PGUSER", "PGHOST", "PGPORT", "PGDATABASE"):
        monkeypatch.delenv(name, raising=False)
    assert (admin.gallery_id(a) == admin.gallery_id(b)) is same
    assert "pw" not in admin.gallery_id(a)


def test_promote_enrols_a_running_pipelines_stranger_into_postgresql(url, cluster, tmp_path, runtime_dir):
    from pydantic import SecretStr

    from streamer.match.strangers import StrangerBook

    book = StrangerBook("euclidean", 0.48, embedder_id="test-emb")
    face = vector(3)[0]
    book.assign("cam0", 1, face, 0.7)
    book.track_ended("cam0", 1)
    private = tmp_path / "supervisor"
    private.mkdir(mode=0o700)
    refused = cli("gallery", "promote", "u-1", "Bob", "--gallery", url)  # nobody runs with it yet
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    line, = refused.stderr.strip().splitlines()
    assert "no running pipeline with this gallery (postgresql://" in line and cluster.password not in line
    server = admin.AdminServer(book, private, SecretStr(url))  # what `streamer run --gallery URL` starts
    try:
        assert cluster.password not in server.registry_file.read_text()
        # The same database, spelled differently (an extra parameter) by the command line.
        done = cli("gallery", "promote", "u-1", "Bob", "--gallery", f"{url}?connect_timeout=10")
        assert done.returncode == 0, done.stderr
        assert "enrolled Bob: 1 face(s) of stranger u-1" in done.stderr
        assert cluster.password not in done.stderr
        with PgGallery(url, readonly=True) as gallery:
            assert gallery.person("Bob").faces == 1 and gallery.embedders() == {"test-emb": 128}
        assert book.best_faces("u-1") == []  # the pipeline was told: its id is done
    finally:
        server.close()


def test_the_consoles_promote_enrols_a_stranger_into_postgresql(url, cluster, tmp_path):
    from streamer.match.strangers import StrangerBook
    from streamer.serve.app import create_app
    from streamer.serve.auth import TokenStore
    from streamer.serve.context import ServeContext
    from streamer.serve.server import HttpServer, bind_socket

    settings = load_settings(overrides={"gallery": {"url": url, "path": None}})
    tokens = TokenStore(tmp_path / "tokens.json")
    _, token = tokens.create("tester")
    book = StrangerBook("euclidean", 0.48, embedder_id="test-emb")
    stranger = book.assign("door", 1, vector(4)[0], 0.8)
    ctx = ServeContext(settings=settings, tokens=tokens, strangers=book)
    http = HttpServer(create_app(ctx), bind_socket("127.0.0.1", 0), ctx).start()
    try:
        with httpx.Client(base_url=http.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            promoted = client.post(f"/api/v1/strangers/{stranger}/promote", json={"name": "Grace Hopper"})
            assert (promoted.status_code, promoted.json()["added"]) == (201, 1), promoted.text
            assert [p["name"] for p in client.get("/api/v1/people").json()["people"]] == ["Grace Hopper"]
        with PgGallery(url, readonly=True) as gallery:
            assert gallery.person("Grace Hopper").faces == 1
        assert book.best_faces(stranger) == []
    finally:
        http.stop()
