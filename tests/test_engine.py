"""The trial engine for GPU clusters: precision (fp32/tf32/bf16/fp16), torch.compile, gradient
caching for batches beyond memory, no host syncs in a step, and the throughput figures (model
FLOPs, MFU, peak memory). Every fast path equals the plain one, to a tolerance measured and
stated here; the tests that train a real trial are marked `train`."""

from __future__ import annotations

import math
import sys
import threading
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from scalestudy.errors import Preempted
from scalestudy.expand import derive, trial_id
from scalestudy.losses import sigmoid_loss, softmax_loss
from scalestudy.spec import ModelSpec, TrialConfig
from scalestudy.store import RunStore, Trial, TrialStore
from scalestudy.train import loop
from scalestudy.train.data import normalize
from scalestudy.train.gradcache import cached_gradient_step
from scalestudy.train.loop import Trainer, micro_batch, run_trial
from scalestudy.train.recorder import first_bad
from scalestudy.train.models import TwoTower
from scalestudy.train.monitors import SpikeDetector
from scalestudy.train.precision import MAX_OVERFLOW_RUN, OverflowRun, Precision
from scalestudy.train.ranks import Ranks
from scalestudy.train.summary import summarize, throughput_figures
from scalestudy.train.throughput import (
    DeviceClock, image_forward_flops, peak_flops, table_peak_flops, text_forward_flops,
    training_flops_per_sample,
)
from tests.conftest import TINY_BASE

CPU = torch.device("cpu")
STEPS = 24


def config(**sections: dict[str, Any]) -> TrialConfig:
    """The tiny test trial (tests/conftest.py) with `sections` merged in: 24 steps of 32 pairs."""
    values = {section: dict(keys) for section, keys in TINY_BASE.items()}
    values["train"].update(examples_seen=32 * STEPS, eval_every=12, checkpoint_every=12)
    for section, keys in sections.items():
        values.setdefault(section, {}).update(keys)
    return TrialConfig.model_validate(values)


def as_trial(cfg: TrialConfig) -> Trial:
    return Trial(trial_id=trial_id(cfg), config=cfg, derived=derive(cfg), swept={})


def train_trial(root: Path, name: str, cfg: TrialConfig) -> pl.DataFrame:
    ts = RunStore(root / name).add_trial(as_trial(cfg))
    run_trial(str(ts.path))
    assert ts.state().status == "done"
    metrics = ts.metrics()
    assert metrics["step"].to_list() == list(range(1, STEPS + 1))
    return metrics


def relative_gap(a: pl.Series, b: pl.Series) -> float:
    """The largest |a − b| / |b| over the steps."""
    return float(((a - b).abs() / b.abs()).max())


# --- spec -------------------------------------------------------------------------------------


def test_the_engine_keys_default_to_todays_trial():
    train = TrialConfig().train
    assert (train.precision, train.compile, train.micro_batch_size, train.peak_tflops) == (
        "fp32", False, None, None)


def test_a_micro_batch_that_does_not_divide_the_batch_is_refused_with_divisors_to_use():
    with pytest.raises(ValidationError, match=r"train.micro_batch_size=24 must divide "
                                              r"train.batch_size=64 .*use 16 or 32"):
        config(train={"batch_size": 64, "micro_batch_size": 24})
    # At or above the batch it is a cap that changes nothing: one value serves a sweep over B.
    assert config(train={"batch_size": 64, "micro_batch_size": 128}).train.micro_batch_size == 128


def test_a_micro_batch_must_divide_the_rows_of_each_rank_and_above_them_changes_nothing():
    assert micro_batch(None, 32) is None and micro_batch(64, 32) is None
    assert micro_batch(32, 32) is None and micro_batch(8, 32) == 8
    # 32 divides the batch of 96 but not the 48 rows each of 2 ranks trains.
    with pytest.raises(ValidationError, match=r"micro_batch_size=32 must divide the 48 rows each of "
                                              r"the 2 data-parallel ranks"):
        config(train={"batch_size": 96, "micro_batch_size": 32}, resources={"workers": 2})


# --- gradient caching -------------------------------------------------------------------------


def double_model(**spec: Any) -> TwoTower:
    torch.manual_seed(0)
    model_spec = ModelSpec(patch_size=8, width=16, depth=2, heads=2, embed_dim=16,
                           context_length=12, vocab_size=512, **spec)
    return TwoTower(model_spec, 16, 10.0, -10.0, True, 100.0).double()


def gradients(model: TwoTower) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


LOSSES = {
    "sigmoid": lambda x, y, t, b: sigmoid_loss(x, y, t, b),
    "sigmoid-chunked": lambda x, y, t, b: sigmoid_loss(x, y, t, b, 5),
    "softmax": lambda x, y, t, b: softmax_loss(x, y, t),
    "softmax-chunked-duplicates": lambda x, y, t, b: softmax_loss(
        x, y, t, 5, groups=torch.arange(16) % 12, duplicates="masked"),
}


@pytest.mark.parametrize("lock_image", [False, True], ids=["both-towers", "locked-image"])
@pytest.mark.parametrize("loss", LOSSES)
def test_gradient_caching_gives_every_parameter_the_full_batch_gradient_in_float64(loss, lock_image):
    model = double_model(lock_image=lock_image)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 16, 16, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 512, (16, 12), generator=g)
    loss_of, precision = LOSSES[loss], Precision.build("fp32", CPU)

    plain = loss_of(*model(images, tokens), model.logit_scale(), model.bias)
    plain.backward()
    expected = gradients(model)
    image, text, cached = cached_gradient_step(model, images, tokens, 4, loss_of,
                                               model.logit_scale(), model.bias, precision)
    got = gradients(model)

    assert cached.item() == pytest.approx(plain.item(), rel=1e-13)
    assert not image.requires_grad and image.shape == text.shape == (16, 16)
    assert set(got) == set(expected) and ("log_scale" in got) and ("bias" in got) == ("sigmoid" in loss)
    assert not any(n.startswith("image.") for n in got) or not lock_image
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-9, atol=1e-10, msg=name)


# --- precision --------------------------------------------------------------------------------


def test_under_bf16_the_towers_run_in_bf16_and_the_loss_and_its_tiles_in_float32(tmp_path):
    cfg = config(train={"precision": "bf16"}, loss={"kind": "sigmoid", "chunk_size": 8})
    trainer = Trainer.build(as_trial(cfg), Ranks(), CPU, tmp_path)
    batch = trainer.dataset.train_batch(1, 32)
    images = normalize(batch.images, trainer.dataset.mean, trainer.dataset.std)
    matmuls: list[torch.dtype] = []

    class Matmuls(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                matmuls.append(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    scale = trainer.model.logit_scale()
    with trainer.precision.autocast(), Matmuls():
        trainer.forward(images, trainer.tokenizer(batch.captions))
    towers, matmuls[:] = list(matmuls), []
    with Matmuls():
        image, text, loss = trainer.forward_backward(1, images, trainer.tokenizer(batch.captions),
                                                     scale, None)
    assert set(towers) == {torch.bfloat16}
    assert image.dtype == text.dtype == loss.dtype == torch.float32
    # The loss's 16 tiles of 8×8 logits (forward, and both gradients in backward) are float32.
    assert matmuls.count(torch.float32) >= 16 and torch.float32 in matmuls[len(towers):]


def test_fp32_and_tf32_leave_the_towers_in_float32_on_a_cpu():
    for mode in ("fp32", "tf32"):
        precision = Precision.build(mode, CPU)
        assert precision.dtype is None and precision.scaler is None
        with precision.autocast():
            assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="train.precision='fp8': use fp32, tf32, bf16 or fp16"):
        Precision.build("fp8", CPU)


def test_an_fp16_overflow_skips_the_step_and_halves_the_scale_but_never_halts_the_trial(tmp_path):
    trainer = Trainer.build(as_trial(config(train={"precision": "fp16"})), Ranks(), CPU, tmp_path)
    # A scale of 2^40 makes the fp16 backward overflow for certain.
    trainer.precision.load_state_dict({"scale": 2.0**40, "growth_factor": 2.0, "backoff_factor": 0.5,
                                       "growth_interval": 2000, "_growth_tracker": 0})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    _, metrics = trainer.step(1)
    assert bool(metrics["grad_overflow"]) and not math.isfinite(metrics["grad_norm"].item())
    assert math.isfinite(metrics["loss"].item())
    for name, param in trainer.model.named_parameters():  # the optimizer skipped the step
        assert torch.equal(param, before[name]), name
    assert trainer.precision.state_dict()["scale"] == 2.0**39
    assert not trainer.gate.halted.item()
    assert trainer.optimizer.state[trainer.params[0]]["step"].item() == 0

    row = {"loss": metrics["loss"].item(), "grad_norm": math.inf, "grad_overflow": True}
    assert first_bad([row], OverflowRun()) is None
    assert first_bad([{**row, "loss": math.nan}], OverflowRun()) == 0  # a NaN loss still ends it
    assert first_bad([{"loss": 1.0, "grad_norm": math.inf}], OverflowRun()) == 0  # as in fp32


def test_overflows_that_never_end_are_divergence_after_64_steps_in_a_row():
    overflow = {"loss": 1.0, "grad_norm": math.nan, "grad_overflow": True}
    clean = {"loss": 1.0, "grad_norm": 1.0, "grad_overflow": False}
    run = OverflowRun()
    # Counted across flushes; a clean step starts the count again.
    assert first_bad([overflow] * 40 + [clean] + [overflow] * 30, run) is None
    assert first_bad([overflow] * 40, run) == 33 and MAX_OVERFLOW_RUN == 64  # 30 + 34


def naive_finite_spikes(series: list[float], threshold: float, window: int) -> list[float | None]:
    """Ratios to statistics.median of the finite values among the previous `window` values, None
    while fewer than window // 2 of those are finite, or for a non-finite value."""
    out = []
    for i, value in enumerate(series):
        past = [v for v in series[max(0, i - window):i] if math.isfinite(v)]
        ok = len(past) >= max(1, window // 2) and math.isfinite(value)
        median = sorted(past)[(len(past) - 1) // 2] / 2 + sorted(past)[len(past) // 2] / 2 if past else 0
        out.append(value / median if ok and median > 0 else None)
    return out


values = st.one_of(st.floats(0.1, 50.0), st.sampled_from([math.inf, math.nan]))


@settings(max_examples=60, deadline=None)
@given(st.lists(values, max_size=40), st.integers(3, 8), st.integers(0, 40))
def test_with_skip_non_finite_the_running_median_is_over_the_finite_values_alone(series, window, cut):
    detector, batch = (SpikeDetector(2.0, window, skip_non_finite=True) for _ in range(2))
    ratios = [detector.update(torch.tensor(v, dtype=torch.float64))[1].item() for v in series]
    at_once = (batch.update_many(torch.tensor(series[:cut], dtype=torch.float64))[1].tolist()
               + batch.update_many(torch.tensor(series[cut:], dtype=torch.float64))[1].tolist())
    expected = [math.nan if r is None else r for r in naive_finite_spikes(series, 2.0, window)]
    for got in (ratios, at_once):
        assert got == pytest.approx(expected, rel=1e-12, nan_ok=True)


# --- throughput figures -----------------------------------------------------------------------


def counted_forward_flops(spec: ModelSpec, image_size: int, tower: str) -> int:
    """Per-sample forward FLOPs of one tower by torch's FlopCounterMode on the meta device: the
    count at batch 2 minus at batch 1, so batch-independent work (MAP's latent query) cancels."""
    with torch.device("meta"):
        model = TwoTower(spec, image_size, 10.0, None, True, 100.0)
    counts = []
    for batch in (1, 2):
        with torch.device("meta"), FlopCounterMode(display=False) as counter:
            if tower == "image":
                model.image(torch.empty(batch, 3, image_size, image_size))
            else:
                model.text(torch.ones(batch, spec.context_length, dtype=torch.long))
        counts.append(counter.get_total_flops())
    return counts[1] - counts[0]


@pytest.mark.parametrize("spec", [
    {"width": 32, "depth": 1, "heads": 2, "embed_dim": 32},
    {"preset": "ViT-B-16"},
    {"preset": "ViT-B-16-SigLIP"},
], ids=["tiny", "ViT-B-16", "ViT-B-16-SigLIP"])
def test_the_tower_flop_formulas_count_what_torchs_flop_counter_counts(spec):
    model = ModelSpec(**spec)
    size = 224 if "preset" in spec else 32
    assert image_forward_flops(model, size) == counted_forward_flops(model, size, "image")
    assert text_forward_flops(model) == counted_forward_flops(model, size, "text")


def test_a_vit_b_16_step_costs_three_forwards_of_each_tower_plus_the_loss():
    cfg = TrialConfig.model_validate({"model": {"preset": "ViT-B-16"}, "data": {"image_size": 224},
                                      "train": {"batch_size": 1024}})
    image, text = image_forward_flops(cfg.model, 224), text_forward_flops(cfg.model)
    # OpenAI CLIP ViT-B/16 at 224 px: 17.6 image GMACs and 3.0 text GMACs per sample (open_clip's
    # model profile), i.e. 35.1 and 6.0 GFLOPs.
    assert image / 1e9 == pytest.approx(35.1, abs=0.1) and text / 1e9 == pytest.approx(5.96, abs=0.05)
    assert training_flops_per_sample(cfg) == 3 * (image + text) + 3 * 2 * 1024 * 512
    locked = cfg.model_copy(update={"model": cfg.model.model_copy(update={"lock_image": True})})
    assert training_flops_per_sample(cfg) - training_flops_per_sample(locked) == 2 * image


def test_the_peak_table_knows_each_gpu_by_its_name_and_a_cpu_only_by_the_users_figure():
    assert table_peak_flops("NVIDIA H200", "bf16") == 989.4e12
    assert table_peak_flops("NVIDIA H100 80GB HBM3", "tf32") == 494.7e12
    assert table_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert table_peak_flops("NVIDIA A10", "bf16") == 125e12
    assert table_peak_flops("NVIDIA A10G", "bf16") is None  # not an A10; unknown
    assert table_peak_flops("NVIDIA L40S", "bf16") == 362e12
    assert table_peak_flops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 on a V100
    assert peak_flops(CPU, "fp32", None) is None
    assert peak_flops(CPU, "bf16", 2.5) == 2.5e12
    assert DeviceClock(CPU).stop() is None


def test_the_throughput_figures_give_mfu_from_the_wall_clock_and_each_windows_peaks():
    cfg = config()
    trial = as_trial(cfg)
    metrics = pl.DataFrame({
        "step": [1, 2, 3, 4], "loss": [2.0] * 4, "step_time_s": [0.5] * 4,
        "device_step_time_s": [None, 0.2, 0.3, 0.4], "peak_memory_gib": [1.0, 1.0, 3.0, 2.5],
    })
    summary = summarize(metrics, pl.DataFrame(), trial, False, 2.0, 40)
    assert summary["samples_per_s"] == 64.0  # 32 pairs every 0.5 s
    figures = throughput_figures(summary, metrics, trial, peak_flops=1e9, devices=2)
    flops = training_flops_per_sample(cfg)
    assert figures == pytest.approx({
        "flops_per_sample": flops, "mfu": flops * 64 / 2 / 1e9, "peak_tflops": 1e-3,
        "device_step_time_s": 0.3, "peak_memory_gib": 3.0})
    on_cpu = throughput_figures(summary, metrics.drop("device_step_time_s"), trial, None, 1)
    assert on_cpu["mfu"] is None and on_cpu["peak_tflops"] is None
    assert on_cpu["device_step_time_s"] is None and on_cpu["peak_memory_gib"] == 3.0


# --- host syncs -------------------------------------------------------------------------------

# Functions that build a batch on the host from Python values by design (their reads of host
# tensors are no device syncs): the data, the tokenizer, the caption bookkeeping.
HOST_DATA = {"train_batch", "train_captions", "dup_caption_rate", "caption_groups", "__call__"}
HOST_FILES = ("data.py", "realdata.py", "tokenizers.py", "losses.py")
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
         torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}


class DeviceReads(TorchFunctionMode):
    """Counts the calls that make the host wait for the device on a GPU: reading a value
    (.item(), .tolist(), bool(), float(), int(), indexing with a tensor, .numpy(), .cpu()),
    anywhere; and, in scalestudy's own code, a blocking .to(device) and a tensor made from Python
    values straight on a device (on a GPU both are blocking copies; on this CPU a device is the
    host, so a same-device .to() inside torch, a no-op, cannot be told apart and is not counted).
    The host's own batch building is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1).f_code.co_filename
        ours = "/scalestudy/" in caller.replace("\\", "/")
        blocking_to = (func is torch.Tensor.to and not kwargs.get("non_blocking", False)
                       and any(isinstance(a, (str, torch.device)) for a in (*args[1:], kwargs.get("device"))))
        made_on_device = func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None
        if (func in READS or (ours and (blocking_to or made_on_device))) and not self.from_host_data():
            line = sys._getframe(1).f_lineno
            self.calls.append(f"{func.__name__} at {caller}:{line}")
        return func(*args, **kwargs)

    @staticmethod
    def from_host_data() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            code = frame.f_code
            if code.co_name in HOST_DATA and code.co_filename.endswith(HOST_FILES):
                return True
            frame = frame.f_back
        return False


@pytest.mark.train
@pytest.mark.parametrize("options", [
    {},
    {"train": {"precision": "fp16", "micro_batch_size": 8}, "optim": {"grad_clip": 1.0},
     "loss": {"kind": "softmax", "duplicates": "masked"}},
], ids=["default", "fp16-micro-batched-clipped-duplicates"])
def test_a_whole_trainer_step_with_every_monitor_on_reads_nothing_back_but_the_flush(tmp_path, options):
    trainer = Trainer.build(as_trial(config(**options)), Ranks(), CPU, tmp_path)
    assert trainer.updates is not None and trainer.update_rms is not None  # monitor.extended
    rows = trainer.rows()
    trainer.step(1)  # the first step builds the optimizer's state
    reads, flushes = DeviceReads(), 0
    with reads:
        for step in range(2, 42):
            rows.append(*trainer.step(step))
            if step % 10 == 1:
                flushes += 1
                rows.drain()
    # One copy of every pending row per flush, and nothing in 40 steps: under 2 per step.
    assert len(reads.calls) == flushes == 4, reads.calls


# --- whole trials -----------------------------------------------------------------------------


@pytest.mark.train
def test_fast_paths_train_the_same_trial_as_the_plain_step(tmp_path):
    plain = train_trial(tmp_path, "plain", config())
    same = {
        "micro-batched": config(train={"micro_batch_size": 8}),
        "checkpointed": config(model={"grad_checkpointing": True}),
    }
    runs = {name: train_trial(tmp_path, name, cfg) for name, cfg in same.items()}
    # Gradient checkpointing recomputes the same ops in the same order: bit for bit.
    assert runs["checkpointed"]["loss"].equals(plain["loss"])
    # Gradient caching sums the same gradient in another order (measured over 24 steps: 2.0e-7
    # relative in the loss, 3.7e-7 in the grad norm).
    assert relative_gap(runs["micro-batched"]["loss"], plain["loss"]) < 1e-5
    assert relative_gap(runs["micro-batched"]["grad_norm"], plain["grad_norm"]) < 1e-5


@pytest.mark.train
def test_a_compiled_trial_trains_the_plain_trials_model(tmp_path):
    plain = train_trial(tmp_path, "plain", config())
    compiled = train_trial(tmp_path, "compiled", config(train={"compile": True}))
    # Inductor fuses and reorders float32 arithmetic (measured over 24 steps: 2.0e-7 relative in
    # the loss, 6.5e-7 in the grad norm).
    assert relative_gap(compiled["loss"], plain["loss"]) < 1e-5
    assert relative_gap(compiled["grad_norm"], plain["grad_norm"]) < 1e-5


@pytest.mark.train
def test_a_bf16_trial_stays_within_bf16_rounding_of_the_fp32_trial(tmp_path):
    plain = train_trial(tmp_path, "plain", config())
    bf16 = train_trial(tmp_path, "bf16", config(train={"precision": "bf16"}))
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per op). Measured over 24 steps:
    # at most 1.1e-3 relative loss difference; the first loss (same weights and batch) 3.0e-4.
    assert relative_gap(bf16["loss"].head(1), plain["loss"].head(1)) < 1e-3
    assert relative_gap(bf16["loss"], plain["loss"]) < 1e-2
    assert bf16["loss"].tail(4).mean() < bf16["loss"].head(4).mean() - 1  # and it learns


@pytest.mark.train
def test_an_fp16_trial_skips_its_overflow_steps_and_trains_to_the_end(tmp_path):
    plain = train_trial(tmp_path, "plain", config())
    fp16 = train_trial(tmp_path, "fp16", config(train={"precision": "fp16"}))
    overflow = fp16["grad_overflow"].to_list()
    # GradScaler starts at 2^16, too high for these gradients: the first steps overflow, the
    # scale halves each time, and training goes on.
    assert overflow[0] and not any(overflow[-10:])
    assert fp16.filter(pl.col("grad_overflow"))["grad_norm"].is_infinite().all()
    assert relative_gap(fp16["loss"].head(1), plain["loss"].head(1)) < 1e-3  # measured 2.3e-5
    assert fp16["loss"].tail(4).mean() < fp16["loss"].head(4).mean() - 1


@pytest.mark.train
def test_micro_batching_composes_with_data_parallel_ranks(tmp_path):
    plain = train_trial(tmp_path, "plain", config(resources={"cpus": 2}))
    ranks = train_trial(tmp_path, "ranks", config(train={"micro_batch_size": 4},
                                                  resources={"workers": 2, "cpus": 2}))
    # Each rank micro-batches its 16 rows by 4; the gloo all-reduce and the distributed loss sum
    # in another order than one process (measured over 24 steps: 2.0e-7 relative in the loss,
    # 7.2e-7 in the grad norm).
    assert relative_gap(ranks["loss"], plain["loss"]) < 1e-5
    assert relative_gap(ranks["grad_norm"], plain["grad_norm"]) < 1e-5


class StopAt:
    """A sink that asks the trial to stop once it has logged `step`."""

    def __init__(self, step: int, stop: threading.Event) -> None:
        self.step, self.stop = step, stop

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if step >= self.step:
            self.stop.set()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.train
@pytest.mark.parametrize("resumed_with", [{"cpus": 2}, {"workers": 2, "cpus": 2}],
                         ids=["cpus-1-to-2", "workers-1-to-2"])
def test_a_trial_checkpointed_under_one_mapping_resumes_under_another(tmp_path, resumed_with):
    cfg = config(train={"checkpoint_every": 5})
    straight = train_trial(tmp_path, "straight", cfg)

    ts = RunStore(tmp_path / "moved").add_trial(as_trial(cfg))
    stop = threading.Event()
    with pytest.raises(Preempted):
        loop.train(TrialStore(ts.path), ts.read_trial(), stop, Ranks(), CPU, [StopAt(10, stop)])
    stopped_at = ts.load_checkpoint()["step"]
    assert 10 <= stopped_at < STEPS
    moved = cfg.model_copy(update={"resources": cfg.resources.model_copy(update=resumed_with)})
    ts.write_trial(as_trial(moved))
    run_trial(str(ts.path))
    assert ts.state().status == "done"
    resumed = ts.metrics()
    assert resumed["step"].to_list() == list(range(1, STEPS + 1))
    before = pl.col("step") <= stopped_at
    compare = pl.exclude("step_time_s", "peak_memory_gib", "device_step_time_s")
    assert resumed.filter(before).select(compare).equals(straight.filter(before).select(compare))
    # After the move: more threads or ranks sum in another order (data-parallel: 1e-4 relative).
    assert relative_gap(resumed["loss"], straight["loss"]) < 1e-4
    assert relative_gap(resumed["grad_norm"], straight["grad_norm"]) < 1e-4
