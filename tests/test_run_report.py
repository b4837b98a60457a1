"""The summary `streamer run` prints at the end, from the events it published."""

from __future__ import annotations

from streamer.pipeline.report import RunReport
from streamer.publish.events import Identity, TrackStarted


def started(stream: str, track: int) -> TrackStarted:
    return TrackStarted(stream=stream, frame=0, pts=0.0, track=track, box=(0, 0, 10, 10))


def identity(stream: str, track: int, name: str | None) -> Identity:
    return Identity(stream=stream, frame=5, pts=0.2, track=track, box=(0, 0, 10, 10), name=name, score=0.7,
                    distance=0.3, votes={})


def test_people_their_tracks_unknowns_and_files(tmp_path):
    report = RunReport()
    for event in [started("cam", 1), started("cam", 2), started("cam", 3), identity("cam", 1, "ada"),
                  identity("cam", 3, "ada"), identity("cam", 2, "bob"), identity("cam", 2, None)]:
        report.observe(event)
    video = tmp_path / "out.mp4"
    video.write_bytes(b"x")
    lines = report.lines(240, 8.04, [video, tmp_path / "never-written.mp4"])
    assert lines == [
        "240 frames in 8.0 s, 3 tracks",
        "recognised ada on tracks #1, #3",
        "1 unknown track: #2",  # its last announcement wins: bob was withdrawn
        f"wrote {video}",
    ]


def test_several_streams_name_the_stream_of_each_track():
    report = RunReport()
    for event in [started("lobby", 1), started("door", 1), identity("door", 1, "ada")]:
        report.observe(event)
    assert report.lines(10, 1.0)[1:] == ["recognised ada on track door#1", "1 unknown track: lobby#1"]
