#!/usr/bin/env bash
# The GPU measurements of the open performance work, in stages of under ten minutes each:
#
#   bash scripts/gpu_benchmarks.sh STAGE [OUT_DIR]
#
#   kernels   1 GPU:  every GPU-marked test, GDN kernels (both intra modes, breakdown, FLA side by side),
#                     trace-parser check on a real GPU trace
#   dense     1 GPU:  Qwen3 1.7B shapes vs HF, profile + remat / loss-chunk sweep
#   moe       1 GPU:  Qwen3-30B-A3B and Qwen3.5-35B-A3B shapes (depth cut) vs HF, with profiles; EP exchange bench
#   multi     2-8 GPUs: parallel equality tests, EP exchanges, FSDP Qwen3-8B (time to first step), EP MoE
#   ep8       1-8 GPUs: the configs/*_ep8.yaml recipes on a real text corpus (expert ranks = GPUs; with fewer than
#             8 GPUs the depth is cut in proportion, LAYERS_FORCED=N overrides)
#
# Logs and JSON go to OUT_DIR (default $OUT, else /tmp/gpu_benchmarks). Wheels the GPU image lacks (jax-triton,
# FLA for the GDN peer, tensorboardX) are installed from .whl/ into a private folder when present.
# Multi-GPU stages keep NCCL_NVLS_ENABLE=0 (NVLink SHARP multicast off: not every multi-GPU host supports it).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: gpu_benchmarks.sh kernels|dense|moe|multi|ep8 [OUT_DIR]}
OUT_DIR=${2:-${OUT:-/tmp/gpu_benchmarks}}
mkdir -p "$OUT_DIR"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if ls .whl/*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:.:${PYTHONPATH:-}"
else
  export PYTHONPATH=".:${PYTHONPATH:-}"
fi
NGPU=$(python3 -c "import jax; print(sum(d.platform == 'gpu' for d in jax.devices()))")
echo "gpu_benchmarks $STAGE: $NGPU GPU(s), $(python3 -c 'import jax; print(jax.devices()[0].device_kind, jax.__version__)'), $(date -u +%F)"

run() {  # run NAME CMD...: log to OUT_DIR/NAME.log, keep going on failure, print the tail
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - t0)) s"
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

case "$STAGE" in
  kernels)
    run gpu_tests python3 -m pytest -m gpu -q tests/ -x --timeout 300
    run profiling_tests python3 -m pytest -q tests/test_profiling.py
    # both intra modes checked against fp32, each kernel timed on real values, what XLA emits around them
    run gdn_breakdown python3 scripts/bench_gdn.py --iters 10 --shapes packed --no-fla --no-reference --breakdown \
        --hlo-summary
    run gdn_vs_fla python3 scripts/bench_gdn.py --iters 10 --skip-check
    ;;
  dense)
    run dense_hf python3 scripts/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 6 --backends jax,hf \
        --profile "$OUT_DIR/prof_dense" --json "$OUT_DIR/dense.json"
    run dense_sweep python3 scripts/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 6 --backends jax \
        --sweep "remat=full,dots_with_no_batch_dims_saveable,dots_saveable;ce_chunk=8192,32768" \
        --json "$OUT_DIR/dense_sweep.json"
    ;;
  moe)
    run moe_hf python3 scripts/bench_train.py --model qwen3_30b_a3b --layers 6 --batch 2 --seq 4096 --steps 6 \
        --backends jax,hf --profile "$OUT_DIR/prof_moe" --json "$OUT_DIR/moe.json"
    run hybrid_hf python3 scripts/bench_train.py --model qwen3_5_35b_a3b --layers 4 --batch 2 --seq 4096 --steps 6 \
        --backends jax,hf --profile "$OUT_DIR/prof_hybrid" --json "$OUT_DIR/hybrid.json"
    ;;
  multi)
    run parallel_tests python3 -m pytest -q tests/test_parallel_gpu.py tests/test_expert_parallel.py -m gpu --timeout 300
    run bench_ep python3 scripts/bench_ep.py
    run bench_ep_skewed python3 scripts/bench_ep.py --routing skewed
    run fsdp_8b python3 scripts/bench_train.py --model qwen3_8b --batch 1 --seq 4096 --steps 5 --fsdp -1 \
        --backends jax --json "$OUT_DIR/fsdp_8b.json"
    run ep_moe python3 scripts/bench_train.py --model qwen3_30b_a3b --layers 8 --batch 1 --seq 8192 --steps 5 \
        --fsdp -1 --ep -1 --backends jax --profile "$OUT_DIR/prof_ep" --json "$OUT_DIR/ep_moe.json"
    ;;
  ep8)
    [ -d data/docstrings ] || run corpus python3 scripts/make_text_corpus.py --out data/docstrings
    # Fewer than 8 GPUs: depth cut in proportion (same memory per GPU as the 8-GPU run), to a whole number of
    # layer patterns (Qwen3.5: 3 DeltaNet + 1 attention). LAYERS=N forces a depth.
    for name in qwen3_30b_a3b qwen3_5_35b_a3b; do
      case $name in qwen3_30b_a3b) full=48 period=1 ;; *) full=40 period=4 ;; esac
      LAYERS=${LAYERS_FORCED:-$(( full * NGPU / 8 / period * period ))}
      [ "$LAYERS" -lt "$period" ] && LAYERS=$period
      [ "$LAYERS" -ge "$full" ] && LAYERS=0
      args=(--train.expert_parallel_size="$NGPU" --train.max_steps="${STEPS:-30}" --train.output_dir="$OUT_DIR/run_$name"
            --data.dataset_prepared_path="$OUT_DIR/prepared")
      if [ "$LAYERS" != 0 ]; then
        cut_config "configs/models/$name" "$LAYERS" "$OUT_DIR/models/$name"
        args+=(--model.config_path="$OUT_DIR/models/$name")
      fi
      run "ep8_$name" python3 -m xorl_jax.train --config "configs/${name}_ep8.yaml" "${args[@]}"
      cp "$OUT_DIR/run_$name/metrics.jsonl" "$OUT_DIR/metrics_$name.jsonl" 2>/dev/null
      rm -rf "$OUT_DIR/run_$name/checkpoints"
    done
    ;;
  *)
    echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
