"""A whole SGLang server with ``--kv-compression hybridkv`` on CUDA (``pytest -m gpu``; skipped without a CUDA
device or without SGLang). Three servers on a tiny random Llama (GQA group 7, the Qwen2.5-VL-7B shape that
FlashInfer's decode mishandles; head size 64) with the SmolLM2 tokenizer: stock SGLang (Triton backend),
hybridkv with the plugin's default on CUDA (SGLang's breakable decode graphs, whose capture of a language
model's output the plugin completes: ``runtime/graph_output.py``), and hybridkv with CUDA graphs off. The compressed ones answer the same eight captioned-video prompts at budget 0.1, at budget 1.0 and with
every head dynamic (``all_dynamic``). Budget 1.0 must give stock SGLang's greedy tokens; graphs on must give the
eager tokens; the graph server must have captured decode graphs and replayed them on every decode step; dynamic
heads must have brought rows from the host tier; and at idle every slot must be free again.

On the lent GPU machine this runs from the bundle (``scripts/gpu_server_check.sh``): ``HYBRIDKV_TOKENIZER`` names
the carried tokenizer (that machine has no GGUF to read it from) and ``HYBRIDKV_GPU_LOG_DIR`` the folder the
server logs go to.
"""

import json
import os
import re

import pytest
import torch

pytest.importorskip("sglang")

from sglang_hybridkv.testing.captioned_video import make_tasks  # noqa: E402
from sglang_hybridkv.testing.server import generate_all, get, sglang_server, wait_idle  # noqa: E402

pytestmark = pytest.mark.gpu
# fp32 on every server so that greedy tokens compare across attention kernels; TF32 off in Triton's dots
# (SGLang's kernels and ours) for the same reason. Info logs with one line per decode step: graph capture and
# replay are read from them. Decode graphs for batches up to 16 (the test sends 8 at once).
COMMON = ["--dtype", "float32", "--mem-fraction-static", "0.3", "--max-total-tokens", "65536",
          "--log-level", "info", "--decode-log-interval", "1", "--cuda-graph-max-bs-decode", "16"]
ENV = {"TRITON_F32_DEFAULT": "ieee"}
# The stock server: SGLang's Hopper default (FA3) needs the real sgl_kernel; prefill graphs off as in ours.
STOCK = COMMON + ["--attention-backend", "triton", "--disable-prefill-cuda-graph"]
HYBRIDKV = COMMON + ["--kv-compression", "hybridkv", "--hybridkv-budget", "0.1"]
GEN = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}
# What each compressed server is asked: the server's budget 0.1, budget 1.0, all heads dynamic.
ASKS = {"b0.1": {}, "b1.0": {"budget": 1.0}, "dynamic": {"policy": "all_dynamic"}}
CAPTURED = re.compile(r"Capture target decode CUDA graph end\. bs=\[([\d, ]+)\]")
DECODE_GRAPH = re.compile(r"Decode batch.*?cuda graph: (True|False)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A random 2-layer Llama, 14 query heads over 2 KV heads of size 64, with the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("tiny-llama-gqa7"))
    if os.environ.get("HYBRIDKV_TOKENIZER"):
        tok = AutoTokenizer.from_pretrained(os.environ["HYBRIDKV_TOKENIZER"])
    else:
        from sglang_hybridkv.hf.models import SMOLLM2_GGUF, smollm2_dir

        tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=448, intermediate_size=896, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                      initializer_range=0.2, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    # transformers 5 writes rope_parameters (theta 10000 by default); older readers look for the top-level field.
    saved.update(torch_dtype="float32", rope_theta=saved.get("rope_parameters", {}).get("rope_theta", 10000.0))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(saved, f, indent=2)
    return path


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> str:
    return os.environ.get("HYBRIDKV_GPU_LOG_DIR") or str(tmp_path_factory.mktemp("logs"))


def _serve(model_dir: str, log_dir: str, name: str, args: list[str], asks: dict) -> dict:
    """Start one server, send each ask's eight requests together, wait for idle; returns tokens, responses,
    the plugin's counters at idle (or why it never got idle) and the server log."""
    prompts = [{"text": t.text} for t in make_tasks(["sign_number"], 8, [48, 96], seed=3)[:8]]
    log_path = os.path.join(log_dir, f"server-{name}.log")
    run = {"tokens": {}, "outputs": {}}
    with sglang_server(model_dir, args, device="cuda", log_path=log_path, env=ENV) as url:
        for ask, knobs in asks.items():
            params = dict(GEN, custom_params={"hybridkv": knobs}) if knobs else GEN
            outs = generate_all(url, prompts, params, together=True)
            run["tokens"][ask] = [o["output_ids"] for o in outs]
            run["outputs"][ask] = outs
        if "--kv-compression" in args:
            try:
                run["idle"] = wait_idle(url, timeout=120)
            except TimeoutError as e:
                run["idle"] = {"not_idle": str(e)}
            get(url + "/health")  # the scheduler survived its own idle checks
    with open(log_path) as f:
        run["log"] = f.read()
    return run


# The default (breakable decode graphs) first: on a short GPU lease it is the one to see.
SERVERS = {"graphs": (HYBRIDKV, ASKS),
           "stock": (STOCK, {"b1.0": {}}), "eager": (HYBRIDKV + ["--disable-cuda-graph"], ASKS)}


@pytest.fixture(scope="module")
def runs(model_dir, log_dir) -> dict:
    """Every server, each started even if one before it failed to start (one GPU call then shows all of them);
    a failed start is kept as ``{"failed": why}`` and fails the tests that read that server."""
    out = {}
    for name, (args, asks) in SERVERS.items():
        try:
            out[name] = _serve(model_dir, log_dir, "hybridkv-" + name if name != "stock" else name, args, asks)
        except (RuntimeError, OSError) as e:  # start-up failure or timeout; an HTTP error from a request
            out[name] = {"failed": f"{type(e).__name__}: {str(e)[-3000:]}"}
    return out


def _run(runs: dict, name: str) -> dict:
    if "failed" in runs[name]:
        pytest.fail(f"the {name} server failed: {runs[name]['failed']}")
    return runs[name]


def _meta(run: dict, ask: str) -> list[dict]:
    return [o["meta_info"]["hybridkv"] for o in run["outputs"][ask]]


@pytest.mark.parametrize("server", ["eager", "graphs"])
def test_budget_one_gives_stock_sglang_tokens(runs, server):
    run, stock = _run(runs, server), _run(runs, "stock")
    assert all(m["compressed"] for m in _meta(run, "b1.0")), f"{server}: budget 1.0 left uncompressed"
    assert run["tokens"]["b1.0"] == stock["tokens"]["b1.0"], server


def test_breakable_decode_graphs_give_the_eager_tokens(runs):
    graphs, eager = _run(runs, "graphs"), _run(runs, "eager")
    assert all(m["within_budget"] for m in _meta(graphs, "b0.1"))
    for ask in ASKS:
        assert graphs["tokens"][ask] == eager["tokens"][ask], ask


def test_decode_graphs_were_captured_and_replayed_on_every_step(runs):
    log = _run(runs, "graphs")["log"]
    assert "backend=breakable" in log, "the graph server asked for breakable decode graphs"
    captured = CAPTURED.search(log)
    assert captured and 8 in {int(b) for b in captured.group(1).split(",")}, "no decode graph captured for 8"
    steps = DECODE_GRAPH.findall(log)
    assert steps and set(steps) == {"True"}, f"decode steps on a graph: {steps.count('True')} of {len(steps)}"
    eager_log = _run(runs, "eager")["log"]
    eager = DECODE_GRAPH.findall(eager_log)
    assert eager and set(eager) == {"False"} and not CAPTURED.search(eager_log)


@pytest.mark.parametrize("server", ["eager", "graphs"])
def test_dynamic_heads_bring_rows_from_the_host_tier(runs, server):
    run = _run(runs, server)
    assert all(m["dynamic_heads"] > 0 for m in _meta(run, "dynamic")), server
    idle = run["idle"]
    assert 0 < idle["retrieval_rows_copied"] <= idle["retrieval_rows_selected"], (server, idle)


@pytest.mark.parametrize("server", ["eager", "graphs"])
def test_every_slot_is_free_at_idle_and_one_plan_per_decode_forward(runs, server):
    idle = _run(runs, server)["idle"]
    assert "not_idle" not in idle, idle.get("not_idle")
    assert idle["compressed_requests_live"] == 0 and idle["released_total"] == idle["compacted_total"] >= 24
    assert idle["staging_available_tokens"] + idle["radix_evictable_tokens"] == idle["staging_max_total_tokens"]
    # One plan per decode forward SGLang ran (graph replays included, captures not), one call per layer.
    assert idle["decode_plans_built"] == idle["sglang_decode_forwards"] > 0
    assert idle["decode_layer_calls"] == 2 * idle["decode_plans_built"]
