"""The console's face library drives the running pipeline: a person enrolled over the API is named on the
live stream, and once deleted, new tracks of them are unknown again (the pipeline re-reads the gallery)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from test_serve_cli import Served, _wait_for, env  # noqa: F401 - env is a fixture

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_videos" / "astronaut.mp4"
SAMPLE_STILL = REPO / "sample_videos" / "astronaut.jpg"


def test_enrol_and_delete_over_the_api_reach_the_running_pipeline(env, tmp_path):  # noqa: F811
    config = tmp_path / "loop.yaml"
    config.write_text(f"sources:\n  - url: {SAMPLE}\n    id: loop\n    loop: true\n    live: true\n")
    served = Served(["--config", str(config), "--gallery", str(tmp_path / "people.db")],
                    {**env, "STREAMER_RECOGNITION__REFRESH_S": "0.5"})
    try:
        url = served.url()
        token = next(line for line in served.lines if line.startswith("stk_"))
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            def identities(**params):
                return client.get("/api/v1/events", params={"kind": "identity", **params}).json()["events"]

            _wait_for(lambda: [e for e in identities() if e["name"] is None], 120, "an unknown face before enrolment")
            with open(SAMPLE_STILL, "rb") as photo:
                answer = client.post("/api/v1/people", data={"name": "Eileen Collins"},
                                     files={"img": ("astronaut.jpg", photo, "image/jpeg")})
            assert answer.status_code == 201, answer.text
            enrolled_at = time.time()
            named = _wait_for(lambda: identities(name="Eileen Collins"), 60, "her name after enrolment over the API")
            print(f"named {named[0]['ts'] - enrolled_at:.2f} s after the enrolment answered")
            last_seq = max(e["seq"] for e in identities())
            assert client.delete("/api/v1/people/Eileen Collins").status_code == 204
            assert client.get("/api/v1/people").json()["people"] == []

            def unknown_on_a_new_track():
                events = client.get("/api/v1/events", params={"after_seq": last_seq}).json()["events"]
                new_tracks = {e["track"] for e in events if e["kind"] == "track.started"}
                return [e for e in events if e["kind"] == "identity" and e["track"] in new_tracks and e["name"] is None]

            _wait_for(unknown_on_a_new_track, 90, "an unknown identity on a track started after the deletion")
        code, _ = served.stop()
        assert code == 0
    finally:
        served.kill()
