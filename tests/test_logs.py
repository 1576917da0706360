"""JSON logs: one object per line, the job id on every line logged while a job is handled."""

from __future__ import annotations

import io
import json
import logging

from shared.logs import JobIdFilter, JsonFormatter, job_context


def test_json_lines_carry_the_job_id():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(JobIdFilter())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test.jsonlogs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        log.info("before")
        with job_context("0123abcd"):
            log.info("running %s", "step")
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("failed")
        log.info("after")
    finally:
        log.removeHandler(handler)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [ln["msg"] for ln in lines] == ["before", "running step", "failed", "after"]
    assert [ln["job_id"] for ln in lines] == [None, "0123abcd", "0123abcd", None]
    assert "ValueError: boom" in lines[2]["exc"] and lines[1]["level"] == "info" and lines[1]["ts"].endswith("Z")
