"""`train.remat_policy: auto` and `model.scan_layers: auto`: the fastest layer settings whose step fits the device.

The candidates are (remat policy, scanned or unrolled layers) pairs in the order of their measured speed
(docs/PERFORMANCE.md, one GPU):

- `dots_attention_saveable` keeps matmul, grouped-GEMM, SwiGLU and fused-attention outputs and is 8-10% faster
  than `full` on the dense, MoE and hybrid shapes measured, for more memory;
- unrolled layers keep what remat saves in each layer's own buffers instead of copying it into stacked ones: 4.4%
  shorter steps on Qwen3 1.7B with `dots_attention_saveable`, nothing gained under `full` (which keeps little) and
  nothing for the hybrid Qwen3.5 cut, whose scan steps over a group of several layer kinds. So a policy that keeps
  outputs runs unrolled on a model whose layers are all alike, scanned otherwise. Its scanned form is no candidate
  beside the unrolled one: both plan the same memory (Qwen3 1.7B at 6 x 4096 tokens on an H100: 66.57 and 66.53
  GiB), so where one does not fit neither does the other.

So with both fields at `auto`: `dots_attention_saveable` unrolled (scanned for the hybrid), then `full` scanned.

Each candidate's train step is compiled on the run's mesh and its per-device peak read from XLA's memory analysis
(arguments + outputs + temporaries - aliased bytes); the first one whose peak fits the device's memory limit with
MARGIN to spare wins, so a run whose first choice fits compiles nothing extra, and the compiled step is the one
the run trains with (the persistent compilation cache makes a re-run's choosing cheap). Explicit settings are never
changed: only the fields left at `auto` vary. Where the device reports no memory limit (CPU), nothing is compiled to
choose: `provisional` (full remat unless set, scanned layers unless set: least memory, quickest compile) is taken,
which keeps CPU runs and tests as they were. The dry run on fake CPU devices plans for a GPU it does not have: it passes
an estimate of each candidate's GPU peak instead (its compiled CPU program keeps what the GPU kernels do not), so
nothing is compiled to choose there either, and the choice is the one compiled.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

AUTO = "auto"
MARGIN = 0.10  # of the device limit left free: XLA's estimate is not the allocator's peak
FAST_REMAT = "dots_attention_saveable"
SAFE_REMAT = "full"
ASSUMED_DEVICE_GIB = 80.0  # an H100's memory, for planning where the devices report none (dry run on CPU)
JAX_MEM_FRACTION = 0.90  # of a GPU's memory the trainer lets JAX's allocator take (JAX's own default is 0.75)


def claim_device_memory(env=None) -> None:
    """Before JAX starts: let its allocator take JAX_MEM_FRACTION of each GPU (the rest stays for cuDNN, cuBLAS and
    NCCL), as scripts/slurm/xla_gpu.env does for SLURM jobs. JAX's default 0.75 leaves 20 GB of an H100 unused and
    pushed `auto` to full remat, or out of memory, where the faster settings fit. A value the user set wins."""
    env = os.environ if env is None else env
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{JAX_MEM_FRACTION:.2f}")


@dataclasses.dataclass(frozen=True)
class Candidate:
    remat_policy: str
    scan_layers: bool

    def __str__(self) -> str:
        return f"remat_policy={self.remat_policy}, scan_layers={str(self.scan_layers).lower()}"


@dataclasses.dataclass(frozen=True)
class Limit:
    bytes: int
    source: str  # where the figure comes from, for the start-up line


@dataclasses.dataclass
class Choice:
    """What `auto` picked and why (`line()` is the start-up line; None when nothing was left at auto)."""

    candidate: Candidate
    how: str  # explicit | only | no limit | fits | none fits
    candidates: tuple[Candidate, ...] = ()
    planned: int | None = None  # the chosen step's per-device peak, bytes
    limit: Limit | None = None
    margin: float = MARGIN
    compile_s: float = 0.0  # spent compiling candidates (the chosen one included: the run reuses it)
    rejected: tuple[tuple[Candidate, int], ...] = ()  # tried first, did not fit: (candidate, planned bytes)
    note: str = ""  # e.g. how indicative the plan is (fake CPU devices)
    platform: str = ""
    estimated: bool = False  # candidates planned by an estimate (the dry run on CPU), not compiled

    @property
    def compiled(self) -> int:
        return len(self.rejected) + (self.planned is not None)

    def line(self) -> str | None:
        if self.how == "explicit":
            return None
        head = f"auto      {self.candidate}"
        if self.how == "only":
            return f"{head}: the only candidate with the settings given (nothing compiled to choose)"
        if self.how == "no limit":
            return (f"{head}: {self.platform or 'this device'} reports no memory limit, so the fields left at auto "
                    f"take the least-memory setting (full remat, scanned layers); nothing compiled to choose")
        note = f" ({self.note})" if self.note else ""
        room = f"the limit of {_gib(self.limit.bytes)} less {self.margin:.0%} ({self.limit.source})"
        tried = "".join(f"; {c.remat_policy} {'scanned' if c.scan_layers else 'unrolled'} planned {_gib(b)}"
                        for c, b in self.rejected)
        cost = (f"{self.compiled} of {len(self.candidates)} candidates estimated, nothing compiled to choose"
                if self.estimated else
                f"{self.compiled} of {len(self.candidates)} candidates compiled in {self.compile_s:.1f}s")
        if self.how == "fits":
            return f"{head}: planned {_gib(self.planned)}/device{note} fits {room}{tried}; {cost}"
        return (f"{head}: no candidate fits {room}{tried}; this one, the least memory, plans {_gib(self.planned)}/"
                f"device{note} and may run out of memory (fewer rows per device or more devices); {cost}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def requested(cfg) -> tuple[str, bool | str]:
    """(remat policy, scan_layers) as configured; either may be `auto`. No gradient checkpointing = `none`."""
    t = cfg.train
    return (t.remat_policy if t.enable_gradient_checkpointing else "none"), cfg.model.scan_layers


def candidates(remat: str, scan: bool | str, *, unrolling_pays: bool) -> list[Candidate]:
    """Fastest first, then less memory; only the fields at `auto` vary (see the module docstring)."""
    out = []
    for policy in ([FAST_REMAT, SAFE_REMAT] if remat == AUTO else [remat]):
        if scan != AUTO:
            unrolled = not scan
        else:  # unrolled where it was measured faster: a policy that keeps per-layer outputs, layers all alike
            unrolled = policy != SAFE_REMAT and unrolling_pays
        out.append(Candidate(policy, not unrolled))
    return out


def provisional(remat: str, scan: bool | str) -> Candidate:
    """What a model is built with before the choice, and the choice where devices report no memory limit: full remat
    and scanned layers unless set (the least memory whatever the model, the quickest compile)."""
    return Candidate(SAFE_REMAT if remat == AUTO else remat, True if scan == AUTO else scan)


def unrolling_pays(model) -> bool:
    """Unrolling was measured to pay for a layer stack whose scan step is one layer (dense Qwen3; Qwen3-MoE is built
    alike and treated alike), not for the hybrid Qwen3.5, whose scan step is a group of linear- and full-attention
    layers."""
    return len(model.layers.pattern) == 1


def memory_of(compiled) -> dict:
    """XLA's per-device memory analysis of a compiled program: argument/output/temp/alias bytes ({} where the
    backend has none)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if ma is None:
        return {}
    names = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes",
             "temp": "temp_size_in_bytes", "alias": "alias_size_in_bytes"}
    return {k: int(getattr(ma, v, 0) or 0) for k, v in names.items()}


def peak_bytes(memory: dict) -> int:
    """Per-device peak of a compiled step from its memory analysis (`memory_of`)."""
    return memory.get("argument", 0) + memory.get("output", 0) + memory.get("temp", 0) - memory.get("alias", 0)


def device_limit() -> Limit | None:
    """The smallest memory limit the allocator reports over this process's devices (over all processes when there
    are several, so every process makes the same choice); None where devices report none (CPU)."""
    import jax

    limits = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001 - a backend without memory statistics
            stats = {}
        limits.append(stats.get("bytes_limit"))
    if not limits or any(x is None for x in limits):
        return None
    limit = min(int(x) for x in limits)
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        limit = int(np.min(multihost_utils.process_allgather(np.asarray(limit, np.int64))))
    return Limit(limit, f"{jax.local_devices()[0].device_kind}, as its allocator reports it")


def planning_limit(device_memory_gib: float | None) -> Limit:
    """The limit a plan assumes for a device that reports none: `device_memory_gib` (or an H100's 80 GiB) times the
    share JAX's allocator takes of it."""
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION") or JAX_MEM_FRACTION)
    gib = ASSUMED_DEVICE_GIB if device_memory_gib is None else float(device_memory_gib)
    fraction_text = f"x {fraction:g}, JAX's memory fraction"
    what = (f"--device-memory-gib {gib:g} {fraction_text}" if device_memory_gib is not None
            else f"an assumed {gib:g} GiB H100 {fraction_text}; --device-memory-gib sets the GPU's GiB")
    return Limit(int(gib * fraction * 2**30), what)


def choose(cands: list[Candidate], plan: Callable[[Candidate], tuple[int, Any]], limit: Limit | None, *,
           fallback: Candidate | None = None, explicit: bool = False, margin: float = MARGIN, note: str = "",
           platform: str = "") -> tuple[Choice, Any]:
    """(the choice, what `plan` returned for it besides its bytes; None when nothing was planned).

    `plan(candidate) -> (planned peak bytes, artifact)` compiles one candidate. Candidates are planned in order and
    the first that fits `limit` with `margin` to spare wins; when none fits, the last (least memory). With one
    candidate nothing is planned; with no limit nothing is planned and `fallback` (default: the last candidate) is
    taken."""
    cands = list(cands)
    last = cands[-1]
    if explicit:
        return Choice(last, "explicit", tuple(cands)), None
    if limit is None:
        return Choice(fallback or last, "no limit", tuple(cands), platform=platform), None
    if len(cands) == 1:
        return Choice(last, "only", tuple(cands)), None
    rejected, spent = [], 0.0
    for i, cand in enumerate(cands):
        t0 = time.perf_counter()
        planned, artifact = plan(cand)
        spent += time.perf_counter() - t0
        fits = planned <= (1.0 - margin) * limit.bytes
        if fits or i == len(cands) - 1:
            return Choice(cand, "fits" if fits else "none fits", tuple(cands), planned=planned, limit=limit,
                          margin=margin, compile_s=spent, rejected=tuple(rejected), note=note,
                          platform=platform), artifact
        rejected.append((cand, planned))
    raise AssertionError("unreachable")


def set_layer_settings(model, cand: Candidate) -> None:
    """Make `model` (concrete or abstract) run with `cand`'s settings; its graphdef changes, its parameters do not."""
    model.options = dataclasses.replace(model.options, remat_policy=cand.remat_policy, scan_layers=cand.scan_layers)


def choose_layer_settings(cfg, model, compile_step: Callable[[Any], Any], *, limit: Limit | None | str = "device",
                          note: str = "", estimate: Callable[[Candidate], int] | None = None) -> tuple[Choice, Any]:
    """Resolve `auto` for `model`: (choice, compile_step's result for the chosen graphdef, or None when nothing was
    compiled). `compile_step(graphdef) -> (compiled executable, artifact)` compiles the train step for a graphdef;
    the model is left set to the choice. `limit`: "device" = what the devices report. `estimate(candidate) -> bytes`
    plans candidates without compiling them (the dry run on CPU, whose compiled programs are not a GPU's)."""
    import jax
    from flax import nnx

    remat, scan = requested(cfg)
    cands = candidates(remat, scan, unrolling_pays=unrolling_pays(model))
    if limit == "device":
        limit = device_limit()

    def plan(cand):
        set_layer_settings(model, cand)
        if estimate is not None:
            return estimate(cand), None
        compiled, artifact = compile_step(nnx.graphdef(model))
        return peak_bytes(memory_of(compiled)), (compiled, artifact)

    choice, planned = choose(cands, plan, limit, fallback=provisional(remat, scan), explicit=AUTO not in (remat, scan),
                             note=note, platform=jax.devices()[0].platform)
    choice.estimated = estimate is not None
    set_layer_settings(model, choice.candidate)
    return choice, planned
