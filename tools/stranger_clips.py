"""Compose clips in which strangers come back, and measure whether they get their earlier stranger id.

From the shared identity-labelled photos (STREAMER_MEDIA_DIR/identities.csv): each appearance is one photo
of a person (a different photo each time, as far as the person has them), shown for a moment with a slight
drift, then a grey gap (a cut, so the track ends); two strangers (never enrolled) come back several times in
each of two streams, sometimes both in one frame, plus one enrolled person who must be named, never given a
stranger id. The clips are third-party faces: they go to out/ (git-ignored) and are never committed.

    python tools/stranger_clips.py                      # compose out/stranger_clips/{cam0,cam1}.mp4 + truth.json
    python tools/stranger_clips.py --measure            # ... and run the pipeline over them, print the numbers
    python tools/stranger_clips.py --measure --strangers deepface:angelina face_recognition:obama

Measured (see `measure`): of the appearances after a stranger's first, how many carry the id of its first
appearance (re-identification rate); ids shared by two different people (false merges, must be 0);
appearances of strangers that got no identity at all; stranger ids given to the enrolled person.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MEDIA = Path(os.environ.get("STREAMER_MEDIA_DIR") or REPO.parent / "shared" / "media")
DEFAULT_STRANGERS = ("deepface:cluster_img8", "face_recognition:obama")
DEFAULT_KNOWN = "openface:clapton"
WIDTH, HEIGHT, FPS = 640, 360, 10
TILE = 240  # the face tile's side; the face is about 100 px in it
SEGMENT_FRAMES = 16
GAP_FRAMES = 6
SLOTS = ((50, 60), (350, 60))  # top-left corners of the left and right tiles
DRIFT_PX = 1  # per frame, to the right: the tracker follows a moving face
# Who appears in each segment of each stream: "A"/"B" the strangers, "K" the enrolled person.
PLAN = {
    "cam0": ("A", "B", "AB", "K", "A", "B", "BA"),
    "cam1": ("B", "A", "K", "AB", "B", "A", "A"),
}


@dataclass(frozen=True)
class Appearance:
    stream: str
    person: str  # identity label from identities.csv
    role: str  # A, B (strangers) or K (known)
    photo: str
    start: int  # first frame
    end: int  # one past the last
    x: int  # tile's top-left at `start`; it drifts DRIFT_PX per frame
    y: int

    def contains(self, frame: int, cx: float, cy: float) -> bool:
        if not self.start <= frame < self.end:
            return False
        x = self.x + DRIFT_PX * (frame - self.start)
        return x <= cx < x + TILE and self.y <= cy < self.y + TILE


def photos_by_identity(media: Path = MEDIA) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = defaultdict(list)
    with open(media / "identities.csv", newline="") as f:
        for row in csv.DictReader(f):
            out[row["identity"]].append(media / row["file"])
    return out


def face_tiles(engine, photos: list[Path]) -> list[tuple[Path, np.ndarray]]:  # noqa: ANN001
    """A TILE x TILE crop around the largest face of each photo (photos without a usable face are left out)."""
    import cv2

    from streamer.engine import load_image

    tiles = []
    for photo in photos:
        image = load_image(photo)
        faces = engine.detect(image)
        if not len(faces):
            continue
        x1, y1, x2, y2 = max(faces.boxes.tolist(), key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        side = 2.4 * max(x2 - x1, y2 - y1)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        # A generous square around the face, padded where it leaves the photo.
        pad = int(side)
        padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        left, top = int(cx - side / 2) + pad, int(cy - side / 2) + pad
        crop = padded[top:top + int(side), left:left + int(side)]
        if crop.size == 0 or min(x2 - x1, y2 - y1) < 40:
            continue
        tiles.append((photo, cv2.resize(crop, (TILE, TILE), interpolation=cv2.INTER_AREA)))
    return tiles


def compose(out_dir: Path, strangers: tuple[str, str] = DEFAULT_STRANGERS, known: str = DEFAULT_KNOWN,
            settings=None) -> tuple[dict[str, Path], list[Appearance], Path]:  # noqa: ANN001
    """Write one clip per stream of PLAN; returns {stream: clip}, every appearance, and the photo to enrol
    the known person from (never shown in the clips)."""
    import av

    from streamer.config import load_settings
    from streamer.engine import FaceEngine

    photos = photos_by_identity()
    out_dir.mkdir(parents=True, exist_ok=True)
    with FaceEngine(settings or load_settings()) as engine:
        tiles = {role: face_tiles(engine, photos[name]) for role, name in zip("AB", strangers)}
        known_tiles = face_tiles(engine, photos[known])
    if len(known_tiles) < 2 or any(len(t) < 2 for t in tiles.values()):
        raise SystemExit("each stranger and the known person need at least 2 photos with a face")
    enrol_photo, _ = known_tiles[0]
    tiles["K"] = known_tiles[1:]  # the clips show other photos of the known person than the enrolled one
    names = {"A": strangers[0], "B": strangers[1], "K": known}
    used = Counter()  # role -> appearances so far: each appearance takes the next photo
    clips, appearances = {}, []
    for stream, plan in PLAN.items():
        frames: list[np.ndarray] = []
        for segment in plan:
            start = len(frames)
            placed = []
            for slot, role in enumerate(segment):
                photo, tile = tiles[role][used[role] % len(tiles[role])]
                used[role] += 1
                x, y = SLOTS[slot] if len(segment) > 1 else SLOTS[(start // 7) % 2]
                placed.append((tile, x, y))
                appearances.append(Appearance(stream, names[role], role, str(photo.relative_to(MEDIA)), start,
                                              start + SEGMENT_FRAMES, x, y))
            for i in range(SEGMENT_FRAMES):
                canvas = np.full((HEIGHT, WIDTH, 3), 96, np.uint8)
                for tile, x, y in placed:
                    x += DRIFT_PX * i
                    canvas[y:y + TILE, x:x + TILE] = tile[:, : max(0, min(TILE, WIDTH - x))]
                frames.append(canvas)
            frames.extend(np.full((HEIGHT, WIDTH, 3), 96, np.uint8) for _ in range(GAP_FRAMES))
        path = out_dir / f"{stream}.mp4"
        with av.open(str(path), "w") as container:
            video = container.add_stream("libx264", rate=FPS)
            video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            video.options = {"crf": "18", "preset": "veryfast"}
            for image in frames:
                container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
            container.mux(video.encode(None))
        clips[stream] = path
    (out_dir / "truth.json").write_text(json.dumps({"appearances": [asdict(a) for a in appearances],
                                                    "enrolled": {known: str(enrol_photo.relative_to(MEDIA))}},
                                                   indent=1))
    return clips, appearances, enrol_photo


@dataclass(frozen=True)
class Measured:
    returning: int  # stranger appearances after each stranger's first identified one
    reidentified: int  # of those, how many carried an id this stranger had been given before
    first_id: int  # of those, how many carried the id of the stranger's first appearance
    false_merges: int  # stranger ids given to more than one person
    missed: int  # stranger appearances without any identity event
    known_as_stranger: int  # identity events of the enrolled person with a stranger id
    ids: dict[str, list[str]]  # person -> stranger id of each identified appearance, in order

    @property
    def rate(self) -> float:
        return self.reidentified / self.returning if self.returning else float("nan")


def measure(events: list, appearances: list[Appearance]) -> Measured:
    """From identity events (in publication order) and the truth."""
    per_appearance: dict[Appearance, str | None] = {}
    people_of: dict[str, set[str]] = defaultdict(set)
    known_as_stranger = 0
    for event in events:
        if event.kind != "identity":
            continue
        cx, cy = (event.box[0] + event.box[2]) / 2, (event.box[1] + event.box[3]) / 2
        hits = [a for a in appearances if a.stream == event.stream and a.contains(event.frame, cx, cy)]
        if len(hits) != 1:
            continue
        appearance = hits[0]
        if appearance.role == "K":
            known_as_stranger += event.stranger is not None
            continue
        if event.stranger is None or appearance in per_appearance:
            continue
        per_appearance[appearance] = event.stranger
        people_of[event.stranger].add(appearance.person)
    returning = reidentified = same_as_first = 0
    ids: dict[str, list[str]] = defaultdict(list)
    for appearance, stranger in per_appearance.items():  # in the order their first identity was published
        earlier = ids[appearance.person]
        if earlier:
            returning += 1
            reidentified += stranger in earlier
            same_as_first += stranger == earlier[0]
        earlier.append(stranger)
    strangers = [a for a in appearances if a.role != "K"]
    return Measured(returning, reidentified, same_as_first, sum(len(p) > 1 for p in people_of.values()),
                    sum(a not in per_appearance for a in strangers), known_as_stranger, dict(ids))


def free_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def run_pipeline(clips: list[Path], gallery: Path, env: dict[str, str] | None = None,
                 timeout_s: float = 240) -> tuple[int, list, str]:
    """`streamer run` over the clips (one stream each, in one run); (exit code, events, stderr)."""
    from streamer.publish.subscriber import EventSubscriber

    endpoint = free_endpoint()
    subscriber = EventSubscriber(endpoint, timeout_ms=200)
    command = [sys.executable, "-m", "streamer", "run", *map(str, clips), "--gallery", str(gallery),
               "--publish", endpoint, "-q"]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    events = []
    deadline = time.monotonic() + timeout_s
    try:
        while process.poll() is None and time.monotonic() < deadline:
            message = subscriber.receive_message(100)
            if message is not None:
                events.append(message.event)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            message = subscriber.receive_message(100)
            if message is not None:
                events.append(message.event)
    finally:
        if process.poll() is None:
            process.kill()
        subscriber.close()
    return process.wait(), events, process.stderr.read()


def enrol(gallery: Path, name: str, photo: Path, settings=None) -> None:  # noqa: ANN001
    from streamer.config import load_settings
    from streamer.engine import FaceEngine
    from streamer.match.gallery import Gallery

    with FaceEngine(settings or load_settings()) as engine, Gallery(gallery) as g:
        engine.enroll(g, name, [photo])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "out" / "stranger_clips"))
    parser.add_argument("--strangers", nargs=2, default=DEFAULT_STRANGERS, metavar="IDENTITY")
    parser.add_argument("--known", default=DEFAULT_KNOWN, metavar="IDENTITY")
    parser.add_argument("--measure", action="store_true", help="run the pipeline over the clips and measure")
    args = parser.parse_args()
    out = Path(args.out)
    clips, appearances, enrol_photo = compose(out, tuple(args.strangers), args.known)
    print(f"wrote {', '.join(map(str, clips.values()))} and {out / 'truth.json'}: {len(appearances)} appearances")
    if not args.measure:
        return
    gallery = out / "people.db"
    gallery.unlink(missing_ok=True)
    enrol(gallery, args.known, enrol_photo)
    code, events, stderr = run_pipeline(list(clips.values()), gallery)
    if code != 0:
        raise SystemExit(f"streamer run exited {code}:\n{stderr[-3000:]}")
    result = measure(events, appearances)
    print(f"strangers {args.strangers[0]} and {args.strangers[1]}, known {args.known}")
    print(f"returning stranger appearances: {result.returning}; got an id they had before: {result.reidentified} "
          f"({result.rate:.0%}); the id of their first appearance: {result.first_id}")
    print(f"false merges (an id given to two people): {result.false_merges}; stranger appearances without an "
          f"identity: {result.missed}; stranger ids on the enrolled person: {result.known_as_stranger}")
    for person, ids in result.ids.items():
        print(f"  {person}: {' '.join(ids)}")


if __name__ == "__main__":
    main()
