"""A real ``tritonserver`` on loopback serving one model of a bundle: by default the binary PyPI's
``nvidia-pytriton`` wheel carries (python backend only; it runs on a CPU machine), which the serving tests and
``benchmarks/triton_serving.py`` start, a way to try a bundle under Triton without a container; or an installed
Triton (``server=/opt/tritonserver`` in NVIDIA's Triton container, whose onnxruntime and tensorrt backends serve
the bundle's ``onnxruntime_onnx`` and ``tensorrt_plan`` models).

The bundle's Triton repository is copied into a work folder, where a python-backend model gets this
interpreter's site-packages (so ``model.py`` imports the onnxruntime installed here) and, under nvidia-pytriton's
binary, this interpreter's stub; the server loads only the named model (``--model-control-mode explicit``), and is
stopped however the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterator

from compressor.core.errors import MissingCapabilityError

READY_TIMEOUT_S = 90


def server_root() -> Path:
    """The ``tritonserver`` folder of the installed nvidia-pytriton wheel, or a one-line error saying how to get it."""
    spec = importlib.util.find_spec("pytriton")
    root = None if spec is None else Path(spec.origin).parent / "tritonserver"
    if root is None or not (root / "bin" / "tritonserver").is_file() or not _stub(root).is_file():
        raise MissingCapabilityError(
            f"no tritonserver with a python {sys.version_info.major}.{sys.version_info.minor} backend here: "
            f"pip install --no-deps nvidia-pytriton (its wheel carries the binary), or serve the bundle with "
            f"NVIDIA's Triton container")
    return root


def _stub(root: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return root / "python_backend_stubs" / version / "triton_python_backend_stub"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_tritonserver(triton_repository: Path, model: str, work: Path,
                       server: Path | None = None) -> Iterator[tuple[str, str]]:
    """Serve ``model`` of ``triton_repository`` (a bundle's ``triton/``) on loopback; yields the HTTP and gRPC
    ``host:port``. ``server`` is an installed Triton's folder (``bin/tritonserver``, ``backends/``), by default
    nvidia-pytriton's. The server's log is ``work/server.log``."""
    work.mkdir(parents=True, exist_ok=True)
    repository = work / "repository"
    shutil.copytree(triton_repository, repository, dirs_exist_ok=True)
    config = repository / model / "config.pbtxt"
    if 'backend: "python"' in config.read_text():
        site = sysconfig.get_paths()["purelib"]  # where this interpreter finds onnxruntime
        config.write_text(config.read_text() +
                          f'parameters: {{ key: "python_path" value: {{ string_value: "{site}" }} }}\n')
    if server is None:
        root = server_root()
        backends = work / "backends"
        shutil.copytree(root / "backends", backends, dirs_exist_ok=True)
        shutil.copy(_stub(root), backends / "python" / "triton_python_backend_stub")
        # the wheel's binary finds libpython and its own libraries there; an installed Triton needs neither
        libraries = [sysconfig.get_config_var("LIBDIR"), str(root.parents[1] / "nvidia_pytriton.libs")]
    else:
        root, backends, libraries = Path(server), Path(server) / "backends", []
        if not (root / "bin" / "tritonserver").is_file():
            raise MissingCapabilityError(f"{root}: no bin/tritonserver there; give the folder of an installed Triton "
                                         "(/opt/tritonserver in NVIDIA's Triton container)")
    http, grpc, metrics = _free_port(), _free_port(), _free_port()
    libraries.append(os.environ.get("LD_LIBRARY_PATH"))
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, libraries))}
    command = [str(root / "bin" / "tritonserver"), "--model-repository", str(repository),
               "--backend-directory", str(backends), "--model-control-mode", "explicit", "--load-model", model,
               "--http-address", "127.0.0.1", "--http-port", str(http), "--grpc-address", "127.0.0.1",
               "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--allow-metrics", "false",
               "--exit-timeout-secs", "5"]
    with open(work / "server.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_ready(process, f"127.0.0.1:{http}", model, work / "server.log")
            yield f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(server: subprocess.Popen, url: str, model: str, log: Path) -> None:
    import tritonclient.http

    client = tritonclient.http.InferenceServerClient(url)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            with contextlib.suppress(Exception):  # refused until the server listens
                if client.is_model_ready(model):
                    return
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace").splitlines()[-5:]
                raise RuntimeError(f"tritonserver did not serve {model} (see {log}): " + " | ".join(tail))
            time.sleep(0.25)
    finally:
        client.close()
