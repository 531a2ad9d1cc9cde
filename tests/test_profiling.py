"""Profile summaries (benchmarks/profiling.py): a real XLA:CPU trace, a hand-made GPU-style trace, and
benchmarks/bench_train.py's jax backend on 4 fake devices with FSDP x EP and --profile."""

import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the profiling helpers live beside the benchmarks

import profiling  # noqa: E402


def test_cpu_trace_dot_is_gemm_and_totals_add_up(tmp_path):
    @jax.jit
    def f(a, b):
        return jnp.tanh(a @ b).sum(axis=0) + 1.0

    a = jnp.ones((256, 256))
    f(a, a).block_until_ready()
    hlo = f.lower(a, a).compile().as_text()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(3):
            r = f(a, a)
        r.block_until_ready()
    trace = profiling.find_trace(str(tmp_path))
    assert trace.endswith(".json.gz")
    events = profiling.device_events(profiling.load_trace(trace))
    assert events and all(e.dur >= 0 for e in events)
    s = profiling.summarize_trace(trace, hlo_text=hlo, steps=3, step_time_s=1.0)
    cats = s["categories"]
    assert cats["gemm"]["ms"] > 0, s  # the fusion holding the dot counts as GEMM, whatever XLA:CPU named it
    assert sum(c["ms"] for c in cats.values()) == pytest.approx(s["busy_ms_per_step"], rel=1e-9)
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0, abs=1e-9)
    assert s["top_ops"] and sum(o["share"] for o in s["top_ops"]) <= 1.0 + 1e-9
    assert any(o["category"] == "gemm" for o in s["top_ops"])
    assert all(o["calls_per_step"] >= 1 for o in s["top_ops"])
    text = profiling.format_summary(s)
    assert "GEMM" in text and "collectives" in text
    h = profiling.hlo_summary(hlo)
    assert h["dots"] >= 1 and sum(h["fusions"].values()) >= 1
    assert "optimized HLO" in profiling.format_hlo_summary(h)


HLO = """HloModule jit_train_step, is_scheduled=true

%fused_dot (p0: bf16[64,64], p1: bf16[64,64]) -> bf16[64,64] {
  %p0 = bf16[64,64]{1,0} parameter(0)
  %p1 = bf16[64,64]{1,0} parameter(1)
  ROOT %dot.3 = bf16[64,64]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (p0.1: f32[64]) -> f32[64] {
  %p0.1 = f32[64]{0} parameter(0)
  ROOT %add.2 = f32[64]{0} add(%p0.1, %p0.1)
}

%fused_reduce (p0.2: f32[64,64]) -> f32[64] {
  %p0.2 = f32[64,64]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %reduce.1 = f32[64]{0} reduce(%p0.2, %c), dimensions={1}, to_apply=%fused_add
}

%fused_transpose (p0.3: f32[64,64]) -> f32[64,64] {
  %p0.3 = f32[64,64]{1,0} parameter(0)
  ROOT %transpose.1 = f32[64,64]{0,1} transpose(%p0.3), dimensions={1,0}
}

ENTRY %main (a: bf16[64,64], v: f32[64], m: f32[64,64]) -> bf16[64,64] {
  %a = bf16[64,64]{1,0} parameter(0)
  %v = f32[64]{0} parameter(1)
  %m = f32[64,64]{1,0} parameter(2)
  %gemm_fusion_dot.1 = bf16[64,64]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_dot, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %custom-call.1 = (bf16[64,64]{1,0}, s8[1024]{0}) custom-call(%a, %a), custom_call_target="__cublas$lt$matmul"
  %custom-call.2 = (bf16[64,64]{1,0}, u8[0]{0}) custom-call(%a, %a, %a), custom_call_target="__cudnn$fmhaSoftmax"
  %custom-call.3 = bf16[64,64]{1,0} custom-call(%a), custom_call_target="__gpu$xla.gpu.triton"
  %all-gather-start = (bf16[64,64]{1,0}, bf16[128,64]{1,0}) all-gather-start(%a), replica_groups={{0,1}}, dimensions={0}
  %all-gather-done = bf16[128,64]{1,0} all-gather-done(%all-gather-start)
  %loop_add_fusion = f32[64]{0} fusion(%v), kind=kLoop, calls=%fused_add, metadata={op_name="jit(train_step)/jvp(loss)/add" source_file="/src/xorl_jax/loss.py" source_line=97}
  %input_reduce_fusion = f32[64]{0} fusion(%m), kind=kInput, calls=%fused_reduce
  %transpose_fusion = f32[64,64]{0,1} fusion(%m), kind=kLoop, calls=%fused_transpose
  ROOT %copy.1 = bf16[64,64]{0,1} copy(%a)
}
"""

# (kernel name, hlo_op or None, duration us, category expected with HLO, category expected from the name alone)
KERNELS = [
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTN", "custom-call.1", 300.0, "gemm", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_cublas", "custom-call.1", 200.0, "gemm", "gemm"),
    ("gemm_fusion_dot_1", "gemm_fusion_dot.1", 100.0, "gemm", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0", "custom-call.2", 250.0,
     "attention", "attention"),
    ("gmm_fwd", "custom-call.3", 120.0, "custom_kernel", "custom_kernel"),
    ("triton_gdn_state_fwd", None, 30.0, "custom_kernel", "custom_kernel"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "all-gather-start", 80.0, "collective",
     "collective"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", None, 60.0, "collective",
     "collective"),
    ("loop_add_fusion", "loop_add_fusion", 40.0, "fusion", "fusion"),
    ("input_reduce_fusion", "input_reduce_fusion", 35.0, "fusion", "fusion"),
    ("transpose_fusion", "transpose_fusion", 15.0, "copy", "copy"),
    ("MemcpyD2D", None, 10.0, "copy", "copy"),
    ("copy_1", "copy.1", 5.0, "copy", "copy"),
]


def gpu_trace(steps=2):
    """Two GPUs running the same kernels each step, plus a host thread and an `XLA Ops` line that must not count."""
    ev = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
          {"ph": "M", "pid": 1, "tid": 1, "name": "thread_name", "args": {"name": "python"}},
          {"ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 1e6, "name": "PjitFunction(train_step)"}]
    for dev, pid in ((0, 10), (1, 11)):
        ev += [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": f"/device:GPU:{dev}"}},
               {"ph": "M", "pid": pid, "tid": 7, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
               {"ph": "M", "pid": pid, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
               {"ph": "M", "pid": pid, "tid": 9, "name": "thread_name", "args": {"name": "XLA Modules"}}]
        ts = 0.0
        for _ in range(steps):
            ev.append({"ph": "X", "pid": pid, "tid": 9, "ts": ts, "dur": 5000.0, "name": "jit_train_step(1)"})
            for name, op, dur, _, _ in KERNELS:
                args = {"correlation_id": 1}
                if op:
                    args["hlo_op"] = op
                ev.append({"ph": "X", "pid": pid, "tid": 7, "ts": ts, "dur": dur, "name": name, "args": args})
                ev.append({"ph": "X", "pid": pid, "tid": 8, "ts": ts, "dur": dur, "name": op or name})
                ts += dur + 1.0
    return {"displayTimeUnit": "ns", "traceEvents": ev}


@pytest.mark.parametrize("with_hlo", [True, False])
def test_gpu_style_trace_categories(tmp_path, with_hlo):
    path = tmp_path / "plugins" / "profile" / "run" / "perfetto_trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump(gpu_trace(), f)
    s = profiling.summarize_trace(str(tmp_path), hlo_text=HLO if with_hlo else None, steps=2, step_time_s=2e-3)
    assert s["devices"] == ["/device:GPU:0", "/device:GPU:1"]
    expect = {}
    for name, _, dur, cat_hlo, cat_name in KERNELS:
        cat = cat_hlo if with_hlo else cat_name
        expect[cat] = expect.get(cat, 0.0) + dur / 1e3
    for cat in profiling.CATEGORIES:
        assert s["categories"][cat]["ms"] == pytest.approx(expect.get(cat, 0.0)), cat
    total = sum(k[2] for k in KERNELS) / 1e3  # per device per step: streams only, XLA Ops line not added
    assert s["busy_ms_per_step"] == pytest.approx(total)
    assert set(s["collectives_ms"]) == {"all-gather", "reduce-scatter"}
    assert s["collectives_ms"]["all-gather"] == pytest.approx(0.08)
    top = {o["name"]: o for o in s["top_ops"]}
    assert top["nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTN"]["calls_per_step"] == 1
    assert top["nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTN"]["step_share"] == pytest.approx(0.3 / 2.0)
    assert s["top_ops"][0]["ms"] >= s["top_ops"][-1]["ms"]
    assert "attention (cuDNN fused)" in profiling.format_summary(s)
    # with the HLO, a fusion row says what it computes and where in the model it comes from
    where = top["loop_add_fusion"]["where"]
    assert (where == "f32[64]{0}  jit(train_step)/jvp(loss)/add  loss.py:97") if with_hlo else where is None


def test_xla_ops_line_used_when_there_are_no_streams():
    ev = [{"ph": "M", "pid": 3, "name": "process_name", "args": {"name": "/device:TPU:0"}},
          {"ph": "M", "pid": 3, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
          {"ph": "X", "pid": 3, "tid": 2, "ts": 0, "dur": 10.0, "name": "fusion.3"},
          {"ph": "X", "pid": 3, "tid": 2, "ts": 20, "dur": 30.0, "name": "all-reduce.1"}]
    s = profiling.summarize_trace({"traceEvents": ev})
    assert s["categories"]["collective"]["ms"] == pytest.approx(0.03)
    assert s["categories"]["fusion"]["ms"] == pytest.approx(0.01)


def test_nested_events_count_self_time_and_control_flow_is_skipped():
    mk = lambda name, ts, dur: {"ph": "X", "pid": 1, "tid": 5, "ts": ts, "dur": dur, "name": name,  # noqa: E731
                                "args": {"hlo_op": name, "device_ordinal": "0"}}
    ev = [mk("while.8", 0, 100.0), mk("fusion.1", 10, 30.0), mk("dot.2", 50, 40.0), mk("end: while.8", 100, 0.1)]
    s = profiling.summarize_trace({"traceEvents": ev})
    assert s["busy_ms_per_step"] == pytest.approx(0.07)  # the loop itself is not device work of its own
    assert s["categories"]["gemm"]["ms"] == pytest.approx(0.04)


def test_largest_temp_buffers_from_buffer_assignment():
    text = """BufferAssignment:
allocation 0: size 1048576, parameter 0, shape |f32[512,512]| at ShapeIndex {}:
 value: <13 a.1 @0> (size=1048576,offset=0): f32[512,512]{1,0}
allocation 1: size 4096, preallocated-temp:
 value: <20 fusion.3 @0> (size=2048,offset=0): f32[512]{0}
 value: <21 dot.4 @0> (size=4096,offset=0): f32[1024]{0}
allocation 2: size 2048, output shape is |f32[512]|, maybe-live-out:
 value: <15 out @0> (size=2048,offset=0): f32[512]{0}
"""
    got = profiling.largest_temp_buffers(text, 5)
    assert [b["name"] for b in got] == ["dot.4", "fusion.3"]
    assert got[0]["bytes"] == 4096 and got[0]["shape"] == "f32[1024]{0}"


def test_bench_train_jax_backend_fsdp_ep_profile(tmp_path):
    """benchmarks/bench_train.py end to end on 4 fake CPU devices: tiny MoE, FSDP 4 x EP 4, --profile, --xla-dump."""
    out = tmp_path / "result.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"), "--model", "tiny_moe", "--layers", "1",
           "--batch", "1", "--seq", "128", "--steps", "2", "--warmup", "1", "--backends", "jax", "--fsdp", "4",
           "--ep", "4", "--profile", str(tmp_path / "prof"), "--profile-steps", "2", "--xla-dump",
           str(tmp_path / "xla"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "tok/s/GPU" in proc.stdout and "GEMM / dot" in proc.stdout and "optimized HLO" in proc.stdout
    r = json.loads(out.read_text())["results"]["jax"]
    assert r["n_devices"] == 4 and r["mesh"]["expert"] == 4 and r["dp_size"] == 4
    assert r["tokens_per_step"] == 4 * 128  # rows of 128 (data.pad_to_multiple_of)
    # timed through the real entry point on the YAML it wrote, with the run's defaults (auto on CPU: full, scanned)
    assert r["command"].startswith("python -m xorl_jax.train --config ") and r["steps_timed"] == 2
    assert r["auto"].startswith("auto      remat_policy=full, scan_layers=true: cpu reports no memory limit")
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_s_per_device"] * 4)
    for key in ("step_s", "first_step_s", "loss", "params", "flops_per_token"):
        assert r[key] is not None, key
    prof = r["profile"]
    assert len(prof["devices"]) == 4 and prof["busy_ms_per_step"] > 0
    assert set(prof["categories"]) == set(profiling.CATEGORIES)
    assert prof["categories"]["gemm"]["ms"] > 0
    assert "all-to-all" in prof["collectives_ms"]  # expert-parallel dispatch
    assert os.path.exists(r["trace"])
    assert r["hlo"]["collectives"].get("all-to-all", 0) >= 2
    assert r["hlo_dump"] and os.path.exists(r["hlo_dump"])
    assert r["hlo"]["memory"]["temp_size_in_bytes"] > 0 and r["hlo"]["largest_temps"]
