"""A real `normistral serve` process for the server tests (one per module): started on --port 0, its base
URL read from the line it announces (the real port), healthy before it is handed over; stopped with
SIGTERM (an idle server drains at once), killed if it does not exit."""

import os
import re
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
ANNOUNCED = re.compile(r"normistral serve: \S+ on (http://\S+)/v1 ")


def start_serve(model_dir: str, log_path: str, *args: str, env: dict | None = None):
    """`normistral serve MODEL_DIR --port 0 ARGS...` -> (process, base URL, its log file, open)."""
    cmd = [sys.executable, "-m", "normistral", "serve", model_dir, "--port", "0", *args]
    log = open(log_path, "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV if env is None else env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while True:
        log.seek(0)
        text = log.read()
        if (m := ANNOUNCED.search(text)) is not None:
            base = m.group(1)
            break
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start ({proc.returncode}):\n{text[-3000:]}")
        time.sleep(0.2)
    while True:  # announced just before uvicorn starts serving on the socket
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        time.sleep(0.1)


def stop_serve(proc, log) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(timeout=30)
    log.close()
