#!/usr/bin/env bash
# The GPU measurements docs/PERFORMANCE.md quotes as current, one suite per call (each under ten minutes):
#
#   bash benchmarks/run.sh SUITE[,SUITE...] [OUT_DIR]
#
#   tests     1+ GPUs: every GPU-marked test, and the profile parser on a real GPU trace
#   kernels   1 GPU:  cuDNN packed attention, Gated DeltaNet (FLA beside it when installed), grouped GEMM, the loss
#   step      1 GPU:  a training step with the config defaults beside HF transformers + torch in the same run (Qwen3
#                     1.7B shapes, the Qwen3-30B-A3B cut), then the Qwen3.5-35B-A3B cut (xorl_jax alone)
#   profiles  1 GPU:  the same three steps traced, each kernel named by its JAX op (xorl_jax alone)
#   optim     1 GPU:  the AdamW update alone, in place, against torch's fused AdamW
#   ttfs      1 GPU (H200: bf16 Qwen3-8B state is ~66 GB): time to first step, cold then from the compilation cache
#   multi     2-8 GPUs: parallel equality tests, the MoE layer under EP, then per-GPU throughput on every GPU
#                     against one GPU (FSDP: Qwen3 1.7B and 8B; EP: the Qwen3-30B-A3B cut)
#   ep8       1-8 GPUs: the configs/*_ep8.yaml recipes on a real text corpus (with fewer than 8 GPUs the depth is cut
#                     in proportion; LAYERS_FORCED=N overrides, STEPS=N sets the steps, default 30)
#
# Finished investigations are recorded in docs/PERFORMANCE.md (result and date), not kept runnable here.
# Each command is stopped after LIMIT seconds (default 540) so one hang leaves the others' results. Logs and JSON go
# to OUT_DIR (default $OUT, else /tmp/xorl_jax_benchmarks). Wheels the GPU image lacks (jax-triton, FLA,
# tensorboardX) are installed from .whl/ into a private folder when present. NVLink multicast stays off
# (NCCL_NVLS_ENABLE=0): not every multi-GPU host supports it.
set -uo pipefail
cd "$(dirname "$0")/.."
SUITES=${1:?usage: benchmarks/run.sh tests|kernels|step|profiles|optim|ttfs|multi|ep8[,...] [OUT_DIR]}
OUT_DIR=${2:-${OUT:-/tmp/xorl_jax_benchmarks}}
WORK=${WORK:-/tmp/xorl_jax_benchmarks_work}  # traces, runs, cut configs: too many files for OUT_DIR
mkdir -p "$OUT_DIR" "$WORK"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if ls .whl/*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:.:${PYTHONPATH:-}"
else
  export PYTHONPATH=".:${PYTHONPATH:-}"
fi
NGPU=$(python3 -c "import jax; print(sum(d.platform == 'gpu' for d in jax.devices()))")
echo "benchmarks $SUITES: $NGPU GPU(s), $(python3 -c 'import jax; print(jax.devices()[0].device_kind, jax.__version__)'), $(date -u +%F)"

run() {  # run NAME CMD...: log to OUT_DIR/NAME.log, keep going on failure, print the tail
  local name=$1; shift
  local t0=$SECONDS
  timeout -k 10 "${LIMIT:-540}" "$@" >"$OUT_DIR/$name.log" 2>&1
  echo "== $name: rc=$?, $((SECONDS - t0)) s"
  tail -n "${TAIL:-25}" "$OUT_DIR/$name.log"
}

cut_config() {  # cut_config SRC_DIR LAYERS DST_DIR: the same model with fewer layers (keeps the layer pattern)
  python3 - "$@" <<'EOF'
import json, os, sys
src, n, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = json.load(open(os.path.join(src, "config.json")))
cfg["num_hidden_layers"] = n
if "layer_types" in cfg:
    cfg["layer_types"] = cfg["layer_types"][:n]
os.makedirs(dst, exist_ok=True)
json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
EOF
}

# The three step shapes: Qwen3 1.7B at 4 x 4096 tokens, the MoE and hybrid models cut to 4 layers at 2 x 4096.
DENSE=(python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 5 --warmup 2)
MOE=(python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 --seq 4096 --steps 5 --warmup 2)
HYBRID=(python3 benchmarks/bench_train.py --model qwen3_5_35b_a3b --layers 4 --batch 2 --seq 4096 --steps 5 --warmup 2)

suite() {
case "$1" in
  tests)
    run gpu_tests python3 -m pytest -m gpu -q tests/ --timeout 300
    run profiling_tests python3 -m pytest -q tests/test_profiling.py
    ;;
  kernels)
    run attention python3 benchmarks/bench_attention.py --batch 4 --heads 16 --kv-heads 8 --docs 4 \
        --max-segments 4,8,16,32,64 --no-xla
    # FLA autotunes at its first call of each shape (about 2 minutes on an H100): the packed shape only here; both
    # shapes (about 5 minutes): bench_gdn.py --shapes packed,batch --impls fla,split --no-reference --skip-check
    run gdn python3 benchmarks/bench_gdn.py --iters 10 --shapes packed --no-reference \
        --impls fla,split,split-before --breakdown --check split
    run gmm python3 benchmarks/bench_gmm.py --rows 32768
    run loss python3 benchmarks/bench_loss.py --tokens 16384 --hidden 2048
    ;;
  step)
    LIMIT=260 run step_dense_hf "${DENSE[@]}" --backends jax,hf --json "$OUT_DIR/step_dense_hf.json"
    LIMIT=240 run step_moe_hf "${MOE[@]}" --backends jax,hf --json "$OUT_DIR/step_moe_hf.json"
    LIMIT=150 run step_hybrid "${HYBRID[@]}" --backends jax --json "$OUT_DIR/step_hybrid.json"
    ;;
  profiles)
    # command buffers off: each profile row then names its fusion's JAX op and source line (steps a few % slower)
    for shape in DENSE MOE HYBRID; do
      declare -n cmd=$shape
      name=$(echo "$shape" | tr '[:upper:]' '[:lower:]')
      LIMIT=200 run "profile_$name" "${cmd[@]}" --backends jax --profile "$WORK/prof_$name" --no-command-buffers \
          --profile-top 22 --json "$OUT_DIR/profile_$name.json"
    done
    ;;
  optim)
    LIMIT=200 run optim python3 benchmarks/bench_optim.py --donate --iters 10
    ;;
  ttfs)
    rm -rf "$WORK/xla_cache"
    run ttfs_cold python3 benchmarks/bench_ttfs.py --workdir "$WORK/ttfs" --compilation-cache "$WORK/xla_cache"
    run ttfs_warm python3 benchmarks/bench_ttfs.py --workdir "$WORK/ttfs" --compilation-cache "$WORK/xla_cache"
    ;;
  multi)
    run parallel_tests python3 -m pytest -q tests/test_parallel_gpu.py tests/test_expert_parallel.py -m gpu --timeout 300
    LIMIT=120 run ep_layer python3 benchmarks/bench_ep.py
    LIMIT=120 run ep_layer_skewed python3 benchmarks/bench_ep.py --routing skewed
    # per-GPU throughput on every GPU against one GPU, the same rows per GPU (--fsdp -1: every GPU)
    LIMIT=120 run dense_1gpu "${DENSE[@]}" --backends jax --json "$OUT_DIR/dense_1gpu.json"
    LIMIT=140 run dense_fsdp "${DENSE[@]}" --fsdp -1 --backends jax --json "$OUT_DIR/dense_fsdp.json"
    for n in 1 -1; do  # Qwen3-8B with bf16 state: fp32 state does not fit one GPU
      LIMIT=160 run "fsdp_8b_bf16_$n" python3 benchmarks/bench_train.py --model qwen3_8b --batch 2 --seq 4096 \
          --steps 4 --warmup 1 --fsdp $n --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax \
          --json "$OUT_DIR/fsdp_8b_bf16_$n.json"
    done
    LIMIT=150 run moe_1gpu "${MOE[@]}" --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax \
        --json "$OUT_DIR/moe_1gpu.json"
    LIMIT=200 run moe_ep "${MOE[@]}" --param-dtype bfloat16 --optimizer-dtype bfloat16 --fsdp -1 --ep -1 \
        --backends jax --json "$OUT_DIR/moe_ep.json"
    ;;
  ep8)
    [ -d data/docstrings ] || run corpus python3 scripts/make_text_corpus.py --out data/docstrings
    # Fewer than 8 GPUs: depth cut in proportion (the same memory per GPU as the 8-GPU run), to a whole number of
    # layer patterns (Qwen3.5: 3 DeltaNet + 1 attention).
    for name in qwen3_30b_a3b qwen3_5_35b_a3b; do
      case $name in qwen3_30b_a3b) full=48 period=1 ;; *) full=40 period=4 ;; esac
      LAYERS=${LAYERS_FORCED:-$(( full * NGPU / 8 / period * period ))}
      [ "$LAYERS" -lt "$period" ] && LAYERS=$period
      [ "$LAYERS" -ge "$full" ] && LAYERS=0
      args=(--train.expert_parallel_size="$NGPU" --train.max_steps="${STEPS:-30}" --train.output_dir="$WORK/run_$name"
            --data.dataset_prepared_path="$WORK/prepared")
      if [ "$LAYERS" != 0 ]; then
        cut_config "configs/models/$name" "$LAYERS" "$WORK/models/$name"
        args+=(--model.config_path="$WORK/models/$name")
      fi
      run "ep8_$name" python3 -m xorl_jax.train --config "configs/${name}_ep8.yaml" "${args[@]}"
      cp "$WORK/run_$name/metrics.jsonl" "$OUT_DIR/metrics_$name.jsonl" 2>/dev/null
      rm -rf "$WORK/run_$name/checkpoints"
    done
    ;;
  *)
    echo "unknown suite $1 (tests, kernels, step, profiles, optim, ttfs, multi, ep8)" >&2; exit 2 ;;
esac
}

for s in ${SUITES//,/ }; do suite "$s"; done
