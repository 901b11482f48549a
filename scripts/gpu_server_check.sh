#!/usr/bin/env bash
# One command for the lent GPU machine (Python 3.12, torch 2.11, Triton 3.6, no SGLang, no network), run from the
# repository with .gpu/ beside it (scripts/gpu_bundle.sh, run where PyPI is reachable). Installs the bundle into a
# scratch folder (pip --no-index --target; SGLang unpacked; the CUDA sgl_kernel stand-in first on PYTHONPATH), then:
#   server  (default; stopped after 6 minutes) tests/gpu/test_server_gpu.py: a tiny random Llama served with
#           --device cuda by stock SGLang and by --kv-compression hybridkv with decode graphs off and with
#           breakable decode graphs on (same tokens; budget 1.0 == stock; graphs captured and replayed;
#           dynamic heads copy rows from the host tier; no slot held at idle)
#   serving (stopped after 7 minutes) benchmarks/serving.py on a Llama-3-8B-shaped model with random weights
#           (--load-format dummy, bf16, the SmolLM2 tokenizer) at one pool of 8192 tokens, 32 requests of
#           ~1,230 prompt tokens and 160 output tokens each (ignore_eos): rows none, hybridkv@0.1 and the
#           oracle (none on a pool big enough for hybridkv's concurrency); JSON with "device" naming the GPU
#   all     server, then serving (one call: the machine starts once)
# ORACLE=0 skips serving's oracle row. serving's workload can be changed with FRAMES (~13 prompt tokens each), POOL (tokens), REQUESTS, OUTPUT_LEN and
# TAG (suffix of its JSON/log names), e.g. FRAMES=320 POOL=24576 TAG=-long for video-length prompts. GRAPHS_ROW=KIND
# (e.g. breakable) adds a run of the hybridkv@0.1 row alone with --cuda-graph-backend-decode KIND
# (serving-gpu$TAG-KIND.json; GRAPHS_TIMEOUT seconds, default 240); with STACKS=1 every process of that server
# samples its stacks (benchmarks/stack_sampler; summary in stacks-summary$TAG.txt). MAIN_ROWS= (empty) skips the
# main serving run.
# OUTDIR gets setup.log, the test's and the benchmark's output, serving-gpu$TAG.json and logs$TAG.tar.gz (every
# server log): under the 8 files the device tool brings back. Exit status: the checks' own (0 = all passed).
#   bash scripts/gpu_server_check.sh OUTDIR [server|serving|all]
# With the device tool: run(command="bash scripts/gpu_server_check.sh $OUT all", carry=[".gpu"], timeout_s=600).
set -euo pipefail  # (not inside the `{ ...; } || fail` blocks below: their steps are chained with &&)
usage() { echo "usage: bash scripts/gpu_server_check.sh OUTDIR [server|serving|all]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
mode=${2:-server}
case $mode in server|serving|all) ;; *) usage ;; esac
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-python3}
[ -d .gpu/wheels ] && [ -f .gpu/sglang-0.5.23-trimmed.tar.xz ] \
  || { echo "gpu_server_check: no bundle in .gpu/: run scripts/gpu_bundle.sh first and carry .gpu" >&2; exit 2; }

work=$(mktemp -d)
site=$work/site
compat=$repo/sglang_hybridkv/testing/cuda_compat
{
  echo "== bundle install ($(date -u +%H:%M:%S))"
  "$py" -m pip install -q --root-user-action=ignore --disable-pip-version-check --no-index --no-deps --no-compile \
    --target "$site" .gpu/wheels/*.whl &&
  tar -C "$site" -xJf .gpu/sglang-0.5.23-trimmed.tar.xz
} >"$out/setup.log" 2>&1 || { cat "$out/setup.log" >&2; exit 1; }
# The environment the simulated-CUDA import test (tests/test_cuda_stand_in.py) checks SGLang's launch path with.
# shellcheck disable=SC2046  # KEY=VALUE words
export $("$py" -c "import sys; sys.path.insert(0, '$compat'); import launch_imports as l
print(' '.join(f'{k}={v}' for k, v in l.ENV.items()))")
tag=${TAG:-}
logs=$work/logs
mkdir -p "$logs"
export PYTHONPATH=$compat:$site PYTHONUNBUFFERED=1 HYBRIDKV_TOKENIZER=$repo/.gpu/tokenizer HYBRIDKV_GPU_LOG_DIR=$logs
unset SGLANG_USE_CPU_ENGINE TRITON_INTERPRET
# From outside the repository: `sglang_hybridkv` is then the installed wheel (with its kernels subpackage).
cd "$work"
{
  echo "== device"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$py" -c "import importlib.metadata as m, sys, torch, triton, transformers, sglang_hybridkv
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__, 'sglang', m.version('sglang'))
print('sglang-hybridkv from', sglang_hybridkv.__file__)
assert torch.cuda.is_available(), 'no CUDA device: the GPU tests would only be skipped'
import sgl_kernel; print('sgl_kernel from', sgl_kernel.__file__)" &&
  env | grep -E '^(SGLANG_|PYTHONPATH=|HYBRIDKV_)' | sort
} >>"$out/setup.log" 2>&1 || { cat "$out/setup.log" >&2; exit 1; }
cat "$out/setup.log"
set +e

rc=0
if [ "$mode" != serving ]; then
  timeout "${SERVER_TIMEOUT:-300}" "$py" -m pytest -q -p no:cacheprovider --import-mode=importlib --rootdir "$repo" \
    -c "$repo/pyproject.toml" -m gpu "$repo/tests/gpu/test_server_gpu.py" 2>&1 | tee "$out/server-test.log"
  rc=${PIPESTATUS[0]}
  echo "server check: exit $rc"
fi
if [ "$mode" != server ]; then
  model=$work/llama-8b-dummy
  mkdir -p "$model"
  cp "$repo"/.gpu/tokenizer/* "$model"/
  cat >"$model/config.json" <<'EOF'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16", "hidden_size": 4096,
 "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
 "head_dim": 128, "hidden_act": "silu", "vocab_size": 49152, "max_position_embeddings": 32768,
 "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2}
EOF
  touch "$work/started"
  serve() {  # serve TAG ROWS DECODE_GRAPHS TIMEOUT: one benchmarks/serving.py run; its exit status
    ROWS=$2 DECODE_GRAPHS=$3 timeout "$4" "$py" - "$repo" "$model" "$out/serving-gpu$1.json" <<'EOF' 2>&1 | tee "$out/serving$1.log"
import json
import os
import sys

import torch

repo, model, out = sys.argv[1:]
sys.path.insert(0, f"{repo}/benchmarks")
import serving  # noqa: E402


def on_gpu(model_path, extra_args=None, max_total_tokens=16384, **kwargs):
    """serving.py's servers with what it does not pass on CUDA: its pool (testing.server applies
    max_total_tokens on CPU only), random weights from config.json (nothing to download), decode graphs for up to
    64 requests (shorter start-up); for the uncompressed servers SGLang's Triton backend (its Hopper default, FA3,
    needs the real sgl_kernel) and prefill graphs off, as the plugin sets them for the compressed one."""
    extra = list(extra_args or []) + ["--max-total-tokens", str(max_total_tokens), "--load-format", "dummy",
                                      "--cuda-graph-max-bs-decode", "64"]
    if "--kv-compression" not in extra:
        extra += ["--attention-backend", "triton", "--disable-prefill-cuda-graph"]
    elif env("DECODE_GRAPHS"):
        extra += ["--cuda-graph-backend-decode", env("DECODE_GRAPHS")]
    return sglang_server(model_path, extra_args=extra, max_total_tokens=max_total_tokens, **kwargs)


env = os.environ.get
sglang_server, serving.sglang_server = serving.sglang_server, on_gpu
rows = env("ROWS")
report = serving.main(["--device", "cuda", "--model-path", model, "--pool-tokens", env("POOL", "8192"),
                       "--requests", env("REQUESTS", "32"), "--frames", env("FRAMES", "96"),
                       "--output-len", env("OUTPUT_LEN", "160"), "--rows", rows]
                      + ([] if rows.startswith("none") and env("ORACLE", "1") == "1" else ["--no-oracle"]))
report.update(device=torch.cuda.get_device_name(), model="Llama-3-8B-shaped, --load-format dummy, bf16",
              compressed_decode_graphs=env("DECODE_GRAPHS") or "plugin default")
with open(out, "w") as f:
    json.dump(report, f, indent=2)
EOF
    return "${PIPESTATUS[0]}"
  }
  if [ -n "${MAIN_ROWS-none,hybridkv@0.1}" ]; then
    serve "$tag" "${MAIN_ROWS-none,hybridkv@0.1}" "" "${SERVING_TIMEOUT:-420}"
    serving_rc=$?
    echo "serving: exit $serving_rc"
    [ "$serving_rc" = 0 ] || rc=$serving_rc
  fi
  if [ -n "${GRAPHS_ROW:-}" ]; then  # hybridkv@0.1 once more with SGLang's decode graphs of that kind, no oracle
    if [ -n "${STACKS:-}" ]; then  # sample every server process's stacks (benchmarks/stack_sampler)
      export HYBRIDKV_STACK_SAMPLES=$logs/stacks PYTHONPATH=$repo/benchmarks/stack_sampler:$PYTHONPATH
    fi
    serve "$tag-$GRAPHS_ROW" hybridkv@0.1 "$GRAPHS_ROW" "${GRAPHS_TIMEOUT:-240}"
    graphs_rc=$?
    echo "serving with $GRAPHS_ROW decode graphs: exit $graphs_rc"
    [ "$graphs_rc" = 0 ] || rc=$graphs_rc
    if [ -n "${STACKS:-}" ]; then
      unset HYBRIDKV_STACK_SAMPLES
      "$py" "$repo/benchmarks/stack_summary.py" --top 60 "$logs"/stacks.*.txt >"$out/stacks-summary$tag.txt" 2>&1
    fi
  fi
  find /tmp -maxdepth 1 -name 'sglang-hybridkv-server-*.log' -newer "$work/started" -exec cp {} "$logs"/ \;
fi
tar -C "$logs" -czf "$out/logs$tag.tar.gz" .
echo "gpu_server_check $mode: exit $rc; files in $out: $(ls "$out" | tr '\n' ' ')"
exit "$rc"
