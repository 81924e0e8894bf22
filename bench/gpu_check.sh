#!/usr/bin/env bash
# Everything a lent GPU should show, in one device call of under 600 s (../shared/GPU.md):
#   1. the versions there (torch, CUDA device, transformers, peft, bitsandbytes);
#   2. the Triton LoRA kernel tests, on CUDA this time, and the fp32 fidelity tests (the
#      engine on CUDA, served tokens against PEFT's on the CPU);
#   3. the benchmark on a Llama-3-8B-shaped model in NF4, N = 0, 1, 32 (ADAPTERS="0 1 8 32"
#      adds N = 8, if the time allows), one round (`segmented`;
#      LORA_BACKENDS="segmented triton" adds a second engine in the same rounds, but each
#      engine loads the 8B model and its 32 adapters: likely too long for one call).
# Not timed yet on a GPU: building the model, the NF4 loads (HF, PEFT with 32 adapters,
# each engine) come first; every timed run is printed as it ends (bench.txt) and the JSON
# is written after each workload, so a run cut by the timeout keeps what it finished.
# Results go to $OUT (the device tool brings that folder back), else bench/results/gpu-run.
# BUDGET (570 s) bounds the whole script: the bench's timeout is what the tests leave of it.
#
# Here first: `make gpu-wheels` (the bitsandbytes wheel into .whl/); then on the device,
# with carry [".whl"]:
#   bash bench/gpu_check.sh
# A dry run of the same steps here, on the CPU and the tiny model (figures mean nothing):
#   SHAPE=small LORA_BACKENDS="auto segmented" QUANTIZE=none TRITON_INTERPRET=1 \
#     PYTHON=.venv/bin/python bash bench/gpu_check.sh
set -uo pipefail
budget=${BUDGET:-570}  # seconds for the whole script: the bench gets what the tests leave
out=${OUT:-bench/results/gpu-run}
shape=${SHAPE:-llama3-8b}
backends=${LORA_BACKENDS:-segmented}
quantize=${QUANTIZE:-nf4}
adapters=${ADAPTERS:-0 1 32}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # what a timeout cuts short is still in the files
mkdir -p "$out"

if compgen -G ".whl/*.whl" > /dev/null; then  # packages the device image lacks
  "$py" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/server:$PWD/clients/python:$PWD${PYTHONPATH:+:$PYTHONPATH}

"$py" - << 'EOF' 2>&1 | tee "$out/env.txt"
import importlib
import torch
print("torch", torch.__version__, "| device:",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in ("transformers", "peft", "bitsandbytes", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as exc:
        print(name, "MISSING:", exc)
EOF
if [ "$quantize" != none ] && ! "$py" -c "import bitsandbytes" 2> /dev/null; then
  echo "bitsandbytes is missing: carry [\".whl\"] with its wheel (../shared/GPU.md)" \
    | tee -a "$out/env.txt"
  exit 1
fi

# compiled kernels on the GPU (TRITON_INTERPRET=1, the tests' own default, runs them on the CPU)
TRITON_INTERPRET=${TRITON_INTERPRET:-0} timeout 180 "$py" -m pytest -q -p no:cacheprovider \
  --durations=5 tests/test_triton_ops.py 2>&1 \
  | tail -n 25 | tee "$out/triton-tests.txt"

# served tokens against PEFT's on the same weights: the engine on CUDA in fp32, the
# reference (tests/peft_reference.py) on the CPU; every request of a mixed batch must match
timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/test_fidelity.py \
  -k mixed_batch_equals_peft_alone_fp32 2>&1 | tail -n 15 | tee "$out/fidelity-tests.txt"

# the bf16 model is 16 GB: /dev/shm when it has room, else the disk
work=/dev/shm/loraplex-bench
if [ "$(df --output=avail -k /dev/shm 2> /dev/null | tail -n 1)" -lt 40000000 ] 2> /dev/null; then
  work=/tmp/loraplex-bench
fi
df -h /dev/shm /tmp 2>&1 | tee -a "$out/env.txt"

left=$((budget - SECONDS))
echo "bench timeout: ${BENCH_TIMEOUT:-$left} s" | tee -a "$out/env.txt"
# shellcheck disable=SC2086  # $adapters and $backends are lists of words
timeout "${BENCH_TIMEOUT:-$left}" "$py" -m bench.bench --shape "$shape" --quantize "$quantize" \
  --kv-cache-memory 2GiB --adapters $adapters --repeat "${REPEAT:-1}" --lora-backend $backends \
  --workdir "$work" --out "$out/bench-$shape-$quantize.json" 2>&1 \
  | grep --line-buffered -v "Loading weights" | tee "$out/bench.txt"
echo "bench exit status: ${PIPESTATUS[0]}" | tee -a "$out/bench.txt"
