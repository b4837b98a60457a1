"""The `streamer` command line.

Errors a user can cause print one line to stderr and exit non-zero (2), never a traceback.
`--json` outputs are a contract other tools script against; keep their keys stable.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from streamer.errors import GalleryError, InputError, NoFaceError, StreamerError
from streamer.types import rounded_box

log = logging.getLogger("streamer")


# -- output helpers ---------------------------------------------------------------------------------
def _emit(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    sys.stdout.flush()


# -- settings -----------------------------------------------------------------------------------------
def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line flags as a nested settings dict (flags beat YAML and env vars)."""
    o: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if value is None:
            return
        node = o
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    put("model_dir", getattr(args, "model_dir", None))
    put("detector.name", getattr(args, "detector", None))
    put("embedder.name", getattr(args, "embedder", None))
    put("embedder.threshold", getattr(args, "threshold", None))
    put("runtime.device", getattr(args, "device", None))
    put("gallery.path", getattr(args, "gallery", None))
    if getattr(args, "allow_download", False):
        put("models.allow_download", True)
    if getattr(args, "allow_noncommercial", False):
        put("models.allow_noncommercial", True)
    return o


def _settings(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    from streamer.config import _nested_update, load_settings

    overrides = _overrides(args)
    if extra:
        overrides = _nested_update(overrides, extra)
    return load_settings(getattr(args, "config", None), overrides)


def _engine(args: argparse.Namespace):
    from streamer.engine import FaceEngine

    return FaceEngine(_settings(args))


# -- image commands --------------------------------------------------------------------------------------
def cmd_detect(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        faces = engine.detect(args.image)
        rows = [
            {
                "box": rounded_box(faces.boxes[i]),
                "score": round(float(faces.scores[i]), 4),
                "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in faces.landmarks[i]],
            }
            for i in range(len(faces))
        ]
    if args.json:
        _emit(rows)
    else:
        for row in rows:
            print(f"face at {row['box']} score {row['score']}")
        print(f"{len(rows)} face(s)")
    return 0


def cmd_represent(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        faces, embeddings = engine.represent(args.image)
        rows = [
            {
                "box": rounded_box(faces.boxes[i]),
                "score": round(float(faces.scores[i]), 4),
                "model": engine.embedder.spec.id,
                "embedding": [float(v) for v in embeddings[i]],
            }
            for i in range(len(faces))
        ]
    if args.json:
        _emit(rows)
    else:
        for row in rows:
            print(f"face at {row['box']}: {len(row['embedding'])}-D embedding ({row['model']})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.pairs:
        return _verify_pairs(args)
    if not (args.image_a and args.image_b):
        raise InputError("verify needs two images (IMG_A IMG_B) or --pairs PAIRS.csv")
    with _engine(args) as engine:
        result = engine.verify(args.image_a, args.image_b)
    if args.json:
        _emit(
            {
                "verified": result.verified,
                "distance": result.distance,
                "threshold": result.threshold,
                "model": result.model,
                "detector": result.detector,
                "metric": result.metric,
                "facial_areas": {"img_a": list(result.face_a), "img_b": list(result.face_b)},
            }
        )
    else:
        verdict = "same person" if result.verified else "different people"
        print(f"{verdict}: distance {result.distance:.4f} (threshold {result.threshold}, {result.model})")
    return 0


def _verify_pairs(args: argparse.Namespace) -> int:
    pairs_file = Path(args.pairs)
    if not pairs_file.is_file():
        raise InputError(f"{pairs_file}: no such file")
    root = Path(args.root) if args.root else pairs_file.parent
    with open(pairs_file, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"file_a", "file_b"} <= set(reader.fieldnames):
            raise InputError(f"{pairs_file}: expected CSV columns file_a,file_b (got {reader.fieldnames})")
        pairs = [(row["file_a"], row["file_b"]) for row in reader]
    cache: dict[str, Any] = {}
    with _engine(args) as engine:
        threshold = engine.embedder.spec.threshold

        def embedding(name: str):
            if name not in cache:
                try:
                    cache[name] = engine.embed_primary(root / name)[1]
                except StreamerError as exc:  # per-pair failure: reported, the run goes on
                    cache[name] = exc
            return cache[name]

        for file_a, file_b in pairs:
            a, b = embedding(file_a), embedding(file_b)
            row: dict[str, Any] = {"file_a": file_a, "file_b": file_b}
            problem = a if isinstance(a, Exception) else b if isinstance(b, Exception) else None
            if problem is not None:
                row.update(verified=False, distance=None, error=str(problem))
            else:
                distance = float(engine.embedder.distances(a[None], b[None])[0, 0])
                row.update(verified=distance < threshold, distance=round(distance, 6))
            if args.json:
                _emit(row)
            else:
                status = row.get("error") or ("same" if row["verified"] else "different")
                print(f"{file_a}\t{file_b}\t{row['distance']}\t{status}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        faces = engine.analyze(args.image)
    rows = [
        {"box": list(f.box), "score": f.score, **{k: v for k, v in f.attributes.as_dict().items() if v is not None}}
        for f in faces
    ]
    if args.json:
        _emit(rows)
    else:
        for row in rows:
            gender = row.get("gender", {}).get("label", "?")
            emotion = row.get("emotion", {}).get("label", "?")
            print(f"face at {row['box']}: age {row.get('age', '?')}, {gender}, {emotion}")
        print(f"{len(rows)} face(s)")
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        gallery = engine.open_gallery(args.gallery, create=False)
        try:
            found = engine.find(args.image, gallery)
        finally:
            gallery.close()
    rows = [
        {
            "box": list(f.box),
            "match": f.match,
            "score": f.match_score,
            "distance": f.distance,
            "detection_score": f.score,
        }
        for f in found
    ]
    if args.json:
        _emit(rows)
    else:
        for row in rows:
            print(f"face at {row['box']}: {row['match'] or 'unknown'} (score {row['score']})")
    return 0


# -- gallery ----------------------------------------------------------------------------------------
def _check_gallery_target(path: Path) -> None:
    """Fail before any model work when the gallery can't be written (and write nothing yet)."""
    if path.exists():
        if path.is_dir():
            raise GalleryError(f"gallery {path}: is a directory")
        if not os.access(path, os.W_OK):
            raise GalleryError(f"gallery {path}: not writable")
    else:
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise GalleryError(f"gallery {path}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise GalleryError(f"gallery {path}: directory {parent} is not writable")


def cmd_gallery(args: argparse.Namespace) -> int:
    from streamer.match.gallery import Gallery

    path = Path(args.gallery)
    if args.gallery_command in ("add", "import"):
        _check_gallery_target(path)
        if path.exists():
            Gallery(path, create=False).close()  # a JPEG passed as --gallery fails here, before any work
        with _engine(args) as engine:
            if args.gallery_command == "add":
                vectors, sources = engine.enrollment_embeddings(args.images)
                entries = [(args.name, vectors, sources)]
            else:
                entries = engine.folder_entries(args.folder)
            gallery = Gallery(path, create=True)
            try:
                gallery.add_many(entries, engine.embedder.spec.id)
            finally:
                gallery.close()
        for name, vectors, _ in entries:
            print(f"enrolled {name}: {len(vectors)} face(s)", file=sys.stderr)
        return 0

    gallery = Gallery(path, create=False)
    try:
        if args.gallery_command == "list":
            people = gallery.people()
            if args.json:
                _emit([{"name": p.name, "faces": p.faces, "models": list(p.embedder_ids)} for p in people])
            else:
                for p in people:
                    print(f"{p.name}\t{p.faces} face(s)")
        elif args.gallery_command == "remove":
            for name in args.names:
                gallery.remove(name)
                print(f"removed {name} and erased their embeddings", file=sys.stderr)
        elif args.gallery_command == "rename":
            gallery.rename(args.old, args.new)
            print(f"renamed {args.old} -> {args.new}", file=sys.stderr)
    finally:
        gallery.close()
    return 0


# -- models --------------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from streamer.models.registry import MODELS, ModelRegistry

    settings = _settings(args)
    registry = ModelRegistry(
        model_dir=settings.model_dir,
        cache_dir=settings.models.cache_dir,
        paths=settings.models.paths,
        allow_download=True if args.models_command == "pull" else settings.models.allow_download,
        allow_noncommercial=settings.models.allow_noncommercial,
    )
    if args.models_command == "list":
        rows = []
        for spec in MODELS.values():
            found = registry.locate(spec.name)
            rows.append(
                {
                    "name": spec.name,
                    "task": spec.task,
                    "file": spec.filename,
                    "sha256": spec.sha256,
                    "licence": spec.licence,
                    "commercial_use": spec.commercial_use,
                    "input": spec.input,
                    "origin": found.origin,
                    "path": str(found.source) if found.source else None,
                    "url": spec.url,
                }
            )
        if args.json:
            _emit(rows)
        else:
            for r in rows:
                where = r["path"] or ("missing (downloadable)" if r["url"] else "missing")
                flag = "" if r["commercial_use"] else "  [non-commercial, opt-in]"
                print(f"{r['name']:<13} {r['task']:<9} {r['origin']:<9} {where}\n{'':13} {r['licence']}{flag}")
        return 0
    names = args.names or [s.name for s in MODELS.values() if s.commercial_use or settings.models.allow_noncommercial]
    failed = 0
    for name in names:
        try:
            path = registry.resolve(name)
            print(f"{name}: {path}", file=sys.stderr)
        except StreamerError as exc:
            failed += 1
            print(f"{name}: {exc}", file=sys.stderr)
    return 1 if failed else 0


# -- stream commands --------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from streamer.pipeline.run import run_pipeline

    extra: dict[str, Any] = {}
    if args.sources:
        extra["sources"] = [{"url": url} for url in args.sources]
    if args.publish:
        extra["publish"] = {"endpoint": args.publish}
    output: dict[str, Any] = {}
    if args.output:
        output["path"] = args.output
    if args.blur_unknown:
        output["blur_unknown"] = True
    if args.preview:
        output["preview"] = True
    if output:
        extra["output"] = output
    settings = _settings(args, extra)
    if not settings.sources:
        raise InputError("no source given: streamer run SOURCE... (or sources: in the config file)")
    return run_pipeline(settings, progress=not args.quiet, print_events=args.print_events)


def cmd_inference_worker(args: argparse.Namespace) -> int:
    """A standalone inference worker (e.g. on a GPU host) that `streamer run` hosts reach through
    `inference.endpoint`; it serves any number of them until SIGINT/SIGTERM. It listens on loopback
    unless told otherwise, and beyond loopback only with CURVE keys (`streamer keys generate`)."""
    import signal

    from streamer.pipeline.inference_worker import InferenceWorker
    from streamer.sockets import ServerKeys

    extra: dict[str, Any] = {}
    if args.bind:
        extra["bind"] = args.bind
    if args.keys:
        extra["keys"] = args.keys
    settings = _settings(args, {"inference": extra} if extra else None)
    inference = settings.inference
    keys = ServerKeys.load(inference.keys, "inference.keys") if inference.keys else None
    worker = InferenceWorker(settings, inference.bind, keys=keys, setting="inference.bind")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, worker.stop)
    secured = "CURVE, listed clients only" if keys else "loopback only"
    print(f"inference worker on {worker.endpoint} ({worker.models.device}, {secured})", file=sys.stderr)
    worker.serve()
    return 0


def cmd_subscribe(args: argparse.Namespace) -> int:
    from streamer.publish.subscriber import print_events
    from streamer.sockets import ClientKeys, is_loopback

    if (args.server_key is None) != (args.client_key is None):
        given, missing = ("--server-key", "--client-key")
        if args.server_key is None:
            given, missing = missing, given
        raise InputError(
            f"subscribe: {given} needs {missing} too (both come from `streamer keys generate` on the publisher)"
        )
    keys = None
    if args.server_key is not None:
        keys = ClientKeys.load(
            args.client_key, args.server_key, secret_setting="--client-key", server_setting="--server-key"
        )
    elif not is_loopback(args.endpoint):
        log.warning("%s is not on this machine: a streamer publisher there lets in only CURVE clients "
                    "(--server-key and --client-key)", args.endpoint)
    print_events(args.endpoint, args.topic or [""], count=args.count, timeout=args.timeout, keys=keys)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """`streamer keys generate DIR`: CURVE keys for the event socket or a remote inference worker."""
    from streamer.sockets import PUBLIC_SUFFIX, SECRET_SUFFIX, generate_keys

    directory = Path(args.directory).expanduser()
    written = generate_keys(directory, args.client or ["client"])
    for path in written:
        is_server = path.parent == directory
        if is_server and path.name.endswith(SECRET_SUFFIX):
            where = "server secret: keep it on this host, never copy it"
        elif is_server:
            where = "server public key: copy to every client (--server-key, inference.server_key)"
        elif path.name.endswith(PUBLIC_SUFFIX):
            where = "allow-list entry: leave it here (delete it to lock that client out, then restart)"
        else:
            where = "client secret: move it to that client host (--client-key, inference.client_key)"
        print(f"{path}\t{where}")
    print(f"point the server at the folder: publish.keys: {directory} (streamer run) "
          f"or --keys {directory} (streamer inference-worker)")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from streamer.publish.events import events_json_schema

    _emit(events_json_schema())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from streamer.pipeline.bench import format_report, run_bench

    settings = _settings(args)
    result = run_bench(settings, args.source, max_frames=args.frames, live=args.live)
    if args.json:
        _emit(result)
    else:
        print(format_report(result))
    return 0


# -- parser -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML settings file (see configs/)")
    common.add_argument("--model-dir", help="folder holding model files (env STREAMER_MODEL_DIR)")
    common.add_argument("--detector", help="yunet (default), blazeface, scrfd_500m, scrfd_2.5g")
    common.add_argument("--embedder", help="dlib_resnet (default), mobilefacenet, arcface")
    common.add_argument("--threshold", type=float, help="override the embedder's distance threshold")
    common.add_argument("--device", choices=["auto", "cpu", "cuda"])
    common.add_argument("--allow-download", action="store_true", help="fetch missing models (sha256-checked)")
    common.add_argument("--allow-noncommercial", action="store_true", help="allow research-only models")
    common.add_argument("-v", "--verbose", action="count", default=0)

    parser = argparse.ArgumentParser(
        prog="streamer", description="Real-time face analytics: streams, images, gallery, events."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", parents=[common], help="process video sources and publish face events")
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="file, rtsp://, http(s)://, webcam:N, lavfi:GRAPH")
    p.add_argument("--gallery", help="gallery file of enrolled people")
    p.add_argument("--publish", help="ZeroMQ PUB endpoint (default tcp://127.0.0.1:5556)")
    p.add_argument("--output", help="write an annotated video (.mp4)")
    p.add_argument("--blur-unknown", action="store_true", help="blur faces not in the gallery in the output")
    p.add_argument("--preview", action="store_true", help="show a window (only when a display exists)")
    p.add_argument("--print-events", action="store_true", help="also print every published event on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "inference-worker", parents=[common], help="serve batched inference to `streamer run` hosts over tcp"
    )
    p.add_argument("--bind", help="endpoint to listen on (setting inference.bind, default tcp://127.0.0.1:5560); "
                   "beyond loopback it needs --keys")
    p.add_argument("--keys", help="keys folder from `streamer keys generate` (setting inference.keys): CURVE "
                   "encryption, only clients listed in its clients/ folder get in")
    p.set_defaults(func=cmd_inference_worker)

    p = sub.add_parser("subscribe", help="print events published by `streamer run`")
    p.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5556")
    p.add_argument("--topic", action="append", help="topic prefix, e.g. identity. or identity.cam1 (repeatable)")
    p.add_argument("--count", type=int, help="stop after this many events")
    p.add_argument("--timeout", type=float, help="stop after this many seconds without an event")
    p.add_argument("--server-key", metavar="FILE", help="the publisher's public key (server.key): CURVE")
    p.add_argument("--client-key", metavar="FILE", help="this client's secret key (clients/NAME.key_secret)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_subscribe)

    p = sub.add_parser("keys", help="CURVE keys for the event socket and remote inference workers")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = ksub.add_parser("generate", help="a server key pair and client key pairs, never overwriting")
    k.add_argument("directory", metavar="DIR", help="keys folder (created); clients go to DIR/clients")
    k.add_argument("--client", action="append", metavar="NAME", help="a client key pair (repeatable; default: client)")
    k.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("events", help="event format")
    p.add_argument("events_command", choices=["schema"], help="schema: print the JSON Schema of every event")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_events)

    for name, func, text in [
        ("detect", cmd_detect, "find faces in an image"),
        ("represent", cmd_represent, "embeddings of every face in an image (stays on your machine)"),
        ("analyze", cmd_analyze, "age, gender and emotion of every face in an image"),
    ]:
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("image")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("verify", parents=[common], help="are two faces the same person (1:1)")
    p.add_argument("image_a", nargs="?")
    p.add_argument("image_b", nargs="?")
    p.add_argument("--pairs", help="CSV with columns file_a,file_b: one JSON line per pair")
    p.add_argument("--root", help="folder the --pairs file names are relative to (default: the CSV's folder)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("find", parents=[common], help="who is in an image (1:N against a gallery)")
    p.add_argument("image")
    p.add_argument("--gallery", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_find)

    p = sub.add_parser("gallery", help="enrolled people")
    gsub = p.add_subparsers(dest="gallery_command", required=True, metavar="ACTION")
    g = gsub.add_parser("add", parents=[common], help="enroll a person from photos")
    g.add_argument("name")
    g.add_argument("images", nargs="+")
    g = gsub.add_parser("import", parents=[common], help="enroll a folder holding one sub-folder per person")
    g.add_argument("folder")
    g = gsub.add_parser("list", parents=[common], help="enrolled people and their face counts")
    g.add_argument("--json", action="store_true")
    g = gsub.add_parser("remove", parents=[common], help="delete people and erase their embeddings")
    g.add_argument("names", nargs="+", metavar="NAME")
    g = gsub.add_parser("rename", parents=[common], help="rename a person")
    g.add_argument("old")
    g.add_argument("new")
    for g in gsub.choices.values():
        g.add_argument("--gallery", required=True, help="gallery file (SQLite)")
    p.set_defaults(func=cmd_gallery)

    p = sub.add_parser("models", help="model files: where they resolve, licences, fetching")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    m = msub.add_parser("list", parents=[common], help="every model, where it resolves and its licence")
    m.add_argument("--json", action="store_true")
    m = msub.add_parser("pull", parents=[common], help="fetch/convert missing models (sha256-checked)")
    m.add_argument("names", nargs="*", metavar="NAME")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "bench",
        parents=[common],
        help="one clip, same models/frames/clock: decode, pipeline, serial tracked baseline, "
        "per-frame all-models baseline (InsightFace FaceAnalysis.get pattern), live latency",
        description="Passes: decode (ceiling); pipeline (two processes, batched); serial_tracked (same "
        "tracker and gate, one thread, no batching); per_frame_all_models (every model on every face on "
        "every frame, one thread: the InsightFace FaceAnalysis.get pattern); live (the clip as a camera, "
        "latency per event kind). Each is timed from the first frame read to the last result published.",
    )
    p.add_argument("source")
    p.add_argument("--frames", type=int, help="use at most this many frames (in every pass)")
    p.add_argument("--gallery", help="gallery file to match against (pipeline and both baselines)")
    p.add_argument(
        "--no-live",
        dest="live",
        action="store_false",
        help="skip the pass that replays the clip as a live camera (only the file pass's latency is shown)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def _quiet_native_logs() -> None:
    # MediaPipe (glog/absl) and TensorFlow Lite print INFO lines to stderr; users want one line on error.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


def main(argv: list[str] | None = None) -> int:
    _quiet_native_logs()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except NoFaceError as exc:
        print(f"streamer: error: {exc}", file=sys.stderr)
        return 3
    except StreamerError as exc:
        print(f"streamer: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `streamer subscribe | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
