"""REST API v1 of `streamer serve` against the real app on a real uvicorn (127.0.0.1, a free port), real
models and real photos; no pipeline here (supervisor=None), events and unknowns fed through the tap."""

from __future__ import annotations

import base64
import json
import sqlite3
import time

import cv2
import httpx
import numpy as np
import pytest

from streamer import cli
from streamer.config import load_settings
from streamer.imaging import encode_jpeg, face_crop
from streamer.match.strangers import StrangerBook
from streamer.publish.events import Heartbeat, Identity, StreamStatus
from streamer.serve.app import create_app
from streamer.serve.auth import TokenStore
from streamer.serve.context import ServeContext
from streamer.serve.server import HttpServer, bind_socket
from streamer.serve.unknowns import UnknownStore

UPLOAD_MB = 1.5  # deepface/img1.jpg (2.3 MB) is over it


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_dir, cache_dir, media_dir):
    root = tmp_path_factory.mktemp("serve-api")
    settings = load_settings(overrides={
        "model_dir": str(model_dir), "models": {"cache_dir": str(cache_dir)},
        "gallery": {"path": str(root / "people.db")},
        "serve": {"max_upload_mb": UPLOAD_MB, "login_attempts_per_minute": 1000},
    })
    tokens = TokenStore(root / "tokens.json")
    _, token = tokens.create("tester")
    # The supervisor's stranger book, without a pipeline: the tests feed it the way the supervisor does.
    ctx = ServeContext(settings=settings, tokens=tokens, strangers=_book(settings))
    http = HttpServer(create_app(ctx), bind_socket("127.0.0.1", 0), ctx).start()
    with httpx.Client(base_url=http.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        # Models load on first use: load them now, so each test measures only itself.
        files = {"img": (media_dir / "deepface/img5.jpg").read_bytes()}
        assert client.post("/api/v1/represent", files=files).status_code == 200
        yield ctx, client
    http.stop()


def _book(settings):
    from streamer.models.factory import ModelFactory

    return StrangerBook.from_settings(settings.recognition, ModelFactory(settings).embedder_spec)


def _files(media_dir, **fields):
    return [(name, (path.split("/")[-1], (media_dir / path).read_bytes())) for name, path in fields.items()]


def _cli_json(capsys, *argv):
    capsys.readouterr()
    code = cli.main([*argv, "--json"])
    out = capsys.readouterr().out
    assert code in (0, 1), out
    return json.loads(out)


def test_verify_multipart_and_json_match_the_cli(served, media_dir, model_dir, capsys):
    _, client = served
    same = client.post("/api/v1/verify", files=_files(media_dir, img1="deepface/img5.jpg", img2="deepface/img2.jpg"))
    assert same.status_code == 200, same.text
    expected = _cli_json(capsys, "verify", str(media_dir / "deepface/img5.jpg"), str(media_dir / "deepface/img2.jpg"),
                         "--model-dir", str(model_dir))
    assert same.json() == expected and expected["verified"] is True
    encoded = {k: base64.b64encode((media_dir / p).read_bytes()).decode()
               for k, p in (("img1", "deepface/img5.jpg"), ("img2", "deepface/img12.jpg"))}
    encoded["img2"] = "data:image/jpeg;base64," + encoded["img2"]  # browsers' data: URLs work too
    different = client.post("/api/v1/verify", json=encoded)
    assert different.status_code == 200, different.text
    assert different.json()["verified"] is False and different.json()["distance"] > same.json()["distance"]


@pytest.mark.parametrize("command, image", [
    ("detect", "face_recognition/examples/two_people.jpg"),
    ("represent", "face_recognition/examples/two_people.jpg"),
    ("analyze", "deepface/img41.jpg"),
])
def test_image_calls_give_the_cli_json(served, media_dir, model_dir, capsys, command, image):
    _, client = served
    answer = client.post(f"/api/v1/{command}", files=_files(media_dir, img=image))
    assert answer.status_code == 200, answer.text
    faces = answer.json()["faces"]
    assert faces and faces == _cli_json(capsys, command, str(media_dir / image), "--model-dir", str(model_dir))


def test_bad_input_gets_one_sentence_4xx(served, media_dir, tmp_path):
    _, client = served
    cases = [
        (client.post("/api/v1/verify", files=[("img1", ("a.txt", b"not an image at all"))]), 422, "missing field img2"),
        (client.post("/api/v1/verify", files=[("img1", ("a.txt", b"not an image at all")),
                                              ("img2", ("b.jpg", (media_dir / "deepface/img5.jpg").read_bytes()))]),
         400, "img1 (a.txt): not an image"),
        (client.post("/api/v1/analyze", json={"img": "@@not base64@@"}), 400, "img: not base64"),
        (client.post("/api/v1/analyze", json={}), 422, "missing field img"),
        (client.post("/api/v1/analyze", content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (client.post("/api/v1/analyze", content=b"x", headers={"content-type": "text/plain"}), 415, "unsupported"),
        (client.post("/api/v1/represent", files=_files(media_dir, img="deepface/img1.jpg")), 413, "serve.max_upload_mb"),
        (client.post("/api/v1/verify",
                     files=[("img1", ("blank.png", cv2.imencode(".png", np.zeros((200, 200, 3), np.uint8))[1].tobytes())),
                            ("img2", ("b.jpg", (media_dir / "deepface/img5.jpg").read_bytes()))]),
         422, "img1 (blank.png): no face found"),
        (client.post("/api/v1/people", files=_files(media_dir, img="deepface/img5.jpg")), 422, "missing field name"),
        (client.delete("/api/v1/people/Nobody"), 404, "no person named 'Nobody'"),
        (client.patch("/api/v1/people/Nobody", json={"name": "Somebody"}), 404, "no person named 'Nobody'"),
        (client.patch("/api/v1/people/Nobody", json={}), 422, "missing field name"),
        (client.get("/api/v1/nowhere"), 404, "no such page or API route"),
        (client.put("/api/v1/verify"), 405, "PUT is not allowed"),
        (client.get("/api/v1/streams"), 503, "no pipeline"),
        (client.get("/api/v1/unknowns/cam0.99/thumbnail.jpg"), 404, "no recent unknown"),
    ]
    for answer, status, words in cases:
        body = answer.json()
        assert (answer.status_code, list(body)) == (status, ["error"]), (answer.status_code, body)
        assert words in body["error"] and "\n" not in body["error"] and "Traceback" not in body["error"]


def test_an_oversized_upload_is_refused_before_its_body_ends(served):
    """A chunked upload (no Content-Length) that passes the limit is answered 413 while the client is still
    sending: the server counts as it reads instead of taking the whole body first."""
    import socket

    _, client = served
    host, port = client.base_url.host, client.base_url.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/v1/represent HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            + f"Authorization: {client.headers['Authorization']}\r\n\r\n".encode()
        )
        part = b'--b\r\nContent-Disposition: form-data; name="img"; filename="big.jpg"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        chunk = b"\xff" * (256 * 1024)
        for _ in range(int(UPLOAD_MB * 4) + 2):  # just over the limit; the body never ends
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = b""
        while b"serve.max_upload_mb" not in answer and (data := sock.recv(65536)):
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large" and b"serve.max_upload_mb" in rest


def test_gallery_enrol_rename_find_and_forget(served, media_dir):
    ctx, client = served
    obama = _files(media_dir, img="face_recognition/examples/obama.jpg")
    made = client.post("/api/v1/people", data={"name": "Barack"}, files=obama)
    assert (made.status_code, made.json()) == (201, {"name": "Barack", "added": 1, "duplicates": 0})
    again = client.post("/api/v1/people", data={"name": "Barack"}, files=obama)
    assert again.status_code == 409 and "already enrolled" in again.json()["error"]
    more = client.post("/api/v1/people/Barack/faces", files=[*obama, *_files(media_dir, img="face_recognition/examples/obama2.jpg")])
    assert (more.status_code, more.json()) == (200, {"name": "Barack", "added": 1, "duplicates": 1})
    group = _files(media_dir, img="face_recognition/examples/two_people.jpg")
    refused = client.post("/api/v1/people", data={"name": "Joe"}, files=group)
    assert refused.status_code == 400 and "2 faces found" in refused.json()["error"] and "face field" in refused.json()["error"]
    biden = client.post("/api/v1/people", data={"name": "Joe", "face": "2"}, files=group)  # left to right: Biden right
    assert biden.status_code == 201, biden.text
    people = client.get("/api/v1/people").json()["people"]
    assert [(p["name"], p["faces"]) for p in people] == [("Barack", 2), ("Joe", 1)]
    assert set(people[0]) == {"name", "faces", "negatives", "models"}
    found = client.post("/api/v1/find", files=_files(media_dir, img="face_recognition/examples/obama-480p.jpg"))
    assert [f["name"] for f in found.json()["faces"]] == ["Barack"]
    assert set(found.json()["faces"][0]) == {"box", "detection_score", "name", "score", "distance"}
    clash = client.patch("/api/v1/people/Barack", json={"name": "Joe"})
    assert clash.status_code == 409
    renamed = client.patch("/api/v1/people/Barack", json={"name": "Barack Obama"})
    assert renamed.json() == {"name": "Barack Obama"}
    # Forget-me: the vectors leave the file itself, not just the listing.
    path = ctx.gallery_path
    with sqlite3.connect(path) as conn:
        blobs = [row[0] for row in conn.execute("SELECT f.vector FROM faces f JOIN people p ON p.id = f.person_id "
                                                "WHERE p.name = 'Barack Obama'")]
    assert len(blobs) == 2 and all(blob in path.read_bytes() for blob in blobs)
    assert client.delete("/api/v1/people/Barack Obama").status_code == 204
    assert not any(blob in path.read_bytes() for blob in blobs)
    assert [p["name"] for p in client.get("/api/v1/people").json()["people"]] == ["Joe"]
    assert client.delete("/api/v1/people/Barack Obama").status_code == 404


def _identity(seq, track, name, box, quality=0.5, stream="cam0"):
    return Identity(seq=seq, stream=stream, frame=seq, pts=seq / 25, track=track, box=box, name=name,
                    score=0.9 if name else 0.0, distance=0.3 if name else None,
                    votes={name or "unknown": 1}, quality=quality, stranger=None if name else f"u-{track}")


def test_recent_unknowns_thumbnail_enrol_and_dismiss(served, media_dir):
    ctx, client = served
    image = cv2.imread(str(media_dir / "face_recognition/examples/alex-lacamoire.png"))
    faces = ctx.face_engine().detect(image)
    box = faces.boxes[int(np.argmax(faces.areas))]
    crop = encode_jpeg(face_crop(image, box))
    worse = encode_jpeg(cv2.resize(face_crop(image, box), (40, 40)))
    ctx.tap(_identity(101, 7, None, box, quality=0.8), crop)
    ctx.tap(_identity(102, 7, None, box, quality=0.1), worse)  # a worse view later: the best face stays
    ctx.tap(_identity(103, 8, None, box), worse)
    ctx.tap(_identity(104, 9, None, box), worse)
    ctx.tap(_identity(105, 9, "Someone", box), None)  # recognised after all: no longer unknown
    listed = client.get("/api/v1/unknowns").json()["unknowns"]
    assert [u["id"] for u in listed] == ["cam0.8", "cam0.7"]
    assert set(listed[0]) == {"id", "stream", "track", "stranger", "first_seen", "last_seen", "score"}
    assert listed[1]["stranger"] == "u-7"
    thumb = client.get("/api/v1/unknowns/cam0.7/thumbnail.jpg")
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.content == crop
    enrolled = client.post("/api/v1/unknowns/cam0.7/enrol", json={"name": "Alex Lacamoire"})
    assert (enrolled.status_code, enrolled.json()["name"], enrolled.json()["added"]) == (201, "Alex Lacamoire", 1)
    assert client.delete("/api/v1/unknowns/cam0.8").status_code == 204
    assert client.get("/api/v1/unknowns").json()["unknowns"] == []
    ctx.tap(_identity(106, 8, None, box), worse)  # a dismissed track is not listed again
    assert client.get("/api/v1/unknowns").json()["unknowns"] == []
    found = client.post("/api/v1/find", files=_files(media_dir, img="face_recognition/examples/alex-lacamoire.png"))
    assert [f["name"] for f in found.json()["faces"]] == ["Alex Lacamoire"]
    assert client.delete("/api/v1/people/Alex Lacamoire").status_code == 204


def test_unknowns_expire_after_their_ttl():
    store = UnknownStore(max_items=2, ttl_s=0.3)
    box = (10.0, 10.0, 60.0, 60.0)
    for track in (1, 2, 3):
        store.observe(_identity(track, track, None, box), b"jpeg")
    assert [u.track for u in store.list()] == [3, 2]  # at most max_items, oldest out first
    time.sleep(0.4)
    store.observe(Heartbeat(seq=9, streams={}, queues={}, uptime=1.0), None)  # any event expires old ones
    assert store.list() == [] and store.get("cam0.3") is None


def test_events_ring_filters_and_websocket(served):
    import asyncio

    import websockets

    ctx, client = served
    base = 1000
    events = [
        StreamStatus(seq=base + 1, stream="door", status="connected"),
        _identity(base + 2, 1, "Ada", (1.0, 2.0, 30.0, 40.0), stream="door"),
        _identity(base + 3, 2, None, (1.0, 2.0, 30.0, 40.0), stream="yard"),
        Heartbeat(seq=base + 4, streams={}, queues={}, uptime=2.0),
    ]
    for event in events:
        ctx.tap(event, None)
    got = client.get("/api/v1/events", params={"kind": "identity", "after_seq": base}).json()["events"]
    assert [e["seq"] for e in got] == [base + 2, base + 3]
    assert got[0] == json.loads(events[1].payload())  # the ZeroMQ payload, byte for byte
    assert [e["seq"] for e in client.get("/api/v1/events", params={"name": "Ada"}).json()["events"]] == [base + 2]
    assert [e["stream"] for e in client.get("/api/v1/events", params={"stream": "yard", "after_seq": base}).json()["events"]] == ["yard"]
    assert [e["seq"] for e in client.get("/api/v1/events", params={"limit": 1}).json()["events"]] == [base + 4]
    assert client.get("/api/v1/events", params={"limit": 0}).status_code == 422

    url = client.base_url.copy_with(scheme="ws", path="/api/v1/events/ws", params={"kind": "identity", "after_seq": base + 2})
    token = client.headers["Authorization"]

    async def listen():
        async with websockets.connect(str(url), additional_headers={"Authorization": token}) as ws:
            backlog = json.loads(await asyncio.wait_for(ws.recv(), 5))
            live = _identity(base + 5, 3, "Grace", (1.0, 2.0, 30.0, 40.0))
            await asyncio.get_running_loop().run_in_executor(None, ctx.tap, live, None)
            return backlog, json.loads(await asyncio.wait_for(ws.recv(), 5))

    backlog, live = asyncio.run(listen())
    assert backlog["seq"] == base + 3 and (live["seq"], live["name"]) == (base + 5, "Grace")


def _stranger_face(ctx, media_dir, photo):
    """(embedding, JPEG crop) of a photo's primary face, as the pipeline hands them to the stranger book."""
    image = cv2.imread(str(media_dir / photo))
    faces, vector = ctx.face_engine().embed_primary(image)
    return vector, encode_jpeg(face_crop(image, faces.boxes[0]))


def test_strangers_list_thumbnail_promote_and_forget(served, media_dir, tmp_path, monkeypatch, capsys):
    ctx, client = served
    book = ctx.strangers
    obama, obama_crop = _stranger_face(ctx, media_dir, "face_recognition/examples/obama.jpg")
    obama2, _ = _stranger_face(ctx, media_dir, "face_recognition/examples/obama2.jpg")
    biden, _ = _stranger_face(ctx, media_dir, "face_recognition/examples/biden.jpg")
    first = book.assign("door", 1, obama, 0.9, obama_crop)
    assert book.assign("yard", 2, obama2, 0.7).startswith("u-")  # another camera; joins or not
    other = book.assign("door", 3, biden, 0.8)  # no crop came with it
    assert len({first, other}) == 2
    ctx.tap(_identity(201, 1, None, (1.0, 2.0, 30.0, 40.0), stream="door").model_copy(update={"stranger": first}),
            obama_crop)
    listed = client.get("/api/v1/strangers").json()["strangers"]
    assert listed[0]["id"] == other and {first, other} <= {s["id"] for s in listed}
    assert set(listed[0]) == {"id", "tracks", "streams", "first_seen", "last_seen", "faces", "quality", "thumbnail"}
    assert "embedding" not in json.dumps(listed) and listed[0]["streams"] == ["door"]
    assert abs(listed[0]["last_seen"] - time.time()) < 60 and listed[0]["thumbnail"] is False
    thumb = client.get(f"/api/v1/strangers/{first}/thumbnail.jpg")
    assert (thumb.status_code, thumb.headers["content-type"], thumb.content) == (200, "image/jpeg", obama_crop)
    assert thumb.headers["cache-control"] == "no-store"
    assert client.get(f"/api/v1/strangers/{other}/thumbnail.jpg").status_code == 404

    expected = len(book.best_faces(first))
    promoted = client.post(f"/api/v1/strangers/{first}/promote", json={"name": " Barack Stranger "})
    assert (promoted.status_code, promoted.json()) == (201, {"name": "Barack Stranger", "added": expected,
                                                             "duplicates": 0})
    assert first not in {s["id"] for s in client.get("/api/v1/strangers").json()["strangers"]}
    assert all(u["stranger"] != first for u in client.get("/api/v1/unknowns").json()["unknowns"])
    found = client.post("/api/v1/find", files=_files(media_dir, img="face_recognition/examples/obama-480p.jpg"))
    assert [f["name"] for f in found.json()["faces"]] == ["Barack Stranger"]
    # The same vectors again (a stranger who comes back after the promote, seen identically): nothing added,
    # to an existing person.
    back = book.assign("door", 4, obama, 0.9, obama_crop)
    assert back != first  # ids are never reused
    twice = client.post(f"/api/v1/strangers/{back}/promote", json={"name": "Barack Stranger"})
    assert (twice.status_code, twice.json()["added"], twice.json()["duplicates"]) == (201, 0, 1)

    cases = [
        (client.post(f"/api/v1/strangers/{first}/promote", json={"name": "Barack"}), 404, f"no stranger '{first}'"),
        (client.post("/api/v1/strangers/u-0x/promote", json={"name": "Barack"}), 404, "no stranger 'u-0x'"),
        (client.post(f"/api/v1/strangers/{other}/promote", json={}), 422, "missing field name"),
        (client.post(f"/api/v1/strangers/{other}/promote", json={"name": "a\nb"}), 400, "control characters"),
        (client.get("/api/v1/strangers/u-99999/thumbnail.jpg"), 404, "no stranger 'u-99999'"),
        (client.delete("/api/v1/strangers/u-99999"), 404, "no stranger 'u-99999'"),
    ]
    for answer, status, words in cases:
        body = answer.json()
        assert (answer.status_code, list(body)) == (status, ["error"]), (answer.status_code, body)
        assert words in body["error"] and "\n" not in body["error"]
    assert client.delete(f"/api/v1/strangers/{other}").status_code == 204
    assert other not in {s["id"] for s in client.get("/api/v1/strangers").json()["strangers"]}

    # `streamer gallery promote` shares the enrolment with the API: a stranger promoted by the CLI (here from
    # recognition.strangers_file, no pipeline) and then over the API adds its faces once.
    store_file = tmp_path / "strangers.db"
    monkeypatch.setenv("STREAMER_RECOGNITION__STRANGERS_FILE", str(store_file))
    saved = StrangerBook.from_settings(load_settings().recognition, book_spec(ctx))
    try:
        shared = saved.assign("door", 1, biden, 0.8)
        code = cli.main(["gallery", "promote", shared, "Joe Stranger", "--gallery", str(ctx.gallery_path)])
        assert code == 0, capsys.readouterr().err
        ctx.strangers = saved
        via_api = client.post(f"/api/v1/strangers/{shared}/promote", json={"name": "Joe Stranger"})
        assert (via_api.status_code, via_api.json()["added"], via_api.json()["duplicates"]) == (201, 0, 1)
    finally:
        ctx.strangers = book
        saved.close()
    people = {p["name"]: p["faces"] for p in client.get("/api/v1/people").json()["people"]}
    assert people["Joe Stranger"] == 1 and people["Barack Stranger"] == expected
    for name in ("Joe Stranger", "Barack Stranger"):
        assert client.delete(f"/api/v1/people/{name}").status_code == 204


def book_spec(ctx):
    return ctx.face_engine().embedder.spec
