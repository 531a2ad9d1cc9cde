#!/usr/bin/env bash
# The GPU measurements of the open performance work, in stages of under ten minutes each:
#
#   bash scripts/gpu_benchmarks.sh STAGE[,STAGE...] [OUT_DIR]
#
#   kernels   1 GPU:  every GPU-marked test, trace-parser check on a real GPU trace, then the gdn stage
#   gdn       1 GPU:  GDN GPU tests; kernels in every intra / state-grads mode with the breakdown, FLA side by side
#   dense     1 GPU:  Qwen3 1.7B shapes vs HF, profile + remat / loss-chunk sweep
#   profiles  1 GPU:  xorl_jax alone, traced with fusions named: dense 1.7B, the MoE and hybrid cuts (no HF runs)
#   loss      1 GPU:  the LM-head cross-entropy alone: chunk widths vs full logits (jnp) and HF's torch path
#   moe       1 GPU:  Qwen3-30B-A3B shapes (4 layers) with a profile, then beside HF in one run
#   hybrid    1 GPU:  Qwen3.5-35B-A3B shapes (4 layers) with a profile, then HF alone
#   ttfs      1 GPU (H200: bf16 Qwen3-8B state is ~66 GB): time to first step of `xorl_jax.train` from a synthetic
#                     Qwen3-8B HF checkpoint, cold compile then a warm restart from the compilation cache
#   multi     2-8 GPUs: parallel equality tests, EP exchanges, then scale_moe
#   ep_check  2+ GPUs: where expert parallelism stops agreeing with one GPU (full-size GPU tests, then by size)
#   scale_moe 2-8 GPUs: Qwen3-30B-A3B shapes (4 layers) on one GPU, then EP over all GPUs, same rows per GPU
#   scale_dense 2-8 GPUs: Qwen3 1.7B and Qwen3-8B (bf16 state) on one GPU, then FSDP over all, same rows per GPU
#   fsdp_8b   2-8 GPUs: Qwen3-8B with fp32 master weights and state, FSDP over all GPUs
#   optim     1 GPU:  the AdamW update alone (fp32, bf16 with hash / threefry / nearest rounding) vs torch fused
#   ep_train  2+ GPUs: which part of an EP training step goes non-finite (Qwen3-30B-A3B cut to 2 layers, demo data,
#                     3 steps each: EP as configured, without CUDA graphs, without remat, FSDP only)
#   recheck   2+ GPUs: after the per-device attention fix: bf16 packed-document GPU tests, the padded exchange's
#             capacity factor, then scale_moe
#   ep8_bisect 2+ GPUs: the ep8 recipe's non-finite first step at 2 and 12 layers, with and without EP, cuDNN
#             or XLA attention
#   tune      1 GPU:  the dense 1.7B and MoE cuts over remat policies (xorl_jax alone; the loss alone is in
#             versus_hf, the hybrid cut in hybrid_tune)
#   versus_hf 1 GPU:  the loss alone beside torch, then the dense 1.7B and MoE cuts beside HF in the same runs, and
#             dense with remat dots_attention_saveable
#   defaults_hf 1 GPU: the config defaults beside HF (dense 1.7B, MoE cut); defaults_old: the previous defaults
#             (full remat, scanned) of the same shapes, then the hybrid cut under both
#   hybrid_hf 1 GPU:  the hybrid cut beside HF (HF's first step autotunes FLA: minutes)
#   hybrid_tune 1 GPU: the hybrid cut over remat policies (xorl_jax alone), then dense with XLA's conditionals in
#             command buffers (device-side branches instead of a host wait per branch)
#   unroll    1 GPU:  the dense 1.7B and MoE cuts with the layers scanned and unrolled (model.scan_layers),
#             under full and dots_attention_saveable remat (xorl_jax alone)
#   final_hf  1 GPU:  the fastest settings beside HF in the same runs: dense 1.7B and the MoE cut (both unrolled,
#             dots_attention_saveable)
#   final_hf_dense, final_hf_moe: one half of final_hf each
#   profiles_final 1 GPU: profiles of the fastest settings (dense unrolled with dots_attention_saveable, the MoE
#             cut unrolled), then the hybrid cut unrolled (xorl_jax alone)
#   optim_profile 1 GPU: the AdamW update alone with parameters and state donated as in the train step (fp32,
#             bf16 with stochastic rounding, the same with the direction from the stored moments, bf16 rounded to
#             nearest): HLO counts and a kernel profile of each
#   attn_sizes 1 GPU: cuDNN's GPU tests (finer host sizes included), then the dense 1.7B step with the packed
#             layout sized 8 / 64 (default) and 4, 8, 16, 32, 64 (the experiment; its dummy rows fit 4)
#   layout_memory 1 GPU: the memory XLA plans for the ep8 Qwen3-30B-A3B step (6 layers) with 8 and 64 document
#             slots in the packed attention layout
#   optim_stacked 1 GPU: the AdamW update alone, donated, on xorl_jax's stacked layer leaves (as the models hold
#             them; optim_profile used one leaf per layer) beside torch's fused AdamW on per-layer tensors
#   adam_direction 1 GPU: the dense 1.7B step and the MoE cut with bf16 parameters and state, the AdamW direction
#             from the stored moments (the experiment) and from the moments before rounding (the default)
#   hybrid_remat 1 GPU: the hybrid cut (unrolled) under full remat, dots_attention_saveable without and with the
#             Gated DeltaNet kernels' named outputs, and no remat (xorl_jax alone)
#   layout_remat 1 GPU: cuDNN's GPU tests, then the dense 1.7B step with the packed attention layout picked per
#             layer on the device vs fixed per batch on the host, without the named values dots_attention_saveable
#             keeps (SwiGLU activations, grouped GEMMs), with bf16 parameters and state; the MoE cut under full,
#             dots_attention_saveable and no remat
#   ep8       1-8 GPUs: the configs/*_ep8.yaml recipes on a real text corpus (expert ranks = GPUs; with fewer than
#             8 GPUs the depth is cut in proportion, LAYERS_FORCED=N overrides)
#
# Each command is stopped after LIMIT seconds (default 540) so one hang leaves the others' results.
# Logs and JSON go to OUT_DIR (default $OUT, else /tmp/gpu_benchmarks). Wheels the GPU image lacks (jax-triton,
# FLA for the GDN peer, tensorboardX) are installed from .whl/ into a private folder when present.
# Multi-GPU stages keep NCCL_NVLS_ENABLE=0 (NVLink SHARP multicast off: not every multi-GPU host supports it).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=${1:?usage: gpu_benchmarks.sh kernels|gdn|profiles|loss|dense|moe|hybrid|ttfs|tune|versus_hf|defaults_hf|defaults_old|hybrid_hf|hybrid_tune|unroll|final_hf|final_hf_dense|final_hf_moe|profiles_final|optim_profile|optim_stacked|layout_memory|attn_sizes|adam_direction|hybrid_remat|layout_remat|multi|ep_check|ep_train|ep8_bisect|recheck|scale_moe|scale_dense|fsdp_8b|optim|ep8[,...] [OUT_DIR]}
OUT_DIR=${2:-${OUT:-/tmp/gpu_benchmarks}}
WORK=${WORK:-/tmp/gpu_benchmarks_work}  # profiles, runs, cut configs: too many files for OUT_DIR
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
echo "gpu_benchmarks $STAGES: $NGPU GPU(s), $(python3 -c 'import jax; print(jax.devices()[0].device_kind, jax.__version__)'), $(date -u +%F)"

run() {  # run NAME CMD...: log to OUT_DIR/NAME.log, keep going on failure, print the tail
  local name=$1; shift
  local t0=$SECONDS
  timeout -k 10 "${LIMIT:-540}" "$@" >"$OUT_DIR/$name.log" 2>&1
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

stage() {
case "$1" in
  kernels)
    run gpu_tests python3 -m pytest -m gpu -q tests/ --timeout 300
    run profiling_tests python3 -m pytest -q tests/test_profiling.py
    stage gdn
    ;;
  gdn)
    run gdn_tests python3 -m pytest -m gpu -q tests/test_gdn_pallas.py --timeout 300
    # every intra / state-grads mode timed, each kernel on real values, FLA and the jnp reference in the same run
    run gdn_vs_fla python3 benchmarks/bench_gdn.py --iters 10 --shapes packed --skip-check --breakdown
    # Triton launch settings of each kernel (set the winners as kernels/gdn/pallas.py Launch's defaults, then re-run)
    run gdn_tune python3 benchmarks/bench_gdn.py --iters 10 --shapes packed --skip-check --no-fla --no-reference \
        --impls pallas+sg --tune
    ;;
  dense)
    run dense_hf python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 6 --backends jax,hf \
        --profile "$WORK/prof_dense" --json "$OUT_DIR/dense.json"
    run dense_sweep python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 6 --backends jax \
        --sweep "remat=full,dots_with_no_batch_dims_saveable,dots_saveable;ce_chunk=1024,4096" \
        --json "$OUT_DIR/dense_sweep.json"
    ;;
  profiles)
    # command buffers off: each profile row then names its fusion's JAX op and source line (steps run a few % slower)
    LIMIT=150 run dense_prof python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 4 \
        --backends jax --profile "$WORK/prof_dense" --no-command-buffers --json "$OUT_DIR/dense_prof.json"
    LIMIT=170 run moe_prof python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 --seq 4096 \
        --steps 4 --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax \
        --profile "$WORK/prof_moe" --no-command-buffers --json "$OUT_DIR/moe_prof.json"
    LIMIT=200 run hybrid_prof python3 benchmarks/bench_train.py --model qwen3_5_35b_a3b --layers 4 --batch 2 --seq 4096 \
        --steps 4 --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax \
        --profile "$WORK/prof_hybrid" --no-command-buffers --json "$OUT_DIR/hybrid_prof.json"
    ;;
  loss)
    run loss_dense python3 benchmarks/bench_loss.py --tokens 16384 --hidden 2048
    run loss_moe python3 benchmarks/bench_loss.py --tokens 8192 --hidden 2048 --chunks 8192,16384,32768
    ;;
  moe)
    # bf16 parameters and AdamW state on both sides: fp32 state at these depths does not fit 80 GB
    run moe_jax python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 --seq 4096 --steps 4 \
        --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax --profile "$WORK/prof_moe" \
        --json "$OUT_DIR/moe.json"
    run moe_hf python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 --seq 4096 --steps 4 \
        --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax,hf --json "$OUT_DIR/moe_hf.json"
    ;;
  hybrid)
    run hybrid_jax python3 benchmarks/bench_train.py --model qwen3_5_35b_a3b --layers 4 --batch 2 --seq 4096 --steps 4 \
        --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax --profile "$WORK/prof_hybrid" \
        --json "$OUT_DIR/hybrid.json"
    # HF's first step autotunes FLA's kernels (about 4 minutes on an H100)
    run hybrid_hf python3 benchmarks/bench_train.py --model qwen3_5_35b_a3b --layers 4 --batch 2 --seq 4096 --steps 3 \
        --warmup 1 --hf-time-limit 60 --backends hf --json "$OUT_DIR/hybrid_hf.json"
    ;;
  ttfs)
    rm -rf "$WORK/xla_cache"
    run ttfs_cold python3 benchmarks/bench_ttfs.py --workdir "$WORK/ttfs" --compilation-cache "$WORK/xla_cache"
    run ttfs_warm python3 benchmarks/bench_ttfs.py --workdir "$WORK/ttfs" --compilation-cache "$WORK/xla_cache"
    ;;
  multi)
    run parallel_tests python3 -m pytest -q tests/test_parallel_gpu.py tests/test_expert_parallel.py -m gpu --timeout 300
    LIMIT=120 run bench_ep python3 benchmarks/bench_ep.py
    LIMIT=120 run bench_ep_skewed python3 benchmarks/bench_ep.py --routing skewed
    stage scale_moe
    ;;
  ep_check)
    # expert parallelism and the one-GPU MoE layer at full size against one GPU per device's tokens (errors per
    # leaf), the Triton grouped GEMM at the MoE layer's row counts, then the ragged exchange on XLA's experimental
    # device-initiated kernel (the default one was 41x slower than padded; an XLA without the flags refuses to start)
    LIMIT=300 run ep_check_tests python3 -m pytest -q -s -m gpu --timeout 280 \
        tests/test_expert_parallel.py::test_ep_matches_one_device_at_moe_layer_size_on_gpus \
        tests/test_gmm.py::test_triton_matches_ragged_dot_at_moe_layer_sizes
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_experimental_ragged_all_to_all_use_device_kernel=true \
--xla_gpu_experimental_enable_nccl_symmetric_buffers=true" LIMIT=90 run bench_ep_ragged_device_kernel \
        python3 benchmarks/bench_ep.py --devices 2
    ;;
  scale_moe)
    # per-GPU throughput on all GPUs against one GPU, the same model and rows per GPU (bf16 state on both sides)
    LIMIT=150 run moe_1gpu python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 --seq 4096 \
        --steps 4 --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax --json "$OUT_DIR/moe_1gpu.json"
    LIMIT=200 run moe_ep python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 --seq 4096 \
        --steps 4 --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --fsdp -1 --ep -1 --backends jax \
        --profile "$WORK/prof_ep" --json "$OUT_DIR/moe_ep.json"
    ;;
  scale_dense)
    # FSDP over all GPUs against one GPU, same rows per GPU: Qwen3 1.7B (fp32 master + state), Qwen3-8B (bf16 state:
    # fp32 state does not fit one GPU), then Qwen3-8B as users would run it on these GPUs (fp32, FSDP)
    LIMIT=120 run dense_1gpu python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 4 \
        --warmup 1 --backends jax --json "$OUT_DIR/dense_1gpu.json"
    LIMIT=140 run dense_fsdp python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 4 \
        --warmup 1 --fsdp -1 --backends jax --json "$OUT_DIR/dense_fsdp.json"
    for n in 1 -1; do
      LIMIT=160 run "fsdp_8b_bf16_$n" python3 benchmarks/bench_train.py --model qwen3_8b --batch 2 --seq 4096 --steps 4 \
          --warmup 1 --fsdp $n --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax \
          --json "$OUT_DIR/fsdp_8b_bf16_$n.json"
    done
    ;;
  fsdp_8b)
    LIMIT=180 run fsdp_8b python3 benchmarks/bench_train.py --model qwen3_8b --batch 2 --seq 4096 --steps 4 --warmup 1 \
        --fsdp -1 --backends jax --json "$OUT_DIR/fsdp_8b.json"
    ;;
  optim)
    run optim python3 benchmarks/bench_optim.py
    ;;
  ep_train)
    cut_config configs/models/qwen3_30b_a3b 2 "$WORK/models/ep_train"
    cat >"$WORK/ep_train.yaml" <<EOF
model:
  config_path: $WORK/models/ep_train
  tokenizer_path: xorl_jax/assets/demo
  dtype: bfloat16
  param_dtype: float32
data:
  datasets:
    - path: xorl_jax/assets/demo/train.jsonl
      type: messages
  sample_packing_method: multipack
  sample_packing_sequence_len: 8192
train:
  init_from: scratch
  data_parallel_shard_size: -1
  expert_parallel_size: $NGPU
  micro_batch_size: 1
  max_steps: 3
  log_steps: 1
  lr: 3.0e-4
  enable_mixed_precision: true
  enable_gradient_checkpointing: true
  remat_policy: full
EOF
    for variant in ep ep_no_command_buffers ep_no_remat fsdp_only; do
      extra=(); flags="${XLA_FLAGS:-}"
      case $variant in
        ep_no_command_buffers) flags="$flags --xla_gpu_enable_command_buffer=" ;;
        ep_no_remat) extra=(--train.enable_gradient_checkpointing=false) ;;
        fsdp_only) extra=(--train.expert_parallel_size=1) ;;
      esac
      XLA_FLAGS="$flags" LIMIT=150 TAIL=6 run "ep_train_$variant" python3 -m xorl_jax.train --config "$WORK/ep_train.yaml" \
          --train.output_dir="$WORK/ep_train_$variant" "${extra[@]}"
    done
    ;;
  recheck)
    # after the per-device cuDNN attention fix: the bf16 packed-document model tests across the GPUs, the padded
    # exchange's capacity factor (2 is the worst-case buffer at EP 2), then the EP scaling row measured with the bug
    LIMIT=150 run bf16_packed_tests python3 -m pytest -q -m gpu --timeout 140 tests/test_parallel_gpu.py \
        -k "bf16_packed or cudnn_packed"
    LIMIT=120 run bench_ep_capacity python3 benchmarks/bench_ep.py --exchanges padded --capacity-factors 2,1.5,1.25
    stage scale_moe
    ;;
  tune)
    LIMIT=170 run dense_remat python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 5 \
        --warmup 1 --backends jax --sweep "remat=full,dots_attention_saveable,none" --json "$OUT_DIR/dense_remat.json"
    LIMIT=150 run moe_remat python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 --seq 4096 \
        --steps 4 --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax \
        --sweep "remat=full,dots_attention_saveable" --json "$OUT_DIR/moe_remat.json"
    ;;
  versus_hf)
    LIMIT=80 run loss_dense python3 benchmarks/bench_loss.py --tokens 16384 --hidden 2048 --chunks 1024,2048,4096 \
        --vocab-chunk 8192 --no-reference
    LIMIT=230 run dense_hf python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 5 \
        --warmup 1 --backends jax,hf --json "$OUT_DIR/dense_hf.json"
    LIMIT=60 run dense_dots_attn python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 5 \
        --warmup 1 --backends jax --remat dots_attention_saveable --json "$OUT_DIR/dense_dots_attn.json"
    LIMIT=200 run moe_hf python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 --seq 4096 \
        --steps 4 --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax,hf \
        --json "$OUT_DIR/moe_hf.json"
    ;;
  defaults_hf)  # issue 27: the config defaults (remat_policy/scan_layers auto, fp32 state) beside HF in the same run
    LIMIT=260 run defaults_dense_hf python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 5 \
        --warmup 2 --backends jax,hf --json "$OUT_DIR/defaults_dense_hf.json"
    LIMIT=240 run defaults_moe_hf python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 \
        --seq 4096 --steps 5 --warmup 2 --backends jax,hf --json "$OUT_DIR/defaults_moe_hf.json"
    ;;
  defaults_old)  # issue 27: the previous defaults (full remat, scanned) of the same shapes, then the hybrid cut
    LIMIT=120 run olddefaults_dense python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 5 \
        --warmup 2 --backends jax --remat full --scan-layers true --json "$OUT_DIR/olddefaults_dense.json"
    LIMIT=120 run olddefaults_moe python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 \
        --seq 4096 --steps 5 --warmup 2 --backends jax --remat full --scan-layers true \
        --json "$OUT_DIR/olddefaults_moe.json"
    LIMIT=150 run defaults_hybrid python3 benchmarks/bench_train.py --model qwen3_5_35b_a3b --layers 4 --batch 2 \
        --seq 4096 --steps 5 --warmup 2 --backends jax --json "$OUT_DIR/defaults_hybrid.json"
    LIMIT=150 run olddefaults_hybrid python3 benchmarks/bench_train.py --model qwen3_5_35b_a3b --layers 4 --batch 2 \
        --seq 4096 --steps 5 --warmup 2 --backends jax --remat full --scan-layers true \
        --json "$OUT_DIR/olddefaults_hybrid.json"
    ;;
  hybrid_hf)
    LIMIT=420 run hybrid_hf python3 benchmarks/bench_train.py --model qwen3_5_35b_a3b --layers 4 --batch 2 --seq 4096 \
        --steps 3 --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax,hf --hf-time-limit 60 \
        --json "$OUT_DIR/hybrid_hf.json"
    ;;
  hybrid_tune)
    LIMIT=230 run hybrid_remat python3 benchmarks/bench_train.py --model qwen3_5_35b_a3b --layers 4 --batch 2 --seq 4096 \
        --steps 4 --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax \
        --sweep "remat=full,dots_attention_saveable" --json "$OUT_DIR/hybrid_remat.json"
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,\
DYNAMIC_SLICE_FUSION,CONDITIONAL" LIMIT=70 run dense_conditional_graphs python3 benchmarks/bench_train.py \
        --model qwen3_1.7b --batch 4 --seq 4096 --steps 5 --warmup 1 --backends jax --remat dots_attention_saveable \
        --json "$OUT_DIR/dense_conditional_graphs.json"
    ;;
  unroll)
    LIMIT=330 run dense_unroll python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 5 \
        --warmup 1 --backends jax --sweep "scan_layers=true,false;remat=full,dots_attention_saveable" \
        --json "$OUT_DIR/dense_unroll.json"
    LIMIT=200 run moe_unroll python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 --seq 4096 \
        --steps 4 --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax \
        --sweep "scan_layers=true,false" --json "$OUT_DIR/moe_unroll.json"
    ;;
  final_hf)
    stage final_hf_dense
    stage final_hf_moe
    ;;
  final_hf_dense)
    LIMIT=260 run dense_final_hf python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 5 \
        --warmup 1 --backends jax,hf --scan-layers false --remat dots_attention_saveable \
        --json "$OUT_DIR/dense_final_hf.json"
    ;;
  final_hf_moe)
    LIMIT=220 run moe_final_hf python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 --seq 4096 \
        --steps 4 --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax,hf --scan-layers false \
        --remat dots_attention_saveable --json "$OUT_DIR/moe_final_hf.json"
    ;;
  profiles_final)
    LIMIT=150 run dense_prof_final python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 4 \
        --warmup 1 --backends jax --scan-layers false --remat dots_attention_saveable --profile "$WORK/prof_dense" \
        --no-command-buffers --profile-top 22 --json "$OUT_DIR/dense_prof_final.json"
    LIMIT=150 run moe_prof_final python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 --seq 4096 \
        --steps 4 --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax --scan-layers false \
        --profile "$WORK/prof_moe" --no-command-buffers --profile-top 22 --json "$OUT_DIR/moe_prof_final.json"
    LIMIT=150 run hybrid_unroll python3 benchmarks/bench_train.py --model qwen3_5_35b_a3b --layers 4 --batch 2 \
        --seq 4096 --steps 4 --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax \
        --remat dots_attention_saveable --sweep "scan_layers=true,false" --json "$OUT_DIR/hybrid_unroll.json"
    ;;
  optim_profile)
    TAIL=100 LIMIT=300 run optim_profile python3 benchmarks/bench_optim.py --no-torch --donate --cases 0,1,5,4 --iters 5 \
        --profile "$WORK/optim_profile"
    ;;
  hybrid_remat)
    hybrid=(python3 benchmarks/bench_train.py --model qwen3_5_35b_a3b --layers 4 --batch 2 --seq 4096 --steps 4
            --warmup 1 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax --scan-layers false)
    LIMIT=100 run hybrid_full "${hybrid[@]}" --remat full --json "$OUT_DIR/hybrid_full.json"
    LIMIT=100 run hybrid_dots_no_gdn "${hybrid[@]}" --remat dots_attention_saveable \
        --remat-keep-names grouped_matmul,mlp_activation --json "$OUT_DIR/hybrid_dots_no_gdn.json"
    LIMIT=100 run hybrid_dots "${hybrid[@]}" --remat dots_attention_saveable \
        --remat-keep-names grouped_matmul,mlp_activation,gdn_kernel --json "$OUT_DIR/hybrid_dots.json"
    LIMIT=100 run hybrid_none "${hybrid[@]}" --remat none --json "$OUT_DIR/hybrid_none.json"
    ;;
  attn_sizes)
    run attention_gpu_tests python3 -m pytest -m gpu -q tests/test_attention.py --timeout 300
    dense=(python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 6 --warmup 2
           --backends jax --remat dots_attention_saveable --scan-layers false)
    LIMIT=90 run dense_sizes_default "${dense[@]}" --json "$OUT_DIR/dense_sizes_default.json"
    LIMIT=90 run dense_sizes_fine "${dense[@]}" --attn-sizes 4,8,16,32,64 --json "$OUT_DIR/dense_sizes_fine.json"
    ;;
  layout_memory)
    # the ep8 recipe's Qwen3-30B-A3B step at 6 layers on one GPU, compiled for the usual packed layout (8 document
    # slots) and the large one (64, the only slot count the host may then pick): its memory as XLA plans it (the
    # run's peak rose 68 -> 82 GiB at the first batch that needed 64)
    cut_config configs/models/qwen3_30b_a3b 6 "$WORK/models/layout_memory"
    for slots in 8 64; do
      LIMIT=110 run "layout_memory_$slots" python3 -c "
from xorl_jax.config import parse_cli
from xorl_jax.plan import dry_run
from xorl_jax.train_setup import Experiments
cfg = parse_cli(['--config', 'configs/qwen3_30b_a3b_ep8.yaml', '--model.config_path=$WORK/models/layout_memory',
                 '--train.expert_parallel_size=1'])
plan = dry_run(cfg, experiments=Experiments(attn_slot_sizes=($slots,)))
print('slots $slots'); print(chr(10).join(plan.lines()))"
    done
    ;;
  optim_stacked)
    LIMIT=200 run optim_stacked python3 benchmarks/bench_optim.py --donate --cases 0,1,5,4 --iters 10
    ;;
  adam_direction)
    for direction in stored fresh; do
      LIMIT=90 run "dense_bf16_$direction" python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 \
          --steps 6 --warmup 2 --backends jax --remat dots_attention_saveable --scan-layers false \
          --param-dtype bfloat16 --optimizer-dtype bfloat16 --adam-direction "$direction" \
          --json "$OUT_DIR/dense_bf16_$direction.json"
      LIMIT=80 run "moe_$direction" python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 \
          --seq 4096 --steps 8 --warmup 2 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax \
          --scan-layers false --remat dots_attention_saveable --adam-direction "$direction" \
          --json "$OUT_DIR/moe_$direction.json"
    done
    ;;
  layout_remat)
    run attention_gpu_tests python3 -m pytest -m gpu -q tests/test_attention.py --timeout 300
    dense=(python3 benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --steps 5 --warmup 1
           --backends jax --remat dots_attention_saveable --scan-layers false)
    LIMIT=90 run dense_layout_device "${dense[@]}" --attn-layout device --json "$OUT_DIR/dense_layout_device.json"
    LIMIT=90 run dense_layout_host "${dense[@]}" --json "$OUT_DIR/dense_layout_host.json"
    LIMIT=90 run dense_keep_no_names "${dense[@]}" --remat-keep-names none --json "$OUT_DIR/dense_keep_no_names.json"
    LIMIT=90 run dense_bf16 "${dense[@]}" --param-dtype bfloat16 --optimizer-dtype bfloat16 \
        --json "$OUT_DIR/dense_bf16.json"
    for remat in full dots_attention_saveable none; do
      LIMIT=80 run "moe_$remat" python3 benchmarks/bench_train.py --model qwen3_30b_a3b --layers 4 --batch 2 \
          --seq 4096 --steps 6 --warmup 2 --param-dtype bfloat16 --optimizer-dtype bfloat16 --backends jax \
          --scan-layers false --remat "$remat" --json "$OUT_DIR/moe_$remat.json"
    done
    ;;
  ep8_bisect)
    # which setting makes the ep8 recipe's first Qwen3-30B-A3B step non-finite (the demo-data ep_train runs are
    # finite): depth, expert parallelism, attention backend; 2 steps each, only the verdict lines kept
    [ -d data/docstrings ] || run corpus python3 scripts/make_text_corpus.py --out data/docstrings
    for variant in l2 l2_ep1 l2_xla_attn l12_xla_attn l12_ep1; do
      layers=${variant%%_*}; layers=${layers#l}
      cut_config configs/models/qwen3_30b_a3b "$layers" "$WORK/models/bisect_$layers"
      args=(--model.config_path="$WORK/models/bisect_$layers" --train.max_steps=2 --train.log_steps=1
            --train.output_dir="$WORK/bisect_$variant" --data.dataset_prepared_path="$WORK/prepared")
      case $variant in
        *_ep1) args+=(--train.expert_parallel_size=1) ;;
        *) args+=(--train.expert_parallel_size="$NGPU") ;;
      esac
      case $variant in *_xla_attn) args+=(--model.attn_implementation=xla) ;; esac
      LIMIT=${LIMIT:-110} run "bisect_$variant" python3 -m xorl_jax.train --config configs/qwen3_30b_a3b_ep8.yaml "${args[@]}"
      grep -E "non-finite|^step|stopped|Error|error:" "$OUT_DIR/bisect_$variant.log" | cut -c1-220 | head -4
    done
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
    echo "unknown stage $1" >&2; exit 2 ;;
esac
}

for s in ${STAGES//,/ }; do stage "$s"; done
