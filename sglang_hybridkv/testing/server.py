"""Start and stop a real SGLang server on loopback (CPU by default) for tests, examples and benchmarks."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Awaitable, Iterator

CPU_COMPAT = os.path.join(os.path.dirname(__file__), "cpu_compat")


def free_port(lo: int | None = None, hi: int | None = None) -> int:
    """A free loopback port: any, or the first free one in ``[lo, hi)`` (hosts that share port ranges)."""
    for port in (range(lo, hi) if lo is not None else [0]):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in [{lo}, {hi})")


def cpu_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for SGLang on a CPU: the CPU engine flag and our ``sgl_kernel`` stand-in on PYTHONPATH."""
    env = dict(os.environ)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (CPU_COMPAT, env.get("PYTHONPATH", "")) if p)
    env.pop("TRITON_INTERPRET", None)  # the server's own Triton code must not run interpreted
    # SGLang gives LLaVA's image preprocessing (a process pool) 10 s by default; the pool's first worker starts
    # inside that deadline, which a loaded 2-core machine misses, and the request then fails with HTTP 500.
    env.setdefault("REQUEST_TIMEOUT", "300")
    env.update(extra or {})
    return env


def server_command(model_path: str, port: int, device: str = "cpu", max_total_tokens: int = 16384,
                   extra_args: list[str] | None = None, serve: bool = False) -> list[str]:
    """``python -m sglang.launch_server ...``, or with ``serve`` SGLang's newer CLI, ``sglang serve ...``."""
    launcher = ([os.path.join(os.path.dirname(sys.executable), "sglang"), "serve"] if serve
                else [sys.executable, "-m", "sglang.launch_server"])
    cmd = launcher + ["--model-path", model_path, "--host", "127.0.0.1", "--port", str(port), "--device", device,
                      "--log-level", "warning"]
    if device == "cpu":
        for name, value in cpu_settings(max_total_tokens).items():
            flag = f"--{name.replace('_', '-')}"
            cmd += [flag] if value is True else [flag, str(value)]
        cmd += ["--skip-server-warmup"]
    return cmd + list(extra_args or [])


def cpu_settings(max_total_tokens: int = 16384) -> dict:
    """Server arguments for SGLang on a CPU (flags of ``server_command``, keywords of ``sgl.Engine``).

    ``sleep_on_idle``: an idle scheduler otherwise busy-polls its sockets at 100 % of a core, and SGLang's CPU
    kernels slow down ~10x when any other process takes a core, so a second server left idle (a reference
    server in a test, say) would slow the busy one down that much."""
    return {"attention_backend": "torch_native", "max_total_tokens": max_total_tokens, "mem_fraction_static": 0.4,
            "dtype": "float32", "sleep_on_idle": True}


def post(url: str, payload: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        raise HTTPError(e.code, body) from None


def generate_all(url: str, requests: list[dict], sampling_params: dict | None = None,
                 together: bool = False) -> list[dict]:
    """``/generate`` responses of ``requests``, in order: sent one after another (each request alone on the
    server), or all at once (decoded together). A body without ``sampling_params`` gets ``sampling_params``."""
    reqs = [r if "sampling_params" in r else dict(r, sampling_params=sampling_params) for r in requests]
    if not together:
        return [post(url + "/generate", r) for r in reqs]
    with cf.ThreadPoolExecutor(len(reqs)) as ex:
        return list(ex.map(lambda r: post(url + "/generate", r), reqs))


async def abandon_after(request: Awaitable, seconds: float) -> None:
    """Run ``request`` and walk away from it after ``seconds`` (a client that leaves while its request is queued
    or prefilling): the task is cancelled, which closes its connection."""
    task = asyncio.ensure_future(request)
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def get(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


class HTTPError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status, self.body = status, body


@contextlib.contextmanager
def sglang_server(model_path: str, extra_args: list[str] | None = None, device: str = "cpu",
                  max_total_tokens: int = 16384, timeout: float = 300, log_path: str | None = None,
                  env: dict[str, str] | None = None, progress: bool = False, serve: bool = False,
                  port: int | None = None) -> Iterator[str]:
    """Run ``sglang.launch_server`` until the block exits; yields its base URL.

    Start-up failures raise with the tail of the server log. The server is stopped with SIGTERM (SIGKILL after
    20 s) and its whole process group is reaped, so no scheduler process outlives the block.
    """
    port = port or free_port()
    cmd = server_command(model_path, port, device, max_total_tokens, extra_args, serve)
    log_path = log_path or os.path.join("/tmp", f"sglang-hybridkv-server-{port}.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=cpu_env(env) if device == "cpu" else {**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"SGLang server exited with {proc.returncode} during start-up:\n{_tail(log_path)}")
            try:
                get(url + "/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() - t0 > timeout:
                raise TimeoutError(f"SGLang server not ready after {timeout:.0f}s:\n{_tail(log_path)}")
            if progress and (sys.stderr.isatty() or int(time.time() - t0) % 10 == 0):
                print(f"\r  starting SGLang ({' '.join(extra_args or []) or 'no compression'}) ... "
                      f"{time.time() - t0:4.0f}s", end="", file=sys.stderr, flush=True)
            time.sleep(1)
        if progress:
            print(f"\r  SGLang ready in {time.time() - t0:.0f}s at {url}" + " " * 30, file=sys.stderr, flush=True)
        yield url
    finally:
        _stop(proc)
        log.close()


def server_log(url: str) -> str:
    port = url.rsplit(":", 1)[1]
    with open(os.path.join("/tmp", f"sglang-hybridkv-server-{port}.log")) as f:
        return f.read()


def decode_slot_counts(url: str, after: int = 0) -> list[int]:
    """SGLang's own count of KV slots in use at each logged decode step, past log offset ``after`` (the server
    must run with ``--log-level info --decode-log-interval 1``)."""
    return _decode_field(url, after, "#token")


def decode_running_counts(url: str, after: int = 0) -> list[int]:
    """SGLang's own count of running requests at each logged decode step (same log settings)."""
    return _decode_field(url, after, "#running-req")


def decode_step_times(url: str, after: int = 0) -> list[tuple[int, float]]:
    """``(running requests, seconds per decode step)`` at each logged decode step (same log settings): SGLang
    logs the generation throughput since its previous decode log line, so one step took running / throughput
    (a step right after a prefill batch includes that prefill)."""
    found = re.findall(r"Decode batch.*?#running-req: (\d+).*?gen throughput \(token/s\): ([\d.]+)",
                       server_log(url)[after:])
    return [(int(n), int(n) / float(t)) for n, t in found if float(t) > 0]


def _decode_field(url: str, after: int, name: str) -> list[int]:
    return [int(m) for m in re.findall(rf"Decode batch.*?{name}: (\d+)", server_log(url)[after:])]


def hybridkv_state(url: str) -> dict:
    """The plugin's counters from ``/server_info`` (absent when the server runs without compression)."""
    return get(url + "/server_info")["internal_states"][0].get("hybridkv", {})


def wait_idle(url: str, timeout: float = 60) -> dict:
    """Poll the plugin's counters until no request holds KV (every slot is free or an evictable radix entry and
    no compressed region is live); returns the counters. Raises with them on timeout."""
    deadline = time.time() + timeout
    while True:
        st = hybridkv_state(url)
        held = st["staging_max_total_tokens"] - st["staging_available_tokens"] - st["radix_evictable_tokens"]
        if st["compressed_requests_live"] == 0 and held == 0:
            return st
        if time.time() > deadline:
            raise TimeoutError(f"server not idle after {timeout:.0f}s: {st}")
        time.sleep(0.5)


def _tail(path: str, n: int = 40) -> str:
    with open(path) as f:
        return "".join(f.readlines()[-n:])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(120)  # a killed process still waits for memory it is reclaiming on a loaded machine
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
