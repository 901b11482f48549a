"""The soak benchmark, small: one compressing server with every switch on (radix cache, chunked prefill 128,
SGLang's retraction drill and busy-time memory check, a host tier small enough to fill, an override switch) takes
a mix of text, image, multi-turn, abandoned and bad requests; every request gets the outcome its kind allows and,
at idle, the server holds nothing. ``benchmarks/soak.py --requests 1000`` is the full run."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = {"requests", "completed", "aborted", "refused_4xx", "errors_5xx", "leaked_slots", "leaked_host_bytes",
          "radix_locks", "rss_growth_mb", "host_tier_peak_bytes", "wall_s"}


def test_small_soak_answers_every_request_and_leaks_nothing(tmp_path, tiny_vl_checkpoint):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "soak.py"), "--requests", "120",
                           "--model-path", tiny_vl_checkpoint, "--max-minutes", "5", "--json", str(out)],
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r) == FIELDS
    assert r["requests"] == 120 and r["completed"] + r["aborted"] + r["refused_4xx"] == r["requests"]
    assert r["errors_5xx"] == r["leaked_slots"] == r["leaked_host_bytes"] == r["radix_locks"] == 0
    # The mix really exercised each path: answers, abandoned clients, refusals (the override switch among them).
    assert r["completed"] > 60 and r["aborted"] > 0 and r["refused_4xx"] > 0
    assert 0 < r["host_tier_peak_bytes"] <= 0.002e9 and r["rss_growth_mb"] is not None
