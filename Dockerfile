# compressor on an NVIDIA GPU: `compress --target tensorrt` (or torch-tensorrt) on the image's own CUDA stack.
#
#   docker build -t compressor .
#   docker run --gpus all -v $PWD:/work compressor --teacher ensemble.pt --target tensorrt
#
# Base image: NVIDIA's PyTorch container, which ships PyTorch, TensorRT, Torch-TensorRT and Triton built against one
# CUDA. 26.07 is the first release with TensorRT 11 (with pre-release builds of PyTorch 2.14 and Torch-TensorRT
# 2.14); 26.06 ships PyTorch 2.13 with TensorRT 10.16, which targets/tensorrt.py also builds with (it asks TensorRT 10
# for a strongly typed network). To use another release, pass its tag; NVIDIA's PyTorch container release notes list
# what each one ships:
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:26.06-py3 -t compressor .
# The host needs an NVIDIA driver recent enough for the image's CUDA and the NVIDIA Container Toolkit (--gpus).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.07-py3
FROM ${BASE_IMAGE}

# PIP_BREAK_SYSTEM_PACKAGES: the image's Python is the system one; in a container, installing into it is the point.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1

# Only what the package needs; the repository (tests, benchmarks) comes in through the /work mount at run time.
WORKDIR /opt/compressor
COPY pyproject.toml README.md ./
COPY compressor ./compressor
COPY targets ./targets

# Never replace the image's torch, tensorrt, torch_tensorrt, triton or numpy: `pip install .[gpu]` would resolve
# torch-tensorrt's and tensorrt's requirements against PyPI and could pull a different torch and a second TensorRT.
# So (1) every package the image has is pinned to its installed version through a constraints file made from
# `pip list`, (2) compressor goes in with --no-deps, and (3) only what the image lacks is added, under those
# constraints: the rest of pyproject's dependencies, the gpu extra's onnxruntime-gpu, and the dev extra (the test
# tools benchmarks/gpu_suite.sh runs). Keep this list in step with pyproject.toml. Nothing is downloaded but
# Python packages: no datasets, no weights (the digits set ships inside scikit-learn).
RUN pip list --format=freeze > /tmp/image-constraints.txt \
 && pip install --no-deps . \
 && pip install -c /tmp/image-constraints.txt \
        "onnx>=1.17" "onnxscript>=0.2" "onnxruntime-gpu>=1.20" "scikit-learn>=1.4" "click>=8.1" "rich>=13" \
        "matplotlib>=3.8" "pytest>=8" "pytest-timeout>=2.3" "tritonclient[grpc]>=2.40" \
 && rm /tmp/image-constraints.txt \
 && python -c "import importlib.util as u; missing = [m for m in ('torch', 'tensorrt', 'torch_tensorrt', 'triton') \
        if u.find_spec(m) is None]; assert not missing, f'the base image lacks {missing}'"

# A non-root user with uid 1000, the usual first user on a Linux host, so files written to the /work mount are yours
# (otherwise run with --user "$(id -u):$(id -g)" -e HOME=/tmp). Ubuntu 24.04 images give uid 1000 to "ubuntu".
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && useradd --create-home --uid 1000 --shell /bin/bash compressor
USER compressor
WORKDIR /work

ENTRYPOINT ["compress"]
CMD ["--help"]
