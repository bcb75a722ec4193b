#!/usr/bin/env bash
# One command for a GPU machine: the GPU- and TensorRT-marked tests of the whole suite (the TensorRT ones skip where
# TensorRT is absent), the tempered-KL benchmark on CUDA (kd, then dkd, ls, dist), the teachers' inference throughput
# on CPU and CUDA (fp32 and bf16), and the demo's main job with its PyTorch rows timed on CUDA (host latency beside
# H2D / compute / D2H CUDA events). Where NVIDIA's Triton container provides /opt/tritonserver with its onnxruntime
# (and tensorrt) backends, the demo's bundle is served by them too: its onnxruntime_onnx model, and a --target
# tensorrt run's tensorrt_plan model, through the bundle's client.py (benchmarks/triton_serving.py). Assumes `pip
# install --no-deps -e .` (plus the dev extras) is done. Results go to $OUT when set, else benchmarks/results/; the
# summary file is gpu_suite-summary.txt there.
set -uo pipefail
cd "$(dirname "$0")/.."
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"
summary="$dest/gpu_suite-summary.txt"
python -m pytest -m "gpu or tensorrt" -q -p no:cacheprovider 2>&1 | tee "$dest/pytest-gpu.log"
tests_rc=${PIPESTATUS[0]}
python benchmarks/bench_tempered_kl.py --device cuda --json "$dest/bench_tempered_kl-cuda.json" 2>&1 \
    | tee "$dest/bench_tempered_kl-cuda.txt"
bench_rc=${PIPESTATUS[0]}
for variant in dkd ls dist; do  # the later soft terms: eager formula, compile, reference, Triton, memory-bound floor
    python benchmarks/bench_tempered_kl.py --device cuda --variant "$variant" --shapes '4096,1000,5;512,32000,3' \
        --json "$dest/bench_tempered_kl-cuda-$variant.json" 2>&1 | tee "$dest/bench_tempered_kl-cuda-$variant.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
done
python benchmarks/teacher_throughput.py --json "$dest/teacher_throughput.json" 2>&1 | tee "$dest/teacher_throughput.txt"
teachers_rc=${PIPESTATUS[0]}
if python -c "import onnxruntime, matplotlib" 2>/dev/null; then
    python -m compressor demo --out "$dest/demo-cuda" --batch-sizes 1,8,64,256 --no-progress 2>&1 \
        | tee "$dest/demo-cuda.txt"
    demo_rc=${PIPESTATUS[0]}
    demo_line="demo on CUDA (exit $demo_rc): $dest/demo-cuda/report.md"
else
    demo_rc=0
    demo_line="demo on CUDA: skipped (onnxruntime or matplotlib not installed here)"
fi
triton_rc=0
triton_line="Triton onnxruntime_onnx / tensorrt_plan: skipped (no /opt/tritonserver with those backends here)"
triton=/opt/tritonserver
if [ -x "$triton/bin/tritonserver" ] && [ -d "$triton/backends/onnxruntime" ] && [ -f "$dest/demo-cuda/report.json" ]
then
    python benchmarks/triton_serving.py --run "$dest/demo-cuda" --model student --tritonserver "$triton" \
        --seconds 3 --out "$dest/triton-onnxruntime.json" 2>&1 | tee "$dest/triton-onnxruntime.txt"
    triton_rc=${PIPESTATUS[0]}
    triton_line="Triton onnxruntime_onnx (exit $triton_rc): $dest/triton-onnxruntime.json"
    if [ -d "$triton/backends/tensorrt" ] && python -c "import tensorrt" 2>/dev/null; then
        python -m compressor demo --target tensorrt --out "$dest/demo-tensorrt" --batch-sizes 1,8,64 --no-progress \
            > "$dest/demo-tensorrt.txt" 2>&1 \
        && python benchmarks/triton_serving.py --run "$dest/demo-tensorrt" --model student --tritonserver "$triton" \
            --seconds 3 --out "$dest/triton-tensorrt.json" 2>&1 | tee "$dest/triton-tensorrt.txt"
        plan_rc=${PIPESTATUS[0]}
        triton_rc=$(( triton_rc != 0 || plan_rc != 0 ))
        triton_line="$triton_line; tensorrt_plan (exit $plan_rc): $dest/triton-tensorrt.json"
    fi
fi
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
    echo "pytest -m gpu (exit $tests_rc): $(tail -n 1 "$dest/pytest-gpu.log")"
    echo "benchmark (exit $bench_rc): $dest/bench_tempered_kl-cuda.json"
    echo "teacher throughput, CPU and CUDA, fp32 and bf16 (exit $teachers_rc): $dest/teacher_throughput.json"
    echo "$demo_line"
    echo "$triton_line"
} > "$summary"
cat "$summary"
exit $(( tests_rc != 0 || bench_rc != 0 || teachers_rc != 0 || demo_rc != 0 || triton_rc != 0 ))
