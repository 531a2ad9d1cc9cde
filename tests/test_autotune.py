"""`train.remat_policy: auto` / `model.scan_layers: auto` (xorl_jax.autotune): candidates fastest first, the first whose
planned peak fits the device limit less the margin wins, explicit settings are never changed, the start-up line says
what and why; the trainer trains with the choice on the step it compiled to choose, and the dry run plans it."""

import jax
import numpy as np
import pytest

from xorl_jax import autotune
from xorl_jax.autotune import Candidate, Limit, candidates, choose, provisional
from xorl_jax.config import ConfigError, load_config
from xorl_jax.train import main

from test_trainer import DEMO_CONFIG, demo_overrides

GiB = 2**30
DOTS, FULL = "dots_attention_saveable", "full"


def demo(tmp_path, *extra, **train):
    """The demo config for a short run: no eval, no samples, no checkpoint at the end."""
    return load_config(DEMO_CONFIG, [*demo_overrides(tmp_path, **train), "--data.eval_datasets=[]",
                                     "--train.sample_eval_prompts=0", "--train.save_at_end=false", *extra])


def test_candidates_fastest_first_and_only_auto_fields_vary():
    assert candidates("auto", "auto", unrolling_pays=True) == [Candidate(DOTS, False), Candidate(FULL, True)]
    # the hybrid (a scan step of several layer kinds): unrolling measured no gain, so scanned only
    assert candidates("auto", "auto", unrolling_pays=False) == [Candidate(DOTS, True), Candidate(FULL, True)]
    assert candidates(FULL, "auto", unrolling_pays=True) == [Candidate(FULL, True)]  # full keeps little: scanned
    assert candidates("dots_saveable", "auto", unrolling_pays=True) == [Candidate("dots_saveable", False)]
    assert candidates("auto", False, unrolling_pays=True) == [Candidate(DOTS, False), Candidate(FULL, False)]
    assert candidates("none", True, unrolling_pays=True) == [Candidate("none", True)]
    # before the choice, and where devices report no limit: least memory, scanned (explicit fields kept)
    assert provisional("auto", "auto") == Candidate(FULL, True)
    assert provisional(DOTS, "auto") == Candidate(DOTS, True) and provisional("auto", False) == Candidate(FULL, False)


@pytest.mark.parametrize("config_dir,pays", [("demo", True), ("demo_qwen3_5_moe", False)])
def test_unrolling_is_planned_only_for_stacks_of_alike_layers(config_dir, pays):
    """Qwen3(-MoE) scans one layer per step; the hybrid Qwen3.5 a group of linear- and full-attention layers."""
    import os

    from xorl_jax.data.demo import DEMO_DIR
    from xorl_jax.models.common import ModelOptions
    from xorl_jax.checkpoint.orbax import read_hf_config
    from xorl_jax.models.loading import abstract_model, build_config

    cls, mcfg = build_config(read_hf_config(os.path.join(os.path.dirname(DEMO_DIR), config_dir)))
    model = abstract_model(cls, mcfg, ModelOptions())
    assert autotune.unrolling_pays(model) is pays
    assert candidates("auto", "auto", unrolling_pays=pays)[0] == Candidate(DOTS, not pays)


def _planner(planned: dict):
    seen = []

    def plan(cand):
        seen.append(cand)
        return planned[cand], f"step for {cand}"

    return plan, seen


def test_choose_takes_the_first_that_fits_with_the_margin_and_stops_there():
    cands = [Candidate(DOTS, False), Candidate(DOTS, True), Candidate(FULL, True)]
    plan, seen = _planner({cands[0]: 70 * GiB, cands[1]: 60 * GiB, cands[2]: 30 * GiB})
    choice, step = choose(cands, plan, Limit(72 * GiB, "a fake 72 GiB device"))
    # 70 GiB is under the limit but not under 90% of it (64.8 GiB); 60 GiB is; the third is never compiled
    assert choice.candidate == cands[1] and choice.how == "fits" and step == f"step for {cands[1]}"
    assert seen == cands[:2] and choice.planned == 60 * GiB and choice.rejected == ((cands[0], 70 * GiB),)
    line = choice.line()
    assert line.startswith(f"auto      remat_policy={DOTS}, scan_layers=true: planned 60.00 GiB/device fits the "
                           "limit of 72.00 GiB less 10% (a fake 72 GiB device)")
    assert f"; {DOTS} unrolled planned 70.00 GiB;" in line and "2 of 3 candidates compiled in" in line
    assert "\n" not in line
    plan, seen = _planner({cands[0]: 10 * GiB})
    assert choose(cands, plan, Limit(72 * GiB, "x"))[0].candidate == cands[0] and seen == cands[:1]


def test_choose_when_nothing_fits_without_a_limit_or_with_one_candidate():
    cands = candidates("auto", "auto", unrolling_pays=True)
    plan, seen = _planner({c: 100 * GiB for c in cands})
    choice, step = choose(cands, plan, Limit(72 * GiB, "x"))
    assert choice.candidate == cands[-1] and choice.how == "none fits" and seen == cands and step is not None
    assert "no candidate fits" in choice.line() and "may run out of memory" in choice.line()

    def never(cand):
        raise AssertionError("nothing is compiled to choose here")

    # CPU: a fixed choice, nothing compiled
    no_limit, step = choose(cands, never, None, fallback=Candidate(FULL, True), platform="cpu")
    assert no_limit.candidate == Candidate(FULL, True) and step is None
    assert "cpu reports no memory limit" in no_limit.line() and "nothing compiled" in no_limit.line()
    only, _ = choose([Candidate(DOTS, False)], never, Limit(72 * GiB, "x"))
    assert only.how == "only" and only.candidate == Candidate(DOTS, False) and "nothing compiled" in only.line()
    explicit, _ = choose([Candidate(FULL, False)], never, Limit(72 * GiB, "x"), explicit=True)
    assert explicit.candidate == Candidate(FULL, False) and explicit.line() is None


def test_auto_is_the_default_and_explicit_settings_win(tmp_path):
    from xorl_jax.models.loading import abstract_model
    from xorl_jax.train_setup import model_and_mesh

    assert autotune.requested(load_config(None)) == ("auto", "auto")
    assert jax.devices()[0].platform != "cpu" or autotune.device_limit() is None  # CPU: no extra compiles
    cfg = demo(tmp_path, "--model.scan_layers=false", enable_gradient_checkpointing=True, remat_policy=FULL)
    assert autotune.requested(cfg) == (FULL, False)
    _, cls, mcfg, options, _, _ = model_and_mesh(cfg)
    assert (options.remat_policy, options.scan_layers) == (FULL, False)
    model = abstract_model(cls, mcfg, options)

    def never(graphdef):
        raise AssertionError("explicit settings compile nothing extra")

    choice, compiled = autotune.choose_layer_settings(cfg, model, never, limit=Limit(GiB, "a tiny device"))
    assert choice.line() is None and compiled is None
    assert (model.options.remat_policy, model.options.scan_layers) == (FULL, False)
    # no gradient checkpointing is an explicit `none`; scan_layers takes true, false or auto only
    assert autotune.requested(demo(tmp_path, enable_gradient_checkpointing=False))[0] == "none"
    with pytest.raises(ConfigError, match="model.scan_layers must be true, false or auto"):
        load_config(None, ["--model.scan_layers=1"])


def test_trainer_trains_with_auto_on_the_step_compiled_to_choose(tmp_path, monkeypatch):
    """A fake device limit makes the CPU run choose as a GPU run does: the first candidate fits, is compiled once on
    the mesh, and is the step the run trains with (no second compile of the train step)."""
    from jax._src import monitoring

    from xorl_jax.trainer import Trainer

    monkeypatch.setattr(autotune, "device_limit", lambda: Limit(64 * GiB, "a fake 64 GiB device"))
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name"))

    monitoring.register_event_duration_secs_listener(listener)
    try:
        trainer = Trainer(demo(tmp_path, enable_gradient_checkpointing=True, max_steps=2,
                               gradient_accumulation_steps=1))
        assert trainer.layer_choice.how == "fits" and trainer.layer_choice.candidate == Candidate(DOTS, False)
        assert (trainer.model.options.remat_policy, trainer.model.options.scan_layers) == (DOTS, False)
        assert compiles.count("jit(train_step)") == 1
        assert trainer.layer_choice.line() in trainer.summary().splitlines()
        assert f"remat={DOTS}, layers=unrolled" in trainer.summary()
        result = trainer.train()
        assert compiles.count("jit(train_step)") == 1
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert result["step"] == 2 and np.isfinite(result["loss"])


def test_dry_run_plans_auto_against_an_assumed_h100(tmp_path):
    from xorl_jax.plan import dry_run

    report = dry_run(demo(tmp_path, "--model.scan_layers=true", enable_gradient_checkpointing=True))
    assert report.layers.candidate == Candidate(DOTS, True) and report.layers.how == "fits"
    line = next(ln for ln in report.lines() if ln.startswith("auto "))
    # fake CPU devices compile the GPU kernels' jnp references, which keep more than the kernels: the candidates are
    # chosen by the estimate for a GPU, and only the choice is compiled (the step the plan reports)
    assert "an assumed 80 GiB H100 x 0.9" in line and "1 of 2 candidates estimated, nothing compiled to choose" in line
    assert report.layers.planned == report.estimated_peak and "estimated for a GPU" in line
    assert report.compile_s > 0 and report.memory


@pytest.mark.parametrize("args,needle", [(["--device-memory-gib", "80"], "only goes with --dry-run"),
                                         (["--dry-run", "--device-memory-gib=lots"], "GPU's memory in GiB")])
def test_cli_device_memory_flag_errors(args, needle, capsys):
    assert main(["--config", DEMO_CONFIG, *args]) == 2
    assert needle in capsys.readouterr().err
