"""The annotated video as a viewer sees it: no "#-1" boxes, labels that cover no other face, no attributes on
blurred faces, and the sound of the input. Checked on the frames and streams of the written files."""

from __future__ import annotations

import logging
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest

from streamer.config import OutputSettings
from streamer.publish.annotate import (
    FAINT_ALPHA,
    FAINT_COLOUR,
    KNOWN_COLOUR,
    UNKNOWN_COLOUR,
    FaceLabel,
    draw_faces,
    place_label,
)
from streamer.publish.output import AnnotatedOutput
from streamer.types import Faces, Frame

W, H, FPS = 320, 240, 25


def faces(boxes, track_ids=None) -> Faces:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return Faces(boxes, np.ones(len(boxes)), np.zeros((len(boxes), 5, 2)), track_ids=track_ids)


def textured(seed: int = 0) -> np.ndarray:
    """Coarse noise: plenty of detail that H.264 at crf 23 still keeps."""
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 255, (H // 4, W // 4, 3), dtype=np.uint8), (W, H),
                      interpolation=cv2.INTER_NEAREST)


def detail(region: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(region, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var())


def near(image: np.ndarray, colour, tolerance: int = 40) -> np.ndarray:
    return np.abs(image.astype(int) - colour).sum(axis=-1) < tolerance


def read_frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]


def label(track: int, known: bool, name: str | None = None) -> FaceLabel:
    return FaceLabel(track, name, 32.2, "man", "happy", known)


# --- 1. detections without a confirmed track ----------------------------------------------------------


def test_untracked_face_gets_a_faint_outline_and_no_label():
    image = np.full((H, W, 3), 50, np.uint8)
    box = (100, 100, 160, 170)
    out = draw_faces(image, [box], [None])
    changed = np.any(out != image, axis=-1)
    ys, xs = np.nonzero(changed)
    # Only the one-pixel outline changed: no label block above, below or beside the box.
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (100, 100, 159, 169)
    assert not changed[101:169, 101:159].any()
    dim = np.round(FAINT_ALPHA * np.array(FAINT_COLOUR) + (1 - FAINT_ALPHA) * 50)
    assert np.allclose(out[100, 100:160], dim, atol=1)
    # Dim: far from the strong label colours.
    assert not near(out, KNOWN_COLOUR, 100).any() and not near(out, UNKNOWN_COLOUR, 100).any()


def test_untracked_faces_in_the_video_have_no_label_and_are_blurred_under_blur_unknown(tmp_path):
    path = tmp_path / "out.mp4"
    output = AnnotatedOutput(OutputSettings(path=path, blur_unknown=True), 1)
    untracked, tracked_box = (40, 60, 120, 160), (200, 60, 280, 160)
    detections = faces([untracked, tracked_box])
    tracked = faces([tracked_box], track_ids=[7])  # only the second has a confirmed track
    images = [textured(i) for i in range(5)]
    for index, image in enumerate(images):
        assert output.render("cam0", Frame("cam0", index, index / FPS, 0.0, image), detections, tracked,
                             {7: label(7, known=True, name="ann")}, FPS)
    output.close()
    frames = read_frames(path)
    assert len(frames) == len(images)
    for before, after in zip(images, frames):
        x1, y1, x2, y2 = untracked
        inner = (slice(y1 + 10, y2 - 10), slice(x1 + 10, x2 - 10))
        assert detail(after[inner]) < 0.05 * detail(before[inner])  # blurred though not tracked
        # No label block anywhere near the untracked face (the "#-1 unknown" box of old).
        around = after[max(0, y1 - 40): y2 + 40, max(0, x1 - 40): x2 + 5]
        assert near(around, UNKNOWN_COLOUR).mean() < 0.01
        # The known, tracked face keeps its detail, its green box and its label.
        x1, y1, x2, y2 = tracked_box
        inner = (slice(y1 + 10, y2 - 10), slice(x1 + 10, x2 - 10))
        assert detail(after[inner]) > 0.3 * detail(before[inner])
        assert near(after[y1 - 30: y1, x1: x2], KNOWN_COLOUR).mean() > 0.3


def test_labels_for_detections_without_a_confirmed_track_are_none():
    output = AnnotatedOutput(OutputSettings(), 1)
    detections = faces([(0, 0, 10, 10), (20, 20, 40, 40), (50, 50, 60, 60)])
    tracked = faces([(20, 20, 40, 40), (50, 50, 60, 60)], track_ids=[3, -1])
    labels = output.labels(detections, tracked, {})
    assert labels[0] is None and labels[2] is None
    assert labels[1] == FaceLabel(3, None, None, None, None, False)  # confirmed, nothing known yet
    assert output.labels(detections, None, {}) == [None] * 3


# --- 2. labels that cover no other face ----------------------------------------------------------------


def test_label_of_stacked_faces_goes_where_it_covers_no_other_face():
    shape = (H, W, 3)
    top, bottom = (100, 10, 180, 100), (100, 110, 180, 200)  # one face right above the other
    size = (90, 30)
    # The lower face: above it would cover the upper face, below it there is room.
    rect = place_label(size, bottom, [top], shape)
    assert rect == (100, 200, 190, 230)
    # The upper face: no room above, below covers the lower face: beside it, on the right.
    rect = place_label(size, top, [bottom], shape)
    assert rect == (180, 10, 270, 40)
    # Against the right edge the label goes on the left instead.
    right_top, right_bottom = (230, 10, 310, 100), (230, 110, 310, 200)
    assert place_label(size, right_top, [right_bottom], shape) == (140, 10, 230, 40)
    # A face alone keeps its label above the box.
    assert place_label(size, bottom, [], shape) == (100, 80, 190, 110)
    # Room nowhere but inside: inside the box, still in the image.
    full = (0, 0, W, H)
    x1, y1, x2, y2 = place_label(size, full, [], shape)
    assert 0 <= x1 and 0 <= y1 and x2 <= W and y2 <= H


def test_drawn_labels_of_stacked_faces_leave_the_other_face_uncovered():
    image = textured()
    top, bottom = (100, 10, 180, 100), (100, 110, 180, 200)
    labels = [label(1, known=False), label(2, known=False)]
    out = draw_faces(image, [top, bottom], labels)
    for box in (top, bottom):
        x1, y1, x2, y2 = box
        inner = out[y1 + 2: y2 - 2, x1 + 2: x2 - 2]
        assert np.array_equal(inner, image[y1 + 2: y2 - 2, x1 + 2: x2 - 2]), box
    # Both labels were drawn, in the image: the lower one below it, the upper one beside it.
    assert near(out[200:215, 100:150], UNKNOWN_COLOUR).mean() > 0.3
    assert near(out[10:25, 181:230], UNKNOWN_COLOUR).mean() > 0.3


# --- 4. no attributes on blurred faces -----------------------------------------------------------------


def test_blurred_unknown_faces_are_labelled_unknown_and_nothing_more():
    detections = faces([(0, 0, 50, 50), (100, 0, 150, 50)])
    tracked = faces([(0, 0, 50, 50), (100, 0, 150, 50)], track_ids=[1, 2])
    track_labels = {1: label(1, known=False), 2: label(2, known=True, name="lin")}
    blurring = AnnotatedOutput(OutputSettings(blur_unknown=True), 1).labels(detections, tracked, track_labels)
    assert blurring[0].lines() == ["unknown"]
    assert (blurring[0].age, blurring[0].gender, blurring[0].emotion) == (None, None, None)
    assert blurring[1].lines() == ["#2 lin", "32y man happy"]  # a known person is not blurred
    plain = AnnotatedOutput(OutputSettings(), 1).labels(detections, tracked, track_labels)
    assert plain[0].lines() == ["#1 unknown", "32y man happy"]


def test_blurred_face_label_in_the_video_is_one_short_line(tmp_path):
    path = tmp_path / "out.mp4"
    output = AnnotatedOutput(OutputSettings(path=path, blur_unknown=True), 1)
    box = (120, 100, 200, 200)
    image = np.full((H, W, 3), 255, np.uint8)
    output.render("cam0", Frame("cam0", 0, 0.0, 0.0, image), faces([box]), faces([box], track_ids=[4]),
                  {4: label(4, known=False)}, FPS)
    output.close()
    frame = read_frames(path)[0]
    block = near(frame, UNKNOWN_COLOUR, 60)
    block[box[1]:, :] = False  # the label, above the box (not the box outline)
    ys, xs = np.nonzero(block)
    (text_w, text_h), base = cv2.getTextSize("unknown", cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
    assert abs((xs.max() - xs.min() + 1) - (text_w + 4)) <= 2  # "unknown", not "#4 unknown" or attributes
    assert abs((ys.max() - ys.min() + 1) - (text_h + base + 2)) <= 2  # one line


# --- 3. the sound of the input --------------------------------------------------------------------------


def make_clip(path, seconds: float = 2.0, audio: bool = True, rate: int = 44100) -> None:
    """A test clip: moving gradient video and a 440 Hz sine in AAC."""
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=FPS, options={"preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        sound = None
        if audio:
            sound = container.add_stream("aac", rate=rate)
            sound.layout = "mono"
        for i in range(int(seconds * FPS)):
            image = np.zeros((H, W, 3), np.uint8)
            image[:, :, 1] = (np.arange(W) + 4 * i) % 256
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
        if sound is not None:
            t = np.arange(int(seconds * rate)) / rate
            samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for start in range(0, len(samples), 1024):
                frame = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
                container.mux(sound.encode(frame))
            container.mux(sound.encode(None))
        container.mux(video.encode(None))


def annotate_clip(clip, out, max_frames: int | None = None, sources=True, first: int = 0) -> int:
    output = AnnotatedOutput(OutputSettings(path=out), 1, {"cam0": str(clip)} if sources else None)
    count = 0
    with av.open(str(clip)) as container:
        for index, decoded in enumerate(container.decode(video=0)):
            if index == max_frames:
                break
            if index < first:
                continue
            frame = Frame("cam0", index, float(decoded.time), 0.0, decoded.to_ndarray(format="bgr24"))
            output.render("cam0", frame, faces([(10, 10, 60, 60)]), faces([(10, 10, 60, 60)], track_ids=[1]),
                          {}, FPS)
            count += 1
    output.close()
    return count


def audio_seconds(path) -> float:
    """Seconds of sound, from the decoded samples."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream)) / stream.rate


def streams_of(path) -> tuple[int, int, str | None]:
    with av.open(str(path)) as container:
        audio = container.streams.audio
        return (len(container.streams.video), len(audio), audio[0].codec_context.name if audio else None)


def test_audio_of_a_file_source_is_copied_into_the_video(tmp_path):
    clip, out = tmp_path / "in.mp4", tmp_path / "out.mp4"
    make_clip(clip)
    frames = annotate_clip(clip, out)
    assert streams_of(out) == (1, 1, "aac")
    assert abs(audio_seconds(out) - audio_seconds(clip)) < 0.1
    assert abs(audio_seconds(out) - 2.0) < 0.1
    written = read_frames(out)
    assert len(written) == frames == 2 * FPS
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert [round(float(f.time) * FPS) for f in container.decode(video=0)] == list(range(frames))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]  # no temporary file left


def test_audio_is_cut_to_the_length_of_the_video(tmp_path):
    clip, out = tmp_path / "in.mp4", tmp_path / "out.mp4"
    make_clip(clip)
    annotate_clip(clip, out, max_frames=FPS)  # the run stopped after one second
    assert streams_of(out) == (1, 1, "aac")
    assert abs(audio_seconds(out) - 1.0) < 0.1


def test_audio_starts_with_the_first_written_frame(tmp_path):
    clip, out = tmp_path / "in.mp4", tmp_path / "out.mp4"
    make_clip(clip)
    annotate_clip(clip, out, first=FPS // 2)  # the video starts half a second into the source
    assert abs(audio_seconds(out) - 1.5) < 0.1
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        assert abs(float(audio.start_time * audio.time_base)) < 0.03
        assert abs(float(audio.duration * audio.time_base) - 1.5) < 0.05


def test_silent_sources_and_no_sources_leave_the_video_as_it_is(tmp_path, caplog):
    clip = tmp_path / "silent.mp4"
    make_clip(clip, seconds=0.4, audio=False)
    with caplog.at_level(logging.WARNING, logger="streamer.publish.output"):
        annotate_clip(clip, tmp_path / "a.mp4")
        annotate_clip(make_clip(tmp_path / "loud.mp4", seconds=0.4) or tmp_path / "loud.mp4", tmp_path / "b.mp4",
                      sources=False)
    assert streams_of(tmp_path / "a.mp4") == (1, 0, None)
    assert streams_of(tmp_path / "b.mp4") == (1, 0, None)
    assert not caplog.records


@pytest.mark.parametrize("failure", ["midway", "unreadable source"])
def test_a_failed_audio_copy_keeps_the_video_and_logs_one_warning(tmp_path, caplog, monkeypatch, failure):
    import heapq
    import types

    clip, out = tmp_path / "in.mp4", tmp_path / "out.mp4"
    make_clip(clip, seconds=0.4)
    output = AnnotatedOutput(OutputSettings(path=out), 1, {"cam0": str(clip)})
    with av.open(str(clip)) as container:
        for index, decoded in enumerate(container.decode(video=0)):
            output.render("cam0", Frame("cam0", index, float(decoded.time), 0.0, decoded.to_ndarray(format="bgr24")),
                          Faces.empty(), Faces.empty(), {}, FPS)
    if failure == "midway":  # the new file is half written when the copy fails
        def merge(*iterables, key):
            for count, packet in enumerate(heapq.merge(*iterables, key=key)):
                if count == 5:
                    raise RuntimeError("injected failure")
                yield packet

        monkeypatch.setattr("streamer.publish.video.heapq", types.SimpleNamespace(merge=merge))
    else:
        clip.write_bytes(b"not a video at all")
    with caplog.at_level(logging.WARNING, logger="streamer.publish.output"):
        output.close()
    assert len(caplog.records) == 1 and "without audio" in caplog.records[0].getMessage()
    assert streams_of(out) == (1, 0, None)
    assert len(read_frames(out)) == int(0.4 * FPS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]  # no temporary file left
