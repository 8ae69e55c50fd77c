#!/usr/bin/env bash
# GPU check (README "Scale benchmark"): on one GPU, in under 8 minutes,
#   1. faiss-gpu against faiss-cpu k-means on a fixed seed: same assignments up to a label permutation, speed ratio;
#   2. a PCL run, ResNet-18 on Fashion-MNIST resized to 32, one Train worker, the cluster actor sharing the
#      worker's GPU (estep.gpu_share), two epochs with the E-step on faiss-gpu;
#   3. bf16 against fp32 M-step throughput (run.py bench --parts mstep);
#   4. host syncs per guarded training step of each method (torch.cuda.set_sync_debug_mode, GPU only);
#   5. the step's MFU in both memory layouts, and torch.compile's warm-up and speed-up (train.compile: auto = off
#      until this says a GPU gains from it).
# Usage: scripts/gpu_check.sh [--dry]   (--dry: the same three steps on the CPU at toy sizes, about 6 min on 2 busy cores,
# to check the script itself on a machine without a GPU). Output: stdout and $OUT_DIR (default runs/gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DRY=0
if [[ "${1:-}" == "--dry" ]]; then DRY=1; elif [[ -n "${1:-}" ]]; then echo "usage: $0 [--dry]" >&2; exit 2; fi
OUT_DIR=${OUT_DIR:-runs/gpu-check}
mkdir -p "$OUT_DIR"
STORE="$OUT_DIR/runs"
MLRUNS="sqlite:///$(cd "$OUT_DIR" && pwd)/mlflow.db"
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

if [[ $DRY == 0 ]]; then
  "$PY" - <<'PY' || { echo "no CUDA GPU visible to torch or faiss-gpu missing: run with --dry on a CPU machine" >&2; exit 1; }
import faiss, torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
assert hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0, "faiss has no GPU build / sees no GPU"
print("GPU:", torch.cuda.get_device_name(0), "| faiss", faiss.__version__, "GPUs", faiss.get_num_gpus())
PY
fi

step "1. faiss-gpu vs faiss-cpu k-means"
DRY=$DRY timeout 240 "$PY" - <<'PY'
import os, time
import numpy as np
from scipy.optimize import linear_sum_assignment
from pcl_ray.bench_scale import synthetic_embeddings
from pcl_ray.estep.kmeans import kmeans

dry = os.environ["DRY"] == "1"
n, k = (20_000, 100) if dry else (200_000, 1_000)
x = synthetic_embeddings(n, centres=k, seed=0)
x /= np.linalg.norm(x, axis=1, keepdims=True)
other = "cpu" if dry else "gpu"  # --dry: faiss-cpu against itself (checks the comparison, not the GPU)
res, secs = {}, {}
for backend in ("cpu", other, "cpu", other):  # alternate: each timed twice, the faster kept
    t0 = time.perf_counter()
    res[backend] = kmeans(x, k, niter=10, nredo=1, seed=0, backend=backend)
    secs[backend] = min(secs.get(backend, 1e9), time.perf_counter() - t0)
a, b = res["cpu"].assignments, res[other].assignments
counts = np.zeros((k, k), np.int64)
np.add.at(counts, (a, b), 1)
rows, cols = linear_sum_assignment(-counts)  # best label permutation
agree = counts[rows, cols].sum() / n
print(f"N={n} k={k} niter=10: faiss-cpu {secs['cpu']:.2f}s, faiss-{other} {secs[other]:.2f}s, "
      f"speed ratio cpu/{other} {secs['cpu'] / secs[other]:.1f}x; assignments equal up to permutation: {agree:.4%}")
# float summation order differs between CPU and GPU: a few boundary points may flip, nothing more
assert agree > 0.99, f"faiss-cpu and faiss-{other} disagree on {1 - agree:.2%} of the points"
PY

step "2. PCL ResNet-18 on Fashion-MNIST at 32px, 1 worker, actor sharing the GPU, 2 epochs"
if [[ $DRY == 1 ]]; then
  SETS=(--set ray.use_gpu=false --set estep.backend=cpu --set model.backbone=convnet --set data.subset=2000
        --set estep.num_clusters=[10,20] --set train.batch_size=128)
else
  SETS=(--set ray.use_gpu=true --set estep.backend=auto --set estep.gpu_share=0.25 --set model.backbone=resnet18
        --set data.subset=20000)
fi
timeout 300 "$PY" run.py train pipelines/fmnist_pcl.yaml --set data.image_size=32 --set ray.num_workers=1 \
  --set train.epochs=2 --set train.warmup_epochs=0 --set eval.enabled=false --set ray.storage_path="$STORE" \
  --set tracking.uri="$MLRUNS" "${SETS[@]}" 2>&1 | tee "$OUT_DIR/train.log" \
  | grep -E "E-step|img/s|final epoch|error|warning" || true
grep -q "E-step on faiss-" "$OUT_DIR/train.log" || { echo "the run did not print its E-step backend" >&2; exit 1; }
if [[ $DRY == 0 ]]; then
  grep -q "E-step on faiss-gpu" "$OUT_DIR/train.log" || { echo "the E-step did not run on faiss-gpu" >&2; exit 1; }
fi

step "3. bf16 vs fp32 M-step throughput"
STEPS=$([[ $DRY == 1 ]] && echo 3 || echo 30)
BACKBONE=$([[ $DRY == 1 ]] && echo convnet || echo resnet18)
for prec in fp32 bf16; do
  timeout 150 "$PY" run.py bench pipelines/fmnist_pcl.yaml --parts mstep --steps "$STEPS" --no-mlflow \
    --out "$OUT_DIR/bench-$prec" --set train.precision=$prec --set data.image_size=32 \
    --set model.backbone=$BACKBONE --set data.subset=4000 >"$OUT_DIR/bench-$prec.log" 2>&1 \
    || { echo "bench $prec failed:"; tail -5 "$OUT_DIR/bench-$prec.log"; continue; }
  grep -E "M-step" "$OUT_DIR/bench-$prec.log" | sed "s/^/$prec: /"
done
step "4. host syncs per guarded training step (torch.cuda.set_sync_debug_mode)"
if [[ $DRY == 1 ]]; then
  echo "skipped on the CPU (sync debug mode is a CUDA feature; tests/training/test_host_reads.py covers the Python-level reads)"
else
  timeout 120 "$PY" - <<'PY' || echo "sync count failed"
import warnings
import torch
from tests.training.test_host_reads import CASES, _setup
from pcl_ray.data import load_split
from pcl_ray.config import load_config
from pcl_ray.training import FiniteGuard, build_optimizer, train_step
from tests.training.test_host_reads import TINY, BATCH

ds = load_split(load_config(TINY).data, "train")
for case, overrides in sorted(CASES.items()):
    cfg, method, views, prototypes = _setup(overrides, ds)
    method = method.cuda()
    views = [v.cuda() for v in views]
    if prototypes is not None:
        prototypes = [p._replace(**{f: getattr(p, f).cuda() for f in p._fields}) for p in prototypes]
        method.on_prototypes(prototypes)
    opt = build_optimizer(cfg, method.net.parameters())
    index, guard = torch.arange(BATCH, device="cuda"), FiniteGuard()
    gen = torch.Generator(device="cuda").manual_seed(0)
    step = lambda n: train_step(method, method.net, opt, views, index, prototypes, generator=gen, epoch=0,
                                global_step=n, guard=guard)
    step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(1)
    torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    print(f"{case:12s} {len(syncs)} host sync(s) per step" + (f": {syncs[0][:90]}" if syncs else ""))
PY
fi

step "5. layouts and torch.compile on this device (run.py bench --parts mfu,compile)"
PARTS=$([[ $DRY == 1 ]] && echo mfu || echo mfu,compile)
timeout 300 "$PY" run.py bench pipelines/fmnist_pcl.yaml --parts "$PARTS" --steps "$STEPS" --no-mlflow \
  --out "$OUT_DIR/bench-mfu" --set data.image_size=32 --set model.backbone=$BACKBONE --set data.subset=4000 \
  >"$OUT_DIR/bench-mfu.log" 2>&1 || { echo "bench mfu/compile failed:"; tail -5 "$OUT_DIR/bench-mfu.log"; }
grep -E "MFU|torch.compile" "$OUT_DIR/bench-mfu.log" || true

echo; echo "gpu_check done ($([[ $DRY == 1 ]] && echo 'dry run, CPU' || echo GPU)); logs in $OUT_DIR"
