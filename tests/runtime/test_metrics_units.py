"""The plugin's Prometheus series as SGLang's /metrics serves them: written by a scheduler-like process in
prometheus_client's multiprocess mode, merged by MultiProcessCollector, read with the text parser."""

import json
import subprocess
import sys

STATS = [{"policy": "hybridkv", "compressed": True, "kv_bytes_full": 1000, "kv_bytes_device": 100,
          "kv_bytes_host": 700, "static_heads": 3, "dynamic_heads": 1},
         {"policy": "snapkv", "compressed": True, "kv_bytes_full": 2000, "kv_bytes_device": 250,
          "kv_bytes_host": 0, "static_heads": 4, "dynamic_heads": 0},
         {"policy": "hybridkv", "compressed": False, "prompt_tokens": 10}]

SCRIPT = """
import json, os, sys
from sglang_hybridkv.runtime.metrics import metrics_for
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families
stats = json.loads(sys.argv[1])
m = metrics_for((("model_name", "m"), ("tp_rank", "0")))
for s in stats:
    m.record(s)
m.set_running(stats[:1])
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
out = {}
for fam in text_string_to_metric_families(generate_latest(registry).decode()):
    for s in fam.samples:
        if s.name.startswith("sglang:hybridkv_") and "le" not in s.labels:
            assert s.labels["model_name"] == "m" and s.labels["tp_rank"] == "0"
            out[s.name + "|" + s.labels.get("policy", "")] = s.value
print(json.dumps(out))
"""


def test_series_are_named_labelled_and_merged_like_sglangs(tmp_path):
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(STATS)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.splitlines()[-1])
    assert got["sglang:hybridkv_compressed_requests_total|hybridkv"] == 1
    assert got["sglang:hybridkv_compressed_requests_total|snapkv"] == 1
    assert got["sglang:hybridkv_uncompressed_requests_total|hybridkv"] == 1
    assert got["sglang:hybridkv_compressed_kv_bytes_device_total|snapkv"] == 250
    assert got["sglang:hybridkv_compressed_kv_bytes_host_total|hybridkv"] == 700
    assert got["sglang:hybridkv_compression_ratio_sum|snapkv"] == 8.0
    assert got["sglang:hybridkv_static_head_share_sum|hybridkv"] == 0.75
    assert got["sglang:hybridkv_kv_bytes_device|"] == 100 and got["sglang:hybridkv_kv_bytes_saved|"] == 900
    assert got["sglang:hybridkv_compressed_requests_running|"] == 1
