"""Errors a new user meets, each with a remedy: failed model downloads, unreachable cameras, truncated
files, OpenCV's native log lines, and a test run without the shared model folder."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from streamer.config import ReconnectSettings
from streamer.errors import ModelError, SourceError
from streamer.models.registry import MODELS, ModelRegistry, get_spec
from streamer.sources import PyAVSource
from streamer.sources.pyav import describe_stream_error, error_cause, explain_stream_error

REPO = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- 1. a failed download says where to put the file ----------------------------------------------------------


def test_failed_download_names_url_socket_error_and_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    url = f"http://127.0.0.1:{closed_port()}/models/face_detection_yunet_2026may.onnx"
    monkeypatch.setitem(MODELS, "yunet", dataclasses.replace(get_spec("yunet"), url=url))
    models = tmp_path / "models"
    models.mkdir()
    registry = ModelRegistry(model_dir=models, cache_dir=tmp_path / "cache", allow_download=True)
    with pytest.raises(ModelError) as caught:
        registry.resolve("yunet")
    message = str(caught.value)
    assert url in message and "Connection refused" in message
    assert "face_detection_yunet_2026may.onnx" in message
    assert f"STREAMER_MODEL_DIR or --model-dir, now {models}" in message
    assert "models.paths.yunet" in message and "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__

    # The same through `streamer models pull`: one line on stderr, no traceback, non-zero exit.
    from streamer.cli import main

    monkeypatch.setenv("STREAMER_MODELS__CACHE_DIR", str(tmp_path / "cache2"))
    code = main(["models", "pull", "yunet", "--model-dir", str(models)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and url in lines[0] and "Connection refused" in lines[0]
    assert "STREAMER_MODEL_DIR" in lines[0] and "face_detection_yunet_2026may.onnx" in lines[0]


def test_missing_model_message_names_the_paths_setting(tmp_path):
    with pytest.raises(ModelError, match=r"model yunet not found: .*STREAMER_MODEL_DIR.*models\.paths\.yunet"):
        ModelRegistry(model_dir=tmp_path, cache_dir=tmp_path).resolve("yunet")


# -- 2. network stream errors in words a camera owner understands ------------------------------------------------

URL = "rtsp://admin:secret@10.0.0.5:554/stream1"


@pytest.mark.parametrize(
    ("error", "cause", "words"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "refused", "cannot reach 10.0.0.5:554: connection refused"),
        (OSError(113, "No route to host"), "unreachable", "cannot reach 10.0.0.5:554: no route to host"),
        (OSError(101, "Network is unreachable"), "unreachable", "no route to host"),
        (TimeoutError(110, "Connection timed out"), "timeout", "cannot reach 10.0.0.5:554: no answer (timed out)"),
        ("Name or service not known", "name", "cannot find host 10.0.0.5: name not found"),
        ("Temporary failure in name resolution", "name", "name not found"),
        ("Server returned 401 Unauthorized (authorization failed)", "unauthorized", "refused the login (401"),
        ("Server returned 403 Forbidden (access denied)", "forbidden", "(403 forbidden)"),
        ("Server returned 404 Not Found", "not_found", "10.0.0.5:554 has no stream at /stream1 (404 not found)"),
        # ambiguous: only a probe can tell
        ("Invalid data found when processing input", None, None),
        (OSError(5, "Input/output error"), None, None),
        ("Immediate exit requested", None, None),
    ],
)
def test_error_translation_table(error, cause, words):
    assert error_cause(error) == cause
    text = error if isinstance(error, str) else error.strerror
    message = describe_stream_error(URL, error, cause)
    if words is None:
        assert message == text  # nothing to add: FFmpeg's words unchanged
    else:
        assert words in message and message.startswith(("cannot ", "10.0.0.5:554 "))
        assert message.endswith(f"({text})") and " — " in message
    assert "secret" not in message


@pytest.mark.parametrize(
    ("probed", "words"),
    [
        ("refused", "connection refused — is the camera on and the port right?"),
        ("unreachable", "no route to host"),
        ("timeout", "no answer (timed out)"),
        ("name", "name not found"),
        ("silent", "did not answer as a stream server (timed out)"),
    ],
)
def test_ambiguous_ffmpeg_text_takes_the_probed_cause(probed, words):
    message = describe_stream_error(URL, "Invalid data found when processing input", probed)
    assert words in message and message.endswith("(Invalid data found when processing input)")


def _open_error(url: str, timeout_s: float = 1.0) -> BaseException:
    with pytest.raises(av.error.FFmpegError) as caught:
        av.open(url, options={"rtsp_transport": "tcp", "timeout": "3000000"}, timeout=(timeout_s, timeout_s))
    return caught.value


def test_real_closed_port_reads_connection_refused():
    url = f"rtsp://127.0.0.1:{closed_port()}/cam"
    message = explain_stream_error(url, _open_error(url))
    assert message.startswith(f"cannot reach 127.0.0.1:{url.split(':')[2].split('/')[0]}: connection refused — ")
    assert message.endswith("(Connection refused)")


def test_real_bad_host_name_reads_name_not_found():
    url = "rtsp://no-such-host.invalid/x"
    message = explain_stream_error(url, _open_error(url))
    assert message.startswith("cannot find host no-such-host.invalid: name not found — ")
    assert "(" in message and message.endswith(")")  # FFmpeg's own text ("Input/output error") kept


def test_real_silent_server_reads_timed_out_through_the_source():
    """A TCP server that accepts and never answers: FFmpeg says "Invalid data found when processing
    input"; the probe connects, so the words say the port does not answer as a stream server."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    try:
        source = PyAVSource(
            "cam", f"rtsp://127.0.0.1:{port}/live", kind="rtsp", target=f"rtsp://127.0.0.1:{port}/live",
            live=False, reconnect=ReconnectSettings(open_timeout_s=1.0, frame_timeout_s=1.0),
        )  # fmt: skip
        with pytest.raises(SourceError) as caught:
            source.start()
        source.stop()
    finally:
        server.close()
    message = str(caught.value)
    assert f"127.0.0.1:{port} accepts connections but did not answer as a stream server (timed out)" in message
    assert message.endswith(")") and "\n" not in message


def _fake_rtsp_server(code: int, reason: str) -> tuple[socket.socket, int]:
    """Answers OPTIONS with 200 and everything else with `code`: enough for FFmpeg's RTSP client."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
                    while b"\r\n\r\n" in data:
                        request, data = data.split(b"\r\n\r\n", 1)
                        lines = request.decode().split("\r\n")
                        cseq = next(line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("cseq"))
                        if lines[0].startswith("OPTIONS"):
                            reply = f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nPublic: DESCRIBE, SETUP, PLAY\r\n\r\n"
                        else:
                            auth = 'WWW-Authenticate: Basic realm="cam"\r\n' if code == 401 else ""
                            reply = f"RTSP/1.0 {code} {reason}\r\nCSeq: {cseq}\r\n{auth}\r\n"
                        conn.sendall(reply.encode())

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


@pytest.mark.parametrize(
    ("code", "reason", "words"),
    [(401, "Unauthorized", "refused the login (401 unauthorised)"), (404, "Not Found", "has no stream at /cam")],
)
def test_real_rtsp_refusals(code, reason, words):
    server, port = _fake_rtsp_server(code, reason)
    try:
        url = f"rtsp://user:pw@127.0.0.1:{port}/cam"
        message = explain_stream_error(url, _open_error(url))
    finally:
        server.close()
    assert words in message and f"127.0.0.1:{port}" in message and "pw" not in message.split("(")[0]


# -- 3. a truncated file says so ---------------------------------------------------------------------------------


def _faststart_clip(path: Path, frames: int = 120, rate: int = 25) -> None:
    container = av.open(str(path), "w", options={"movflags": "faststart"})  # moov (the index) at the start
    stream = container.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
    rng = np.random.default_rng(0)
    for i in range(frames):
        image = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)  # noise: every frame costs bytes
        image[:, i % 150 : i % 150 + 10] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def _play(path: Path) -> tuple[int, list[str], PyAVSource]:
    source = PyAVSource("clip", str(path), kind="file", target=str(path), live=False)
    source.start()
    frames = 0
    while not source.finished:
        if source.read(timeout=1.0) is not None:
            frames += 1
    source.stop()
    return frames, [c.detail for c in source.poll_status() if c.status == "ended"], source


def test_truncated_file_is_reported_as_truncated(tmp_path, caplog):
    whole = tmp_path / "whole.mp4"
    _faststart_clip(whole)
    cut = tmp_path / "cut.mp4"
    data = whole.read_bytes()
    assert data[4:8] == b"ftyp" and data.find(b"moov") < data.find(b"mdat")  # index at the start
    cut.write_bytes(data[: len(data) // 2])

    with caplog.at_level(logging.WARNING, logger="streamer.sources"):
        frames, ended, source = _play(whole)
    assert frames == 120 and ended == ["end of file"] and source.end_note is None
    assert not caplog.records

    with caplog.at_level(logging.WARNING, logger="streamer.sources"):
        frames, ended, source = _play(cut)
    assert 0 < frames < 120
    assert len(ended) == 1 and ended[0].startswith("end of file: file truncated at ")
    assert ended[0].split(" s of ")[1].startswith("4.8 s")
    cut_at = float(ended[0].split("truncated at ")[1].split(" s")[0])
    assert 0.5 < cut_at < 4.0
    assert source.end_note is not None and source.end_note in ended[0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "truncated" in warnings[0].getMessage()


# -- 4. OpenCV's native log lines never reach the user -----------------------------------------------------------


@pytest.mark.parametrize("level", [None, "ERROR"])  # unset, and what the CLI sets by default
def test_webcam_probing_prints_no_opencv_log_lines(level):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    if level:
        env["OPENCV_LOG_LEVEL"] = level
    code = (
        "from streamer.sources import WebcamSource\n"
        "import cv2, time\n"
        "cv2.VideoCapture(0).release()\n"
        "s = WebcamSource('cam', '0', device=0, live=False)\n"
        "s.start()\n"
        "while not s.finished: time.sleep(0.05)\n"
        "print([c.detail for c in s.poll_status() if c.status == 'ended'])\n"
        "s.stop()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "[ERROR" not in done.stderr and "WARN:" not in done.stderr and "global " not in done.stderr
    assert "cannot open camera 0: no such camera" in done.stdout


# -- 5. a test run without the shared folders stops once, with the remedy ---------------------------------------


def _pytest(args: list[str], model_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "STREAMER_MODEL_DIR": str(model_dir)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        env=env, capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip


def test_missing_model_folder_stops_the_session_once(tmp_path):
    empty = tmp_path / "no-models"
    empty.mkdir()
    done = _pytest(["tests/test_registry.py"], empty)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert out.count("tests need the development model files") == 1
    assert "STREAMER_MODEL_DIR" in out and "STREAMER_MEDIA_DIR" in out and str(empty) in out
    assert " passed" not in out and "ERROR at setup" not in out


def test_pure_unit_tests_run_without_the_model_folder(tmp_path):
    done = _pytest(["tests/test_lru.py"], tmp_path / "nowhere")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tests need the development model files" not in done.stdout + done.stderr
