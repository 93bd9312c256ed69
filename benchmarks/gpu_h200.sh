#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one call of a lent H200 (about 10 of its 15 minutes):
#
#   bash benchmarks/gpu_h200.sh OUT_DIR
#
# 1. the attention check: cuDNN's fused kernel against XLA on document-masked bf16 inputs, forward
#    and backward (errors against a float32 reference, and times);
# 2. train-step throughput, MFU, peak memory and compile time of the 1B preset and of the
#    Llama-2-7B preset at sequence length 4096 in bf16, each with a profile of three steps
#    summarised by category (matmul, attention, fusions, ...) and top kernels;
# 3. the 1B preset again with model.attention=cudnn: 'auto' takes XLA's attention until this row
#    and step 1 show that cuDNN's path is right and faster;
# 4. the end-to-end step time with the real loader on prepared data against synthetic batches.
# Each writes OUT_DIR/<name>.json or .txt; a table of the headline figures is printed last.
#
# The H200 image has jax, flax, optax, orbax, tensorstore, sentencepiece and tokenizers, but not
# ml-collections, grain or array-record: carry them as wheels (the device tool's README). Here:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
# and the call (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu_h200.sh $OUT
#
# CPT_BENCH_TINY=1 runs the same calls with a tiny model on whatever devices there are (the tests
# do, on the CPU, so that this script cannot rot).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_h200.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
# shellcheck source=launch/xla_gpu_flags.sh
source launch/xla_gpu_flags.sh

if [[ ${CPT_BENCH_TINY:-0} == 1 ]]; then
  tiny=(--config=configs/tiny.py --config.model.n_layers=2 --config.model.d_model=64 --config.model.d_ff=128
        --config.model.vocab_size=128 --config.train.batch_size=8 --config.schedule.warmup_steps=1)
  one_b=("${tiny[@]}") seven_b=("${tiny[@]}")
  seq=32 steps=2 e2e_steps=4 attention=(--batch 1 --seq 64 --heads 4 --kv_heads 2 --head_dim 32 --repeats 2)
  cudnn=xla  # a CPU has no cuDNN: the row runs XLA's attention, so that the call itself is checked
else
  one_b=(--config=configs/1b.py --config.train.batch_size=8 --config.model.remat=none)
  seven_b=(--config=configs/llama2_7b.py --config.train.batch_size=4 --config.model.remat=full)
  seq=4096 steps=10 e2e_steps=30 attention=(--batch 4 --seq 4096 --heads 32 --kv_heads 8 --head_dim 128)
  cudnn=cudnn
fi
common=(--config.model.dtype=bfloat16 "--config.train.seq_len=$seq" --config.schedule.name=constant
        --config.schedule.start_lr=1e-4)

"$py" -c 'import jax; print("jax", jax.__version__, jax.devices())' | tee "$out/devices.txt"
"$py" benchmarks/attention.py "${attention[@]}" | tee "$out/attention.txt"
"$py" benchmarks/throughput.py "${one_b[@]}" "${common[@]}" --steps "$steps" --json "$out/1b.json" \
  --profile "$out/profile_1b" | tee "$out/1b.txt"
"$py" benchmarks/throughput.py "${seven_b[@]}" "${common[@]}" --steps "$steps" --json "$out/7b.json" \
  --profile "$out/profile_7b" | tee "$out/7b.txt"
"$py" benchmarks/throughput.py "${one_b[@]}" "${common[@]}" "--config.model.attention=$cudnn" --steps "$steps" \
  --json "$out/1b_cudnn.json" | tee "$out/1b_cudnn.txt"
"$py" benchmarks/end_to_end.py "${one_b[@]}" "${common[@]}" --steps "$e2e_steps" --repeats 1 \
  | tee "$out/end_to_end_1b.txt"

"$py" - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
print(f"{'preset':9} {'params':>8} {'batch':>9} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
      f"{'peak GiB':>9} {'compile s':>9}")
for name in ("1b", "1b_cudnn", "7b"):
    r = json.load(open(os.path.join(out, f"{name}.json")))
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    peak = "n/a" if r["peak_device_bytes"] is None else f"{r['peak_device_bytes'] / 2**30:.1f}"
    print(f"{name:9} {r['params'] / 1e9:7.2f}B {r['batch']:>4}x{r['seq_len']:<4} {r['step_sec']:8.3f} "
          f"{r['tokens_per_sec']:10,.0f} {r['tflops_per_device']:8.1f} {mfu:>6} {peak:>9} {r['compile_sec']:9.1f}")
EOF
