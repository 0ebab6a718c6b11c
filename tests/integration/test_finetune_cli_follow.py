"""`cli start --follow` against a real HTTP server: the progress line is drawn again only when the job changes, so a
log file (no terminal) gets one line per change, not one per poll."""

from __future__ import annotations

import io

from fastapi import FastAPI

from gateway.redis_server import free_port
from services.finetune.cli import follow
from tests.support import ServedApp


def test_follow_redraws_only_when_the_job_changes() -> None:
    states = [("queued", 0.0)] * 6 + [("running", 0.5)] * 6 + [("registered", 1.0)]
    polls = iter(states)

    app = FastAPI()

    @app.get("/api/finetune/jobs/{job_id}")
    def job(job_id: str) -> dict:
        state, progress = next(polls)
        return {"job_id": job_id, "state": state, "progress": progress}

    out = io.StringIO()
    with ServedApp(app, free_port(), name="jobs") as served:
        final = follow("job-x", served.url, poll_s=0.01, out=out)
    assert final["state"] == "registered"
    frames = [f for f in out.getvalue().replace("\n", "\r").split("\r") if f.strip()]
    drawn = [f.split("% ", 1)[1].strip(" ,") for f in frames]
    # tqdm draws once on opening and once on closing; between, one frame per change of state or progress
    assert [d for i, d in enumerate(drawn) if i == 0 or d != drawn[i - 1]] == ["", "queued:", "running:", "registered:"]
    assert len(frames) <= 5, frames
