"""The `streamer` command line.

Errors a user can cause, usage errors included, print one line to stderr and exit 2 (3: no face where one
was needed), never a traceback. `verify` exits like cmp/diff: 0 same person, 1 different people.
`--json` outputs are a contract other tools script against; their keys are the events' names (`name`,
`score`, `distance`) plus `detection_score`; keep them stable.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

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
    gallery = getattr(args, "gallery", None)
    if gallery is not None:  # a file or a postgresql:// URL; the flag replaces either from YAML or env
        from streamer.match.open import is_url

        o["gallery"] = {"url": gallery, "path": None} if is_url(gallery) else {"path": gallery, "url": None}
    arcface_model = getattr(args, "arcface_model", None)
    if arcface_model is not None:
        put("models.paths.arcface", arcface_model)
        put("embedder.name", "arcface" if getattr(args, "embedder", None) is None else None)
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
# Keys follow the published events: `name` and `score` are the matched person and the match confidence,
# `detection_score` the detector's confidence, `model` the embedder as the user names it.
def cmd_detect(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        faces = engine.detect(args.image)
        rows = [
            {
                "box": rounded_box(faces.boxes[i]),
                "detection_score": round(float(faces.scores[i]), 4),
                "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in faces.landmarks[i]],
            }
            for i in range(len(faces))
        ]
    if args.json:
        _emit(rows)
    else:
        for row in rows:
            print(f"face at {row['box']} detection score {row['detection_score']}")
        print(f"{len(rows)} face(s)")
    return 0


def cmd_represent(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        faces, embeddings = engine.represent(args.image)
        rows = [
            {
                "box": rounded_box(faces.boxes[i]),
                "detection_score": round(float(faces.scores[i]), 4),
                "model": engine.embedder_name,
                "model_id": engine.embedder.spec.id,
                "embedding": [float(v) for v in embeddings[i]],
            }
            for i in range(len(faces))
        ]
    if args.json:
        _emit(rows)
    else:
        for row in rows:
            print(f"face at {row['box']}: {len(row['embedding'])}-D embedding ({row['model']}, {row['model_id']})")
    return 0


# `verify` exits like cmp/diff: 0 same person, 1 different people, 2 (3: no face) when it could not tell.
SAME, DIFFERENT = 0, 1


def _verify_fields(result: Any) -> dict[str, Any]:
    return result.fields()


def _verdict(row: dict[str, Any]) -> str:
    verdict = "same person" if row["verified"] else "different people"
    return f"{verdict}: distance {row['distance']:.4f} (threshold {row['threshold']}, {row['model']})"


def cmd_verify(args: argparse.Namespace) -> int:
    if args.pairs:
        if args.image_a or args.image_b:
            raise InputError("verify takes two images or --pairs PAIRS.csv, not both")
        return _verify_pairs(args)
    if args.root:
        raise InputError("verify: --root only applies to --pairs")
    if not (args.image_a and args.image_b):
        raise InputError("verify needs two images (streamer verify IMG_A IMG_B) or --pairs PAIRS.csv")
    with _engine(args) as engine:
        row = _verify_fields(engine.verify(args.image_a, args.image_b))
    if args.json:
        _emit(row)
    else:
        print(_verdict(row))
    return SAME if row["verified"] else DIFFERENT


def _verify_pairs(args: argparse.Namespace) -> int:
    """One line per pair with the fields of a single `verify`; a pair that cannot be compared gets
    `verified: null` and `error`, the others go on, and the exit code is 2 when any pair failed.
    A "different people" pair is a result, not a failure."""
    pairs_file = Path(args.pairs)
    if not pairs_file.is_file():
        raise InputError(f"{pairs_file}: no such file")
    root = Path(args.root) if args.root else pairs_file.parent
    with open(pairs_file, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"file_a", "file_b"} <= set(reader.fieldnames):
            raise InputError(f"{pairs_file}: expected CSV columns file_a,file_b (got {reader.fieldnames})")
        pairs = [(row["file_a"], row["file_b"]) for row in reader]
    if not pairs:
        raise InputError(f"{pairs_file}: no pairs (expected a header file_a,file_b and one row per pair)")
    cache: dict[str, Any] = {}
    failed = 0
    with _engine(args) as engine:

        def primary(name: str):
            if name not in cache:
                try:
                    cache[name] = engine.embed_primary(root / name)
                except StreamerError as exc:  # per-pair failure: reported, the run goes on
                    cache[name] = exc
            return cache[name]

        for file_a, file_b in pairs:
            a, b = primary(file_a), primary(file_b)
            row: dict[str, Any] = {"file_a": file_a, "file_b": file_b}
            problem = a if isinstance(a, Exception) else b if isinstance(b, Exception) else None
            if problem is None:
                row.update(_verify_fields(engine.compare(a, b)))
            else:
                failed += 1
                spec = engine.embedder.spec
                row.update(
                    verified=None, distance=None, threshold=spec.threshold, model=engine.embedder_name,
                    model_id=spec.id, detector=engine.detector.name, metric=spec.metric, facial_areas=None,
                    error=str(problem),
                )
            if args.json:
                _emit(row)
            else:
                outcome = f"error: {row['error']}" if problem is not None else _verdict(row)
                print(f"{file_a}\t{file_b}\t{outcome}")
    if failed:
        print(f"streamer: error: {failed} of {len(pairs)} pairs could not be compared (see their error)",
              file=sys.stderr)
        return 2
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        faces = engine.analyze(args.image)
    rows = [
        {
            "box": list(f.box),
            "detection_score": f.detection_score,
            **{k: v for k, v in f.attributes.as_dict().items() if v is not None},
        }
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
        from streamer.match.open import is_url

        found = engine.find(args.image, args.gallery if is_url(args.gallery) else Path(args.gallery))
    rows = [
        {"box": list(f.box), "detection_score": f.detection_score, "name": f.name, "score": f.score,
         "distance": f.distance}
        for f in found
    ]
    if args.json:
        _emit(rows)
    else:
        for row in rows:
            print(f"face at {row['box']}: {row['name'] or 'unknown'} (score {row['score']})")
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
    """`import` enrols every photo that works and reports each one left out: exit 2 when any photo failed
    (unreadable, no face, several faces without --face, refused for quality), 0 when only stray non-image
    files or empty folders were skipped."""
    if args.gallery_command == "promote":
        return _cmd_gallery_promote(args)
    from streamer.engine import content_hash
    from streamer.match.open import is_url, open_gallery

    url = is_url(args.gallery)  # a shared PostgreSQL gallery: opened (and for add/import made) up front
    path = args.gallery if url else Path(args.gallery)
    if args.gallery_command in ("add", "import", "reject"):
        if not url:
            _check_gallery_target(path)
        if url or path.exists():
            # A JPEG passed as --gallery, or a bad URL or password, fails here, before any work.
            open_gallery(path, create=url and args.gallery_command != "reject").close()
        elif args.gallery_command == "reject":
            raise GalleryError(f"gallery {path} does not exist: enrol {args.name} first (streamer gallery add)")
        skipped: list[tuple[str, str]] = []
        failed: list[tuple[str, str]] = []
        with _engine(args) as engine:
            if args.gallery_command == "reject":
                vectors, sources = engine.enrollment_embeddings(args.images)
                hashes = [content_hash(image) for image in args.images]
                with open_gallery(path, create=False) as gallery:
                    done = gallery.reject(args.name, vectors, engine.embedder.spec.id, sources, hashes)
                _report_duplicates(done.duplicates, f"already rejected for {done.person.name}")
                print(f"recorded {done.added} face(s) as not {done.person.name}", file=sys.stderr)
                return 0
            if args.gallery_command == "add":
                vectors, sources = engine.enrollment_embeddings(args.images, args.face, checked=True)
                entries = [(args.name, vectors, sources, [content_hash(image) for image in args.images])]
            else:
                found = engine.folder_entries(args.folder, args.face)
                entries, skipped, failed = found.entries, found.skipped, found.failed
            gallery = open_gallery(path, create=True)
            try:
                done_all = gallery.enrol(entries, engine.embedder.spec.id)
            finally:
                gallery.close()
        for done in done_all:
            _report_duplicates(done.duplicates, f"already enrolled for {done.person.name}")
            print(f"enrolled {done.person.name}: {done.added} face(s)", file=sys.stderr)
        if args.gallery_command == "import":
            for file, reason in skipped:
                print(f"streamer: warning: skipped {file}: {reason}", file=sys.stderr)
            for file, reason in failed:
                print(f"streamer: error: {file}: {reason}", file=sys.stderr)
            new_people = sum(1 for d in done_all if d.added and d.person.faces == d.added)
            faces = sum(d.added for d in done_all)
            duplicates = sum(len(d.duplicates) for d in done_all)
            print(f"imported {faces} face(s), {new_people} new people; skipped {duplicates} already enrolled, "
                  f"{len(skipped)} not photos or empty; {len(failed)} failed", file=sys.stderr)
            return 2 if failed else 0
        return 0

    gallery = open_gallery(path, create=False, readonly=args.gallery_command == "list")
    try:
        if args.gallery_command == "list":
            people = gallery.people()
            if args.json:
                _emit([{"name": p.name, "faces": p.faces, "negatives": p.negatives, "models": list(p.embedder_ids)}
                       for p in people])
            else:
                for p in people:
                    rejected = f", {p.negatives} rejected" if p.negatives else ""
                    print(f"{p.name}\t{p.faces} face(s){rejected}")
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


def _cmd_gallery_promote(args: argparse.Namespace) -> int:
    """Enrol a stranger's best faces (u-17) under NAME: asked of the running pipeline that matches against
    this gallery (its admin channel), else read from recognition.strangers_file when that is set."""
    import numpy as np

    from streamer.match.open import describe, is_url, location, open_gallery
    from streamer.match.strangers import StrangerStore, enrol_stranger, stranger_number
    from streamer.pipeline import admin

    try:
        stranger_number(args.stranger)
    except ValueError as exc:
        raise InputError(f"gallery promote: {exc}") from None
    settings = _settings(args)
    where = location(settings.gallery)  # --gallery is in there too, as a path or a URL
    if where is None:
        raise InputError("gallery promote: which gallery? pass --gallery FILE or URL (the one the pipeline runs with)")
    url = is_url(where.get_secret_value() if hasattr(where, "get_secret_value") else where)
    path = where if url else Path(where)
    if not url:
        _check_gallery_target(path)
    embedder, faces, asked, source = None, [], [], None
    for pipeline in admin.find_pipelines(path):
        try:
            reply = admin.ask(pipeline.endpoint, admin.StrangerFacesRequest(stranger=args.stranger))
        except (admin.AdminUnavailable, ValueError) as exc:
            log.warning("pipeline %d: %s", pipeline.pid, exc)
            continue
        asked.append(pipeline)
        if reply.faces:
            embedder, faces = reply.embedder, [(np.asarray(f.embedding, np.float32), f.stream) for f in reply.faces]
            source = pipeline
            break
    store_file = settings.recognition.strangers_file
    if not faces and store_file is not None and Path(store_file).is_file():
        store = StrangerStore(store_file, readonly=True)
        try:
            embedder, stored, _ = store.read(args.stranger)
        finally:
            store.close()
        faces = [(f.embedding, f.stream) for f in stored]
    if not faces:
        if asked or store_file is not None:
            raise InputError(f"gallery promote: no stranger {args.stranger} in "
                             + ("the running pipeline" if asked else f"recognition.strangers_file {store_file}")
                             + " (strangers are forgotten after recognition.unknown_ttl_s; identity events carry "
                             "the current ids)")
        raise InputError(f"gallery promote: no running pipeline with this gallery ({describe(path)}) and no "
                         "recognition.strangers_file: strangers live in a running `streamer run --gallery "
                         f"{describe(path)}` only")
    with open_gallery(path, create=True) as gallery:
        done = enrol_stranger(gallery, args.name, args.stranger, faces, embedder)
    _report_duplicates(done.duplicates, f"already enrolled for {done.person.name}")
    print(f"enrolled {done.person.name}: {done.added} face(s) of stranger {args.stranger}", file=sys.stderr)
    # The stranger is a person now: its id is done (a running pipeline names the next sighting after its reload).
    if source is not None:
        try:
            admin.ask(source.endpoint, admin.ForgetStrangerRequest(stranger=args.stranger))
        except (admin.AdminUnavailable, ValueError) as exc:
            log.warning("the pipeline did not drop %s: %s", args.stranger, exc)
    elif store_file is not None:
        store = StrangerStore(store_file)
        try:
            store.delete(stranger_number(args.stranger))
        finally:
            store.close()
    return 0


def _report_duplicates(sources: tuple[str | None, ...], why: str) -> None:
    for source in sources:
        print(f"streamer: skipped {source or 'a photo'}: the same photo is {why}", file=sys.stderr)


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
    _check_files_exist(settings.sources)
    _check_gallery_embedder(settings)
    return run_pipeline(settings, progress=not args.quiet, print_events=args.print_events)


def _check_gallery_embedder(settings: Any) -> None:
    """A missing gallery, or one enrolled with another embedder, fails now in one line, not after the models
    load (and never as "unknown" for everyone)."""
    from streamer.match.open import location, open_gallery

    if location(settings.gallery) is None:
        return
    from streamer.match.matcher import check_embedder
    from streamer.models.factory import ModelFactory

    with open_gallery(settings.gallery, create=False, readonly=True) as gallery:
        check_embedder(gallery, ModelFactory(settings).embedder_spec.id)


def _check_files_exist(sources: list[Any]) -> None:
    """A mistyped file name is the commonest first error: say so now, not after the models load."""
    from streamer.sources import parse_url

    for source in sources:
        parsed = parse_url(source.url)
        if parsed.kind == "file" and not Path(parsed.target).is_file():
            where = "is a folder, not a video file" if Path(parsed.target).is_dir() else "does not exist"
            raise InputError(f"video file {parsed.target} {where}: check the path (relative paths are from {Path.cwd()})")


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
    from streamer.publish.nats_subscriber import is_nats_url, print_nats_events
    from streamer.publish.subscriber import print_events
    from streamer.sockets import ClientKeys, is_loopback

    nats_only = [flag for flag, value in (("--since", args.since), ("--durable", args.durable), ("--kind", args.kind),
                                          ("--js-stream", args.js_stream)) if value]
    if is_nats_url(args.endpoint):
        if args.server_key is not None or args.client_key is not None:
            raise InputError("subscribe: --server-key/--client-key are for ZeroMQ endpoints; NATS takes "
                             "nats://USER:PASSWORD@HOST:PORT or tls://...")
        print_nats_events(args.endpoint, args.topic or [""], kinds=args.kind or [], since_s=args.since,
                          durable=args.durable, stream=args.js_stream or "STREAMER", count=args.count,
                          timeout=args.timeout)
        return 0
    if nats_only:
        raise InputError(f"subscribe: {nats_only[0]} is for a NATS JetStream endpoint (nats://HOST:PORT)")
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


def cmd_serve(args: argparse.Namespace) -> int:
    """`streamer serve`: the pipeline and the web console/REST API in one process (streamer.serve)."""
    from streamer.serve.server import run_serve

    extra: dict[str, Any] = {}
    if args.sources:
        extra["sources"] = [{"url": url} for url in args.sources]
    if args.blur_unknown:
        extra["output"] = {"blur_unknown": True}
    if args.bind:
        extra["serve"] = {"bind": args.bind}
    settings = _settings(args, extra)
    _check_files_exist(settings.sources)
    # The console can create the gallery (enrol from an upload); only one that exists is checked now.
    if settings.gallery.url is not None:  # a bad URL or password fails now; an empty database gets the schema
        from streamer.match.open import open_gallery

        open_gallery(settings.gallery, create=True).close()
        _check_gallery_embedder(settings)
    elif settings.gallery.path is not None and Path(settings.gallery.path).exists():
        _check_gallery_embedder(settings)
    elif settings.gallery.path is not None:
        _check_gallery_target(Path(settings.gallery.path))
    return run_serve(settings, args.config)


def cmd_tokens(args: argparse.Namespace) -> int:
    """`streamer tokens create|list|revoke`: the API tokens of `streamer serve` (the same store it uses)."""
    from streamer.serve.auth import TokenStore, store_path

    store = TokenStore(store_path(_settings(args), getattr(args, "config", None)))
    if args.tokens_command == "create":
        record, token = store.create(args.name)
        print(f"created token {record.id} ({record.name}) in {store.path}; it is shown only now:", file=sys.stderr)
        print(token)
    elif args.tokens_command == "list":
        rows = [r.public() for r in store.records()]
        if args.json:
            _emit(rows)
        else:
            for row in rows:
                print(f"{row['id']}\t{row['name']}\t{row['created']}")
            if not rows:
                print(f"no tokens in {store.path}", file=sys.stderr)
    else:
        for record in store.revoke(args.token):
            print(f"revoked token {record.id} ({record.name}); its sessions end at their next request",
                  file=sys.stderr)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from streamer.publish.events import events_json_schema

    _emit(events_json_schema())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from streamer.pipeline.bench import format_report, run_bench

    settings = _settings(args)
    if args.streams is not None:  # many live copies per detect-worker count, instead of the five passes
        from streamer.pipeline.bench import format_streams_report, streams_bench

        result = streams_bench(settings, args.source, args.streams, args.workers or ["auto"],
                               max_frames=args.frames)
        if args.json:
            _emit(result)
        else:
            print(format_streams_report(result))
        return 0
    result = run_bench(settings, args.source, max_frames=args.frames, live=args.live)
    if args.json:
        _emit(result)
    else:
        print(format_report(result))
    return 0


def _worker_counts(text: str) -> list[int | str]:
    """--workers 1,2,auto: detect-worker counts for `bench --streams`."""
    from streamer.config import MAX_DETECT_WORKERS

    counts: list[int | str] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "auto":
            counts.append(part)
        elif part.isdigit() and 1 <= int(part) <= MAX_DETECT_WORKERS:
            counts.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"expected counts from 1 to {MAX_DETECT_WORKERS} or auto, "
                                             f"comma-separated (e.g. 1,2), got {text!r}")
    return counts


# -- parser -------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help, as argparse.ArgumentDefaultsHelpFormatter does, except where
    the default is "unset" (None/False): those flags fall back to a setting and their help names its
    default. Raw description/epilog, so the examples keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default == []
        flag = action.nargs == 0  # on/off switches and -v: their help says what they change
        if "%(default)" in text or unset or flag:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line with where to look, exit 2 (argparse's own prints the whole usage first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"streamer: error: {message}; see `{self.prog} --help`\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        # argparse reports leftovers from the top parser; point at the help of the command that got them.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            prog = getattr(parsed, "command_prog", self.prog)
            self.exit(2, f"streamer: error: unrecognized arguments: {' '.join(extras)}; see `{prog} --help`\n")
        return parsed


def _whole_number(remedy: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < 1:
            raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r} ({remedy})")
        return value

    return parse


def _face_choice(text: str) -> str | int:
    if text == "largest":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected 'largest' or a face number >= 1 (counted left to right), got {text!r}"
        )
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r} (leave it out to wait forever)")
    return value


def _since(text: str) -> float:
    from streamer.publish.nats_subscriber import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _example(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


_FACE_HELP = (
    "which face to enrol from a photo with several (without it such a photo is refused): 'largest', or N, "
    "counting faces from 1 by the centre of their box, left to right. Each face must also be large, sharp "
    "and frontal enough (settings enrolment.min_face_px, min_sharpness, max_yaw_deg)"
)


def build_parser() -> argparse.ArgumentParser:
    from typing import get_args

    from streamer import __version__
    from streamer.config import (
        DetectorSettings,
        EmbedderSettings,
        InferenceSettings,
        PublishSettings,
        ServeSettings,
    )

    detectors = ", ".join(get_args(DetectorSettings.model_fields["name"].annotation))
    verbose = _Parser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="count", default=0, help="more log lines: -v info, -vv debug")

    # Options that build the settings tree (flags beat environment variables, which beat the YAML file).
    settings_opts = _Parser(add_help=False, parents=[verbose])
    settings_opts.add_argument(
        "--config", metavar="FILE", help="YAML settings file (see configs/); environment variables and flags win"
    )
    settings_opts.add_argument(
        "--model-dir", metavar="DIR", help="folder holding the model files (setting model_dir, env STREAMER_MODEL_DIR)"
    )
    settings_opts.add_argument(
        "--allow-download", action="store_true",
        help="download missing models, sha256-checked, into the cache (setting models.allow_download)",
    )
    settings_opts.add_argument(
        "--allow-noncommercial", action="store_true",
        help="allow models licensed for non-commercial use only: scrfd_500m, scrfd_2.5g, mobilefacenet "
        "(setting models.allow_noncommercial)",
    )
    # ... and the models that look at faces.
    face_opts = _Parser(add_help=False, parents=[settings_opts])
    face_opts.add_argument(
        "--detector", metavar="NAME",
        help=f"face detector: {detectors} (default: {DetectorSettings().name}; setting detector.name)",
    )
    face_opts.add_argument(
        "--embedder", metavar="NAME",
        help="face embedder: dlib_resnet, mobilefacenet, or arcface with --arcface-model "
        f"(default: {EmbedderSettings().name}; setting embedder.name)",
    )
    face_opts.add_argument(
        "--arcface-model", metavar="PATH",
        help="an ArcFace-family .onnx model (insightface w600k, glint360k, MobileFaceNet exports; setting "
        "models.paths.arcface); implies --embedder arcface",
    )
    face_opts.add_argument(
        "--threshold", type=float, metavar="DISTANCE",
        help="two faces are the same person below this embedding distance (default: the embedder's own, "
        "0.6 for dlib_resnet; setting embedder.threshold)",
    )
    face_opts.add_argument(
        "--device", choices=["auto", "cpu", "cuda"],
        help="where models run: auto takes CUDA when it really loads, else the CPU; cuda makes a missing "
        "CUDA an error (default: auto; setting runtime.device)",
    )

    parser = _Parser(
        prog="streamer",
        description="Real-time face analytics: streams, images, gallery, events.",
        epilog="Each command has its own --help with its options and an example.\n\n"
        + _example("streamer gallery add \"Ada Lovelace\" ada1.jpg --gallery people.db",
                   "streamer run rtsp://10.0.0.5/stream1 --gallery people.db --print-events"),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(group: Any, name: str, text: str, example: str | tuple[str, ...], parents: tuple = (verbose,),
                description: str | None = None) -> argparse.ArgumentParser:
        lines = (example,) if isinstance(example, str) else example
        made = group.add_parser(
            name, parents=list(parents), help=text, description=description or text, epilog=_example(*lines)
        )
        made.set_defaults(command_prog=made.prog)
        return made

    p = command(sub, "run", "process video sources and publish face events",
                "streamer run rtsp://10.0.0.5/stream1 --gallery people.db --output annotated.mp4",
                parents=(face_opts,),
                description="Process video sources and publish face events on a ZeroMQ PUB socket.\n"
                "Exit status: 0 when the input ended or you stopped it (Ctrl-C, SIGTERM), 2 for a bad setting, "
                "model or source,\n1 when a worker keeps crashing.")
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="file, rtsp://, http(s)://, webcam:N, lavfi:GRAPH (default: sources: in --config)")
    p.add_argument("--gallery", metavar="FILE",
                   help="gallery of enrolled people: a file or a postgresql:// URL (setting gallery.path or gallery.url); without one every face is unknown")
    p.add_argument("--publish", metavar="ENDPOINT",
                   help=f"ZeroMQ PUB endpoint for events (default: {PublishSettings().endpoint}; "
                   "setting publish.endpoint)")
    p.add_argument("--output", metavar="FILE.mp4",
                   help="write an annotated video; with several sources one file per stream, FILE-STREAM.mp4 "
                   "(setting output.path)")
    p.add_argument("--blur-unknown", action="store_true",
                   help="blur faces not in the gallery in the annotated video (setting output.blur_unknown)")
    p.add_argument("--preview", action="store_true",
                   help="show a window, when a display exists (setting output.preview)")
    p.add_argument("--print-events", action="store_true", help="also print every published event on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = command(sub, "inference-worker", "serve batched inference to `streamer run` hosts over tcp",
                "streamer inference-worker --bind tcp://0.0.0.0:5560 --keys /etc/streamer/keys",
                parents=(face_opts,))
    p.add_argument("--bind", metavar="ENDPOINT",
                   help=f"endpoint to listen on (default: {InferenceSettings().bind}; setting inference.bind); "
                   "beyond loopback it needs --keys")
    p.add_argument("--keys", metavar="DIR",
                   help="keys folder from `streamer keys generate` (setting inference.keys): CURVE encryption, "
                   "only clients listed in its clients/ folder get in")
    p.set_defaults(func=cmd_inference_worker)

    p = command(sub, "subscribe", "print events published by `streamer run`",
                "streamer subscribe tcp://127.0.0.1:5556 --topic identity. --count 10")
    p.add_argument("endpoint", nargs="?", default=PublishSettings().endpoint,
                   help="the publisher's endpoint, or nats://[USER:PASSWORD@]HOST:PORT for its JetStream stream")
    p.add_argument("--topic", action="append", metavar="PREFIX",
                   help="topic prefix, e.g. identity. or identity.cam1; repeatable (default: every event)")
    p.add_argument("--count", type=_whole_number("leave --count out to print events until stopped"), metavar="N",
                   help="stop after this many events (default: never)")
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                   help="stop after this many seconds without an event (default: wait forever)")
    p.add_argument("--server-key", metavar="FILE", help="the publisher's public key (server.key): CURVE")
    p.add_argument("--client-key", metavar="FILE", help="this client's secret key (clients/NAME.key_secret)")
    p.add_argument("--since", type=_since, metavar="DURATION",
                   help="nats:// only: replay the stream from this long ago (90s, 10m, 2h, 1d), then go on live")
    p.add_argument("--durable", metavar="NAME",
                   help="nats:// only: a consumer kept on the server; the next run with this name resumes after "
                   "the last event printed (a new one starts at --since, else at the stream's first event)")
    p.add_argument("--kind", action="append", metavar="KIND",
                   help="nats:// only: events of this kind, e.g. identity; repeatable (default: every kind)")
    p.add_argument("--js-stream", metavar="NAME", help="nats:// only: the JetStream stream (default STREAMER; "
                   "setting publish.nats.stream of the publisher)")
    p.set_defaults(func=cmd_subscribe)

    p = command(sub, "keys", "CURVE keys for the event socket and remote inference workers",
                "streamer keys generate keys/ --client dashboard", parents=())
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = command(ksub, "generate", "a server key pair and client key pairs, never overwriting",
                "streamer keys generate /etc/streamer/keys --client dashboard --client cam-host-1")
    k.add_argument("directory", metavar="DIR", help="keys folder (created); clients go to DIR/clients")
    k.add_argument("--client", action="append", metavar="NAME",
                   help="a client key pair; repeatable (default: one named client)")
    p.set_defaults(func=cmd_keys)

    p = command(sub, "serve", "the pipeline plus a web console and REST API (token required)",
                ("streamer serve rtsp://10.0.0.5/stream1 --gallery people.db",
                 "streamer serve --gallery people.db --bind 127.0.0.1:8080    # add sources from the console"),
                parents=(face_opts,),
                description="Run the pipeline and serve the web console and REST API v1 (OpenAPI at /docs).\n"
                "The first start creates an admin token and prints it once; keep it (`streamer tokens` makes more).\n"
                "Exit status: 0 when you stopped it (Ctrl-C, SIGTERM), 2 for a bad setting, model, source or port.")
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="file, rtsp://, http(s)://, webcam:N, lavfi:GRAPH (default: sources: in --config; none: "
                   "add them from the console)")
    p.add_argument("--gallery", metavar="FILE",
                   help="gallery of enrolled people: a file or a postgresql:// URL (setting gallery.path or "
                   "gallery.url); created by the first enrolment")
    p.add_argument("--bind", metavar="HOST:PORT",
                   help=f"where the console listens (default: {ServeSettings().bind}; setting serve.bind)")
    p.add_argument("--blur-unknown", action="store_true",
                   help="blur faces not in the gallery in the live view (setting output.blur_unknown)")
    p.set_defaults(func=cmd_serve)

    p = command(sub, "tokens", "API tokens of `streamer serve`", "streamer tokens create kiosk --gallery people.db",
                parents=())
    tsub = p.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    t = command(tsub, "create", "a new token, printed once on the last line",
                "streamer tokens create dashboard --gallery people.db | tail -n1")
    t.add_argument("name", nargs="?", default="token", help="what the token is for (shown by list and /api/v1/me)")
    t = command(tsub, "list", "tokens (ids, names, creation times; never the tokens)",
                "streamer tokens list --gallery people.db")
    t.add_argument("--json", action="store_true", help="one JSON list on stdout")
    t = command(tsub, "revoke", "delete a token by id or name", "streamer tokens revoke 3f2a9c1d --gallery people.db")
    t.add_argument("token", metavar="ID|NAME", help="the token's id (from list) or name (every token of that name)")
    for t in tsub.choices.values():
        t.add_argument("--config", metavar="FILE", help="YAML settings file: serve.token_store, gallery.path")
        t.add_argument("--gallery", metavar="FILE",
                       help="the gallery `streamer serve` uses: the store is beside a file (FILE.tokens.json); "
                       "for a postgresql:// URL beside --config, else in ~/.config/streamer/; serve.token_store "
                       "overrides both")
    p.set_defaults(func=cmd_tokens)

    p = command(sub, "events", "event format", "streamer events schema > streamer-events.schema.json")
    p.add_argument("events_command", choices=["schema"], metavar="schema",
                   help="print the JSON Schema of every event")
    p.set_defaults(func=cmd_events)

    for name, func, text, example in [
        ("detect", cmd_detect, "find faces in an image", "streamer detect group.jpg --json"),
        ("represent", cmd_represent, "embeddings of every face in an image (stays on your machine)",
         "streamer represent face.jpg --embedder mobilefacenet --allow-noncommercial --json"),
        ("analyze", cmd_analyze, "age, gender and emotion of every face in an image",
         "streamer analyze group.jpg --json"),
    ]:
        p = command(sub, name, text, example, parents=(face_opts,))
        p.add_argument("image", help="image file (JPEG, PNG, ...)")
        p.add_argument("--json", action="store_true", help="one JSON list of faces on stdout")
        p.set_defaults(func=func)

    p = command(sub, "verify", "are two faces the same person (1:1)",
                ("streamer verify a.jpg b.jpg && echo same person",
                 "streamer verify --pairs pairs.csv --root photos/ --json"),
                parents=(face_opts,),
                description="Are two faces the same person (1:1)? The largest face of each image is compared.\n"
                "Exit status, like cmp and diff: 0 same person, 1 different people, 2 error (3: no face found).\n"
                "With --pairs: 0 when every pair was compared (same or different), 2 when any pair failed.")
    p.add_argument("image_a", nargs="?", metavar="IMG_A", help="first image")
    p.add_argument("image_b", nargs="?", metavar="IMG_B", help="second image")
    p.add_argument("--pairs", metavar="CSV",
                   help="CSV with columns file_a,file_b: one line per pair, with the fields of a single verify")
    p.add_argument("--root", metavar="DIR",
                   help="folder the --pairs file names are relative to (default: the CSV's folder)")
    p.add_argument("--json", action="store_true", help="JSON on stdout (one object per line with --pairs)")
    p.set_defaults(func=cmd_verify)

    p = command(sub, "find", "who is in an image (1:N against a gallery)",
                "streamer find group.jpg --gallery people.db --json", parents=(face_opts,))
    p.add_argument("image", help="image file (JPEG, PNG, ...)")
    p.add_argument("--gallery", required=True, metavar="FILE",
                   help="gallery (from `streamer gallery add`): a file or a postgresql:// URL")
    p.add_argument("--json", action="store_true", help="one JSON list of faces on stdout")
    p.set_defaults(func=cmd_find)

    p = command(sub, "gallery", "enrolled people", "streamer gallery list --gallery people.db", parents=())
    gsub = p.add_subparsers(dest="gallery_command", required=True, metavar="ACTION")
    # add and import embed faces, so they take the model options; list, remove and rename only read or
    # edit the file.
    g = command(gsub, "add", "enroll a person from photos",
                'streamer gallery add "Ada Lovelace" ada1.jpg ada2.jpg --gallery people.db', parents=(face_opts,))
    g.add_argument("name", help="the person's name, as events and find report it")
    g.add_argument("images", nargs="+", metavar="IMAGE",
                   help="photos of that person, one good face in each (see --face for group photos)")
    g.add_argument("--face", type=_face_choice, metavar="largest|N", help=_FACE_HELP)
    g = command(gsub, "import", "enroll a folder holding one sub-folder per person",
                "streamer gallery import photos/ --gallery people.db    # photos/Ada Lovelace/1.jpg, ...",
                parents=(face_opts,),
                description="Enroll a folder holding one sub-folder per person. Every photo that works is "
                "enrolled; photos already enrolled (same content) add nothing; stray non-image files and empty "
                "folders are skipped with a warning; each photo that fails (unreadable, no face, several faces, a face "
                "too small, blurred or turned away) is reported. "
                "Exit status 2 when any photo failed, 0 otherwise.")
    g.add_argument("folder", help="folder of sub-folders, each named after the person whose photos it holds")
    g.add_argument("--face", type=_face_choice, metavar="largest|N", help=_FACE_HELP)
    g = command(gsub, "reject", "record photos of someone who is NOT this person (a look-alike)",
                'streamer gallery reject "Ada Lovelace" not-ada.jpg --gallery people.db', parents=(face_opts,),
                description="Record faces that are NOT this person (negative examples). A face nearer to "
                "these than to the person's own enrolled faces is never named as them. Removing the person "
                "erases these too.")
    g.add_argument("name", help="the enrolled person these photos are not")
    g.add_argument("images", nargs="+", metavar="IMAGE", help="photos of someone else (the largest face in each)")
    g = command(gsub, "list", "enrolled people and their face counts",
                "streamer gallery list --gallery people.db --json")
    g.add_argument("--json", action="store_true", help="one JSON list on stdout")
    g = command(gsub, "remove", "delete people and erase their embeddings",
                'streamer gallery remove "Ada Lovelace" --gallery people.db')
    g.add_argument("names", nargs="+", metavar="NAME", help="people to delete")
    g = command(gsub, "rename", "rename a person", 'streamer gallery rename Ada "Ada Lovelace" --gallery people.db')
    g.add_argument("old", help="the enrolled name")
    g.add_argument("new", help="the new name")
    for g in gsub.choices.values():
        g.add_argument("--gallery", required=True, metavar="FILE", help="gallery file (SQLite) or postgresql:// URL (shared)")
    # After the loop: its --gallery may come from the settings (gallery.path or gallery.url) too.
    g = command(gsub, "promote", "enrol a stranger (an id like u-17 from identity events) under a name",
                "streamer gallery promote u-17 \"Ada Lovelace\" --gallery people.db", parents=(settings_opts,),
                description="Enrol the best faces of a stranger under a name. The stranger's faces live in the "
                "running `streamer run` that matches against this gallery (it sees the new person at its next "
                "gallery reload), or, with recognition.strangers_file set, in that file.")
    g.add_argument("stranger", metavar="ID", help="the stranger id, as identity events carry it (u-17)")
    g.add_argument("name", help="the name to enrol them under")
    g.add_argument("--gallery", metavar="FILE",
                   help="the gallery the pipeline runs with: a file or a postgresql:// URL (default: gallery.path "
                   "or gallery.url)")
    p.set_defaults(func=cmd_gallery)

    p = command(sub, "models", "model files: where they resolve, licences, fetching", "streamer models list",
                parents=())
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    m = command(msub, "list", "every model, where it resolves and its licence", "streamer models list --json",
                parents=(settings_opts,))
    m.add_argument("--json", action="store_true", help="one JSON list on stdout")
    m = command(msub, "pull", "fetch/convert missing models (sha256-checked)",
                "streamer models pull yunet dlib_resnet --model-dir models/", parents=(settings_opts,),
                description="Fetch/convert missing models (sha256-checked). Exit status 1 when any failed.")
    m.add_argument("names", nargs="*", metavar="NAME",
                   help="models to fetch (default: every model allowed by the licence options)")
    p.set_defaults(func=cmd_models)

    p = command(
        sub, "bench",
        "one clip, same models/frames/clock: decode, pipeline, serial tracked baseline, "
        "per-frame all-models baseline (InsightFace FaceAnalysis.get pattern), live latency",
        "streamer bench clip.mp4 --frames 90 --json",
        parents=(face_opts,),
        description="Passes: decode (ceiling); pipeline (two processes, batched); serial_tracked (same "
        "tracker and gate, one thread, no batching);\nper_frame_all_models (every model on every face on "
        "every frame, one thread: the InsightFace FaceAnalysis.get pattern);\nlive (the clip as a camera, "
        "latency per event kind). Each is timed from the first frame read to the last result published.",
    )
    p.add_argument("source", help="video file to measure on")
    p.add_argument("--frames", type=_whole_number("leave --frames out to use the whole clip"), metavar="N",
                   help="use at most this many frames, in every pass (default: the whole clip)")
    p.add_argument("--gallery", metavar="FILE",
                   help="gallery to match against (pipeline and both baselines): a file or a postgresql:// URL")
    p.add_argument(
        "--no-live",
        dest="live",
        action="store_false",
        help="skip the pass that replays the clip as a live camera (only the file pass's latency is shown)",
    )
    p.add_argument("--streams", type=_whole_number("e.g. --streams 4"), metavar="K",
                   help="instead: play 1..K copies of the clip as live cameras at once, per detect-worker count, "
                   "and report how many hold real time (under 1%% of frames dropped) and the p95 latency per "
                   "event kind")
    p.add_argument("--workers", type=_worker_counts, metavar="N,N",
                   help="with --streams: the detect-worker counts to measure, e.g. 1,2 (default: auto, "
                   "pipeline.detect_workers' rule)")
    p.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    p.set_defaults(func=cmd_bench)
    return parser


def _quiet_native_logs() -> None:
    # MediaPipe (glog/absl) and TensorFlow Lite print INFO lines to stderr; users want one line on error.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    # A backstop under limits.max_image_pixels (checked from the header first): OpenCV reads this once, when
    # cv2 loads, and refuses to allocate beyond it. 150 MP is that setting's upper bound.
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(150_000_000))


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 `verify`: different people (`models pull`: a model failed; `run`: a worker kept
    crashing), 2 usage or input error (one line on stderr), 3 no face where one was needed, 130 Ctrl-C."""
    _quiet_native_logs()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2), --help and --version (0): a status to return, not to raise
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
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
