"""Summaries of a `jax.profiler` trace and of an optimized HLO module: where a training step spends device time.

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        ...                                              # a few steady-state steps
    summary = summarize_trace(find_trace(log_dir), hlo_text=compiled.as_text(), steps=3)
    print(format_summary(summary))
    print(format_hlo_summary(hlo_summary(compiled.as_text(), compiled.memory_analysis())))

The trace is the Chrome/Perfetto JSON that the profiler writes (`perfetto_trace.json.gz` or `*.trace.json.gz`),
read with the standard library. Which events are device work:
- GPU (and TPU): processes named `/device:...`; the kernel events on their `Stream ...` tracks (memcpy included),
  else their `XLA Ops` track. Kernel events carry the HLO instruction they belong to in `args.hlo_op`.
- CPU: the XLA:CPU thunk events (`args.hlo_op`, `args.device_ordinal`) on the runtime's worker threads. Control
  flow (while/conditional/call) is skipped: its body's ops are recorded on their own.
Each event gets a category from its HLO instruction when the optimized HLO text is given (fusion contents, custom
call targets), else from its kernel name. Times are per device: summed over devices, divided by their count.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re

CATEGORIES = ("gemm", "attention", "custom_kernel", "fusion", "collective", "copy", "other")
LABELS = {
    "gemm": "GEMM / dot",
    "attention": "attention (cuDNN fused)",
    "custom_kernel": "Triton / Pallas kernels",
    "fusion": "fusions (elementwise / reduction)",
    "collective": "collectives",
    "copy": "copies / transposes",
    "other": "other",
}
COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "permute / send-recv")

_CONTROL = {"while", "conditional", "call"}
_COPY_OPS = {"copy", "copy-start", "copy-done", "transpose", "bitcast", "reshape", "slice", "dynamic-slice",
             "dynamic-update-slice", "concatenate", "pad", "broadcast", "tuple", "get-tuple-element", "parameter",
             "constant", "iota", "reverse"}
_COLLECTIVE_OPS = {
    "all-gather": "all-gather", "all-gather-start": "all-gather", "all-gather-done": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce", "all-reduce-done": "all-reduce",
    "all-to-all": "all-to-all", "ragged-all-to-all": "all-to-all",
    "collective-permute": "permute / send-recv", "collective-permute-start": "permute / send-recv",
    "collective-permute-done": "permute / send-recv", "collective-broadcast": "permute / send-recv",
    "send": "permute / send-recv", "recv": "permute / send-recv", "send-done": "permute / send-recv",
    "recv-done": "permute / send-recv",
}
_ELEMENTWISE_OR_REDUCE = {"reduce", "reduce-window", "select-and-scatter", "map"}


# ------------------------------------------------------------------------------------------------ HLO text
@dataclasses.dataclass
class HloInstruction:
    name: str
    opcode: str
    calls: tuple[str, ...]  # called computations (fusion bodies, async wrapped computations, loop bodies)
    target: str | None  # custom_call_target
    text: str


_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
_INST_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_CALLS_RE = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|async_execution_thread)="
                       r"(\{[^}]*\}|%?[\w.\-]+)")
_TARGET_RE = re.compile(r'custom_call_target="([^"]+)"')


def parse_hlo(text: str) -> tuple[dict[str, list[HloInstruction]], str | None]:
    """({computation name: instructions}, entry computation name) of an HLO module's text."""
    comps: dict[str, list[HloInstruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _COMP_RE.match(line)
            if m and not line.startswith("HloModule"):
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INST_RE.match(line)
        if not m:
            continue
        calls = []
        for c in _CALLS_RE.findall(line):
            calls.extend(x.strip().lstrip("%") for x in c.strip("{}").split(",") if x.strip())
        t = _TARGET_RE.search(line)
        comps[current].append(HloInstruction(m.group(1), m.group(3), tuple(calls), t.group(1) if t else None, line))
    return comps, entry


def _target_category(target: str) -> str:
    t = target.lower()
    if "cudnn" in t and ("fmha" in t or "attention" in t or "sdpa" in t):
        return "attention"
    if "cublas" in t or "gemm" in t or "matmul" in t or "cudnn" in t:
        return "gemm"
    if "triton" in t or "pallas" in t or "mosaic" in t:
        return "custom_kernel"
    return "other"


def _instruction_category(inst: HloInstruction, comps, seen=None) -> tuple[str, str | None]:
    """(category, collective kind or None) of one instruction; fusions and async wrappers by what they contain."""
    op = inst.opcode
    if op in _COLLECTIVE_OPS:
        return "collective", _COLLECTIVE_OPS[op]
    if op in ("dot", "convolution", "ragged-dot"):
        return "gemm", None
    if op == "custom-call":
        return _target_category(inst.target or ""), None
    if op in _CONTROL:
        return "control", None
    if op in ("fusion", "async-start", "async-update", "async-done"):
        if "__triton_gemm" in inst.text or "__cudnn$fusion" in inst.text or "__cublas" in inst.text:
            return "gemm", None
        if "__triton" in inst.text:  # XLA's own Triton-emitted fusions (softmax, reductions)
            return "fusion", None
        seen = set() if seen is None else seen
        found = _body_categories(inst.calls, comps, seen)
        for cat in ("collective", "attention", "gemm", "custom_kernel"):
            if cat in found:
                return cat, found[cat]
        if found and set(found) <= {"copy"}:
            return "copy", None
        return ("fusion" if op == "fusion" else "other"), None
    if op in _COPY_OPS:
        return "copy", None
    if op in ("sort", "scatter", "gather", "rng", "rng-bit-generator", "rng-get-and-update-state", "cholesky",
              "triangular-solve", "fft", "infeed", "outfeed", "after-all", "partition-id", "replica-id"):
        return "other", None
    return "fusion", None  # standalone elementwise ops and reductions


def _body_categories(names, comps, seen) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in names:
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for inst in comps[name]:
            if inst.opcode in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
                continue
            if inst.opcode in _COPY_OPS:
                found.setdefault("copy", None)
                continue
            cat, kind = _instruction_category(inst, comps, seen)
            if cat not in found or (kind and not found[cat]):
                found[cat] = kind
    return found


def hlo_op_categories(hlo_text: str) -> dict[str, tuple[str, str | None, str]]:
    """{instruction name: (category, collective kind, opcode)} for every instruction of the module."""
    return _op_categories(parse_hlo(hlo_text)[0])


def _op_categories(comps) -> dict[str, tuple[str, str | None, str]]:
    out = {}
    for insts in comps.values():
        for inst in insts:
            cat, kind = _instruction_category(inst, comps)
            out[inst.name] = (cat, kind, inst.opcode)
    return out


# ------------------------------------------------------------------------------------------------ kernel names
_NCCL_KINDS = (("allgather", "all-gather"), ("reducescatter", "reduce-scatter"), ("allreduce", "all-reduce"),
               ("alltoall", "all-to-all"), ("sendrecv", "permute / send-recv"), ("send", "permute / send-recv"),
               ("recv", "permute / send-recv"), ("broadcast", "permute / send-recv"))


def _collective_kind(name: str) -> str | None:
    n = name.lower().replace("_", "").replace("-", "")
    for key, kind in _NCCL_KINDS:
        if key in n:
            return kind
    return None


def classify_name(name: str) -> tuple[str, str | None]:
    """(category, collective kind) from a kernel or HLO op name alone: the fallback without HLO text."""
    n = name.lower()
    base = re.sub(r"[.\d]+$", "", n)
    if base in _CONTROL:
        return "control", None
    if "nccl" in n or base in _COLLECTIVE_OPS:
        return "collective", _COLLECTIVE_OPS.get(base) or _collective_kind(n) or "all-reduce"
    if "fmha" in n or "sdpa" in n or "flash" in n or "attention" in n:
        return "attention", None
    if "triton_gemm" in n or "gemm_fusion" in n:
        return "gemm", None
    if n.startswith("triton") or "pallas" in n or "mosaic" in n or re.match(r"(gmm|gdn)_", n):
        return "custom_kernel", None
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "wgmma", "hgmma")) or \
            base in ("dot", "convolution") or n.startswith(("dot_", "dot.", "cudnn")):
        return "gemm", None
    if "memcpy" in n or "memset" in n or base in _COPY_OPS or "transpose" in n or \
            n.startswith(("copy", "wrapped_copy")):
        return "copy", None
    if "fusion" in n or n.startswith(("loop_", "input_", "wrapped_", "reduce")):
        return "fusion", None
    return "other", None


# ------------------------------------------------------------------------------------------------ trace events
@dataclasses.dataclass
class OpEvent:
    name: str  # kernel or op name as shown in the trace
    hlo_op: str | None  # the HLO instruction it belongs to, when the trace says
    device: str
    ts: float  # us
    dur: float  # us, self time (nested op events subtracted)
    track: tuple


def find_trace(path: str) -> str:
    """The newest trace JSON under a profiler log dir (or the file itself)."""
    if os.path.isfile(path):
        return path
    found = []
    for pattern in ("**/perfetto_trace.json.gz", "**/*.trace.json.gz", "**/*.trace.json"):
        found = glob.glob(os.path.join(path, pattern), recursive=True)
        if found:
            break
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz or *.trace.json.gz under {path}")
    return max(found, key=os.path.getmtime)


def load_trace(path: str) -> dict:
    path = find_trace(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {"traceEvents": data}


def _self_times(events: list[OpEvent]) -> list[OpEvent]:
    """Subtract the time of op events nested inside another op event on the same track (XLA:CPU records a
    fusion's or a loop's inner thunks inside it; GPU stream kernels never nest, so nothing changes there)."""
    by_track = collections.defaultdict(list)
    for e in events:
        by_track[e.track].append(e)
    out = []
    for evs in by_track.values():
        evs.sort(key=lambda e: (e.ts, -e.dur))
        stack: list[tuple[OpEvent, float]] = []  # (event, end)
        for e in evs:
            end = e.ts + e.dur
            while stack and stack[-1][1] <= e.ts:
                stack.pop()
            if stack and end <= stack[-1][1] + 1e-3:
                stack[-1][0].dur = max(0.0, stack[-1][0].dur - e.dur)
            stack.append((e, end))
            out.append(e)
    return out


def device_events(trace: dict) -> list[OpEvent]:
    """The device-work events of a trace (see the module docstring for which ones)."""
    events = trace.get("traceEvents", [])
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e.get("pid")] = str(e.get("args", {}).get("name", ""))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device_pids = {pid for pid, name in procs.items() if name.startswith("/device:") and "CPU" not in name.upper()}
    out = []
    if device_pids:
        for pid in device_pids:
            tids = {tid for (p, tid), name in threads.items() if p == pid}
            streams = {t for t in tids if threads[(pid, t)].lower().startswith("stream")}
            ops_line = {t for t in tids if threads[(pid, t)] == "XLA Ops"}
            use = streams or ops_line or None
            for e in complete:
                if e.get("pid") != pid or (use is not None and e.get("tid") not in use):
                    continue
                args = e.get("args") or {}
                hlo_op = args.get("hlo_op") or (e["name"] if e.get("tid") in ops_line else None)
                out.append(OpEvent(e["name"], hlo_op, procs[pid], float(e["ts"]), float(e["dur"]),
                                   (pid, e.get("tid"))))
    else:  # XLA:CPU
        for e in complete:
            args = e.get("args") or {}
            if "hlo_op" not in args or e["name"].startswith("end: "):
                continue
            proc = procs.get(e.get("pid"), "")
            where = "cpu" if "cpu" in proc.lower() or not proc else proc  # one process per device if not XLA:CPU
            out.append(OpEvent(e["name"], args["hlo_op"], f"{where}:{args.get('device_ordinal', 0)}",
                               float(e["ts"]), float(e["dur"]), (e.get("pid"), e.get("tid"))))
    return _self_times(out)


# ------------------------------------------------------------------------------------------------ summary
def _base_name(name: str) -> str:
    """`all-reduce.85` -> `all-reduce`, `loop_add_fusion_3` -> `loop_add_fusion`: instances of one kind together."""
    return re.sub(r"([._]\d+)+$", "", name) or name


_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')
_SOURCE_RE = re.compile(r'source_file="?([^"\s,}]+)"?\s*,?\s*source_line=(\d+)')


def _where(inst_text: str) -> str:
    """`shape  jax op name  file:line` of an HLO instruction, from its metadata: what a fusion computes, in the
    model's terms (the kernel name alone says only `loop_select_fusion`)."""
    m = _INST_RE.match(inst_text)
    shape = m.group(2).strip() if m else ""
    shape = shape if len(shape) <= 60 else shape[:57] + "..."
    op = _OP_NAME_RE.search(inst_text)
    src = _SOURCE_RE.search(inst_text)
    parts = [shape]
    if op:
        name = op.group(1)
        parts.append(name if len(name) <= 110 else "..." + name[-107:])
    if src:
        parts.append(f"{os.path.basename(src.group(1))}:{src.group(2)}")
    return "  ".join(p for p in parts if p)


def _heaviest(op: dict, texts: dict) -> str | None:
    """`where` of the instruction with the most time in a row that groups several (`loop_select_fusion` x 22)."""
    if not op.get("inst_us"):
        return None
    inst, us = op["inst_us"].most_common(1)[0]
    share = f"  ({us / op['us']:.0%} of the row)" if len(op["inst_us"]) > 1 else ""
    return _where(texts[inst]) + share


def summarize_events(events: list[OpEvent], *, hlo_text: str | None = None, steps: int = 1,
                     step_time_s: float | None = None, top: int = 25) -> dict:
    """Device time per category and per op, per device and per step (ms). Shares are of the device busy time,
    and of the measured step time when `step_time_s` is given."""
    comps = parse_hlo(hlo_text)[0] if hlo_text else {}
    hlo = _op_categories(comps)
    texts = {i.name: i.text for insts in comps.values() for i in insts}
    devices = sorted({e.device for e in events})
    n_dev = max(len(devices), 1)
    steps = max(int(steps), 1)
    cat_us = collections.Counter()
    coll_us = collections.Counter()
    ops: dict[str, dict] = {}
    for e in events:
        info = hlo.get(e.hlo_op or "")
        if info is not None:
            cat, kind, _ = info
        else:
            cat, kind = classify_name(e.name)
            if cat == "other" and e.hlo_op and e.hlo_op != e.name:
                cat, kind = classify_name(e.hlo_op)
        if cat == "control":
            continue
        cat_us[cat] += e.dur
        if cat == "collective":
            coll_us[kind or "all-reduce"] += e.dur
        key = (_base_name(e.name), cat)  # one row per kernel (or op) name, numbered instances together
        op = ops.setdefault(key, {"name": key[0], "category": cat, "us": 0.0, "calls": 0, "hlo_ops": set()})
        op["us"] += e.dur
        op["calls"] += 1
        if e.hlo_op and e.hlo_op != e.name:
            op["hlo_ops"].add(e.hlo_op)
        inst = e.hlo_op or e.name  # a CUDA graph (command buffer) holds many ops: it says nothing of one
        if inst in texts and not inst.startswith("command_buffer"):
            op.setdefault("inst_us", collections.Counter())[inst] += e.dur
    scale = 1e-3 / (n_dev * steps)  # us summed over devices and steps -> ms per device per step
    busy = sum(cat_us.values()) * scale
    step_ms = step_time_s * 1e3 if step_time_s else None
    share = lambda ms: ms / busy if busy else 0.0  # noqa: E731
    categories = {c: {"ms": cat_us[c] * scale, "share": share(cat_us[c] * scale)} for c in CATEGORIES}
    collectives = {k: coll_us[k] * scale for k in COLLECTIVE_KINDS if coll_us[k]}
    top_ops = sorted(ops.values(), key=lambda o: -o["us"])[:top]
    top_list = [{"name": o["name"], "category": o["category"], "ms": o["us"] * scale,
                 "hlo_ops": sorted(o["hlo_ops"])[:5], "n_hlo_ops": len(o["hlo_ops"]),
                 # the row's heaviest instruction: what it computes and where in the model
                 "where": _heaviest(o, texts),
                 "calls_per_step": o["calls"] / (n_dev * steps), "share": share(o["us"] * scale),
                 "step_share": (o["us"] * scale / step_ms) if step_ms else None} for o in top_ops]
    return {"devices": devices, "steps": steps, "busy_ms_per_step": busy, "step_ms": step_ms,
            "categories": categories, "collectives_ms": collectives, "top_ops": top_list,
            "events": len(events), "hlo_matched": bool(hlo)}


def summarize_trace(path_or_trace, *, hlo_text: str | None = None, steps: int = 1,
                    step_time_s: float | None = None, top: int = 25) -> dict:
    trace = path_or_trace if isinstance(path_or_trace, dict) else load_trace(path_or_trace)
    return summarize_events(device_events(trace), hlo_text=hlo_text, steps=steps, step_time_s=step_time_s, top=top)


def format_summary(s: dict, top: int = 25) -> str:
    step = f", step {s['step_ms']:.2f} ms measured" if s.get("step_ms") else ""
    lines = [f"device time per step and device: {s['busy_ms_per_step']:.2f} ms busy over {len(s['devices'])} "
             f"device(s), {s['steps']} profiled step(s){step}",
             f"  {'category':36} {'ms':>10} {'busy':>7}" + (f" {'step':>7}" if s.get("step_ms") else "")]
    for c in CATEGORIES:
        v = s["categories"][c]
        row = f"  {LABELS[c]:36} {v['ms']:10.3f} {v['share']:7.1%}"
        if s.get("step_ms"):
            row += f" {v['ms'] / s['step_ms']:7.1%}"
        lines.append(row)
    if s.get("step_ms"):
        idle = s["step_ms"] - s["busy_ms_per_step"]
        lines.append(f"  {'idle / host (step - busy)':36} {idle:10.3f}")
    if s["collectives_ms"]:
        lines.append("  collectives: " + ", ".join(f"{k} {v:.3f} ms" for k, v in s["collectives_ms"].items()))
    lines.append(f"top {min(top, len(s['top_ops']))} ops/kernels (ms per step and device, calls per step):")
    for o in s["top_ops"][:top]:
        st = f" {o['step_share']:6.1%}" if o.get("step_share") is not None else ""
        name = o["name"] if len(o["name"]) <= 90 else o["name"][:87] + "..."
        if o.get("n_hlo_ops"):
            more = f" +{o['n_hlo_ops'] - 1}" if o["n_hlo_ops"] > 1 else ""
            name += f" [{o['hlo_ops'][0]}{more}]"
        lines.append(f"  {o['ms']:9.3f} {o['calls_per_step']:7.1f}x {o['share']:6.1%}{st}  {o['category']:13} {name}")
        if o.get("where"):
            lines.append(f"{'':40}{o['where']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ HLO module
def hlo_summary(hlo_text: str, memory_analysis=None, buffer_assignment: str | None = None,
                top_buffers: int = 5) -> dict:
    """Counts of an optimized HLO module: fusions by kind, custom calls by target, collectives by opcode, dots,
    loops; the compiled memory stats, and the largest temporary buffers when the buffer assignment is given."""
    comps, _ = parse_hlo(hlo_text)
    fusion_kinds, targets, collectives = collections.Counter(), collections.Counter(), collections.Counter()
    dots = loops = instructions = 0
    for insts in comps.values():
        for inst in insts:
            instructions += 1
            if inst.opcode == "fusion":
                m = re.search(r"kind=(k\w+)", inst.text)
                fusion_kinds[m.group(1) if m else "?"] += 1
            elif inst.opcode == "custom-call":
                targets[inst.target or "?"] += 1
            elif inst.opcode in _COLLECTIVE_OPS and not inst.opcode.endswith("-done"):
                collectives[inst.opcode.replace("-start", "")] += 1
            elif inst.opcode in ("dot", "convolution", "ragged-dot"):
                dots += 1
            elif inst.opcode == "while":
                loops += 1
    out = {"computations": len(comps), "instructions": instructions, "fusions": dict(fusion_kinds),
           "custom_calls": dict(targets), "collectives": dict(collectives), "dots": dots, "while_loops": loops}
    if memory_analysis is not None:
        out["memory"] = {k: getattr(memory_analysis, k) for k in
                         ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                          "temp_size_in_bytes", "generated_code_size_in_bytes")
                         if getattr(memory_analysis, k, None) is not None}
    if buffer_assignment:
        out["largest_temps"] = largest_temp_buffers(buffer_assignment, top_buffers)
    return out


_ALLOC_RE = re.compile(r"^allocation \d+: size (\d+)(.*):\s*$")
_VALUE_RE = re.compile(r"^\s*value: <\d+ ([^ >]+)[^>]*> \(size=(\d+),offset=\d+\): (\S+)")


def largest_temp_buffers(buffer_assignment: str, n: int = 5) -> list[dict]:
    """The largest values placed in temporary allocations of an XLA `*buffer-assignment.txt` dump."""
    values, temp = {}, False
    for line in buffer_assignment.splitlines():
        m = _ALLOC_RE.match(line)
        if m:
            attrs = m.group(2)
            temp = not any(w in attrs for w in ("parameter", "output", "constant", "thread-local"))
            continue
        if not line.startswith(" value:") and not line.startswith("  value:"):
            if line and not line.startswith(" "):
                temp = False
            continue
        v = _VALUE_RE.match(line)
        if temp and v:
            name, size, shape = v.group(1), int(v.group(2)), v.group(3)
            if size > values.get(name, (0, ""))[0]:
                values[name] = (size, shape)
    top = sorted(values.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"name": k, "bytes": s, "shape": sh} for k, (s, sh) in top]


def _gib(b) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


def format_hlo_summary(h: dict) -> str:
    fus = ", ".join(f"{k} {v}" for k, v in sorted(h["fusions"].items(), key=lambda kv: -kv[1])) or "none"
    cc = ", ".join(f"{k} x{v}" for k, v in sorted(h["custom_calls"].items(), key=lambda kv: -kv[1])) or "none"
    col = ", ".join(f"{k} x{v}" for k, v in sorted(h["collectives"].items())) or "none"
    text = (f"optimized HLO: {h['instructions']} instructions in {h['computations']} computations; "
            f"{sum(h['fusions'].values())} fusions ({fus}); {h['dots']} dot/convolution instructions; "
            f"{h['while_loops']} while loops; "
            f"custom calls: {cc}; collectives: {col}.")
    mem = h.get("memory")
    if mem:
        text += " Memory: " + ", ".join(f"{k.replace('_size_in_bytes', '')} {_gib(v)}" for k, v in mem.items()) + "."
    if h.get("largest_temps"):
        text += " Largest temporaries: " + ", ".join(f"{b['name']} {b['shape']} {_gib(b['bytes'])}"
                                                      for b in h["largest_temps"]) + "."
    return text
