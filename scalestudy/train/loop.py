"""One trial, top to bottom: set up, resume if a checkpoint exists, train, evaluate, summarise.

Every executor runs this same function (through `python -m scalestudy.trial TRIAL_DIR` or
directly), so a trial behaves the same everywhere. Batch arithmetic: step s (1-based) trains on
global batch s of the seed's stream (examples_seen = s × batch_size) and the run ends at
derived.steps = ceil(train.examples_seen / batch_size). With W data-parallel ranks each rank takes
rows [r·B/W, (r+1)·B/W) of that same global batch and the loss is computed over all B pairs, so
the trial trains the same model as on one process.

The parts: `Trainer.build` sets up (model, optimizer, monitors, data), `Trainer.step` is one
optimisation step that leaves its metrics on the device, `train` is the thin loop that flushes them
to the sinks (scalestudy.sinks) at a cadence, evaluates and checkpoints when due, and stops on a
signal or at the first non-finite step.
"""

from __future__ import annotations

import functools
import hashlib
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from scalestudy import allocator
from scalestudy.errors import DivergedError, Preempted
from scalestudy.losses import caption_groups, sigmoid_loss, softmax_loss
from scalestudy.sinks import EVAL, SUMMARY, MetricsSink, Sinks
from scalestudy.sinks.trackers import tracker_sinks
from scalestudy.spec import TrialConfig
from scalestudy.store import Status, Trial, TrialStore
from scalestudy.store.sink import StoreSink
from scalestudy.train import lit
from scalestudy.train import ranks as rk
from scalestudy.train.data import Batch, dup_caption_rate, normalize
from scalestudy.train.datasets import make_dataset
from scalestudy.train.loader import train_batches
from scalestudy.train.evaluate import evaluate
from scalestudy.train.gradcache import cached_gradient_step
from scalestudy.train.models import TwoTower
from scalestudy.train.monitors import GradNorms, SpikeDetector, UpdateNorm, UpdateRMS, logit_means
from scalestudy.train.optim import NonFiniteGate, lr_at, make_optimizer
from scalestudy.train.precision import OverflowRun, Precision
from scalestudy.train.recorder import DeviceRows, first_bad
from scalestudy.train.throughput import DeviceClock, peak_flops, peak_memory_bytes
from scalestudy.train.tokenizers import Tokenizer, make_tokenizer
from scalestudy.train.summary import summarize, throughput_figures

# A single-process trial brings its metrics to the host (and so to status and the dashboard) at
# least this often.
FLUSH_EVERY_S = 2.0
# Data-parallel ranks must take every collective decision at the same step, so they flush, and
# agree on stop signals, every this many steps (a time-based cadence would differ between ranks).
RANKS_CHECK_EVERY = 16


def is_due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (eval, checkpoint) runs after `step`; always after the last."""
    return step == total or (every > 0 and step % every == 0)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Turn SIGTERM/SIGINT into a flag the loop checks between steps (only in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def compute_loss(
    trial: Trial, step: int, image_features: torch.Tensor, text_features: torch.Tensor,
    scale: torch.Tensor, bias: torch.Tensor | None, distributed: bool,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """The configured loss over the global batch (the distributed forms exchange features).

    Negative masking draws from a generator seeded by (train.seed, step), so a resumed trial masks
    exactly the pairs the uninterrupted one would have. `groups` numbers the global batch's rows
    by caption (loss.duplicates: rows with the same caption are not each other's negatives).
    """
    options = {"groups": groups, "duplicates": trial.config.loss.duplicates}
    spec = trial.config.loss
    if distributed:  # same signatures as the single-process losses, so one call per kind
        from scalestudy.distributed_losses import distributed_sigmoid_loss as sigmoid
        from scalestudy.distributed_losses import distributed_softmax_loss as softmax
    else:
        sigmoid, softmax = sigmoid_loss, softmax_loss
    if spec.kind == "softmax":
        return softmax(image_features, text_features, scale, spec.chunk_size, **options)
    masking = torch.Generator().manual_seed(trial.config.train.seed * 1_000_003 + step)
    return sigmoid(image_features, text_features, scale, bias, spec.chunk_size,
                   negative_weight=spec.negative_weight, negative_mask_ratio=spec.negative_mask_ratio,
                   generator=masking, **options)


def run_trial(trial_dir: str, backend: str = "local", stop: threading.Event | None = None) -> dict[str, Any] | None:
    """Train the trial in `trial_dir` to the end (or until `stop` is set); returns its summary.

    Raises Preempted when stopped early (a checkpoint is saved first); any other exception marks
    the trial failed with its traceback and propagates. Data-parallel trials start or join their
    ranks here (see scalestudy.train.ranks); only rank 0 returns the summary.
    """
    store = TrialStore(trial_dir)
    trial = store.read_trial()
    stop = stop or threading.Event()
    scheduled = rk.from_environment()
    world = trial.config.resources.world_size
    if scheduled is not None and scheduled.world != world:
        raise RuntimeError(
            f"the scheduler started {scheduled.world} ranks but the trial asks for {world} "
            "(resources.gpus or resources.workers)"
        )
    ranks = scheduled or rk.Ranks()
    if ranks.leader:
        store.start_attempt(backend, allocator.in_use())
    try:
        with stop_on_signals(stop):
            if scheduled is None and world > 1:
                body = functools.partial(_rank_entry, trial_dir)
                with rk.local_children(world, body) as init_method:
                    return _train(store, trial, stop, rk.Ranks(0, world, 0, world, spawned=True),
                                  init_method)
            return _train(store, trial, stop, ranks, "env://")
    except Preempted:
        if ranks.leader:
            store.update_state(status=Status.PREEMPTED)
        raise
    except Exception:
        if ranks.leader:
            store.update_state(status=Status.FAILED, error=traceback.format_exc(),
                               finished_at=time.time())
        raise


def _rank_entry(trial_dir: str, ranks: rk.Ranks, init_method: str) -> None:
    """A locally spawned rank ≥ 1: same loop, no store writes."""
    store = TrialStore(trial_dir)
    stop = threading.Event()
    try:
        with stop_on_signals(stop):
            _train(store, store.read_trial(), stop, ranks, init_method)
    except Preempted:
        pass


def _train(
    store: TrialStore, trial: Trial, stop: threading.Event, ranks: rk.Ranks, init_method: str,
) -> dict[str, Any] | None:
    cfg = trial.config
    torch.set_num_threads(max(1, cfg.resources.cpus // ranks.world))
    device = rk.device_for(cfg.resources.gpus, cfg.train.device, ranks)
    if device.type == "cuda" and 0 < cfg.resources.gpus < 1:
        # A share of a GPU: the trial's allocations beyond its share fail in the trial itself,
        # instead of starving the trials it shares the GPU with (the caching allocator only).
        torch.cuda.set_per_process_memory_fraction(cfg.resources.gpus, device)
    if ranks.world > 1:
        rk.join(ranks, device, init_method)
    try:
        summary = train(store, trial, stop, ranks, device)
        if ranks.world > 1:
            # Every rank is through its last collective before any of them tears the group down
            # (rank 0 writes the summary while the others would already be leaving).
            dist.barrier()
        return summary
    finally:
        if ranks.world > 1:
            dist.destroy_process_group()


@dataclass
class Trainer:
    """Everything one trial trains with, and its step."""

    trial: Trial
    ranks: rk.Ranks
    device: torch.device
    model: TwoTower
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    grad_norms: GradNorms
    spikes: SpikeDetector
    loss_spikes: SpikeDetector
    # Sticky on the device: from the first non-finite step on, every optimizer update is skipped
    # (`optimizer.found_inf`) without a host sync.
    gate: NonFiniteGate
    updates: UpdateNorm | None  # the extended monitors (monitor.extended)
    update_rms: UpdateRMS | None
    tokenizer: Tokenizer
    dataset: Any
    local: slice
    precision: Precision
    micro_batch: int | None  # rows per pass with gradient caching; None: the rank's rows at once
    # LiT: the locked image tower's features of the training pool, looked up by Batch.index
    # instead of running the tower (scalestudy.train.lit); None: the step runs the tower.
    features: torch.Tensor | None = None

    @classmethod
    def build(cls, trial: Trial, ranks: rk.Ranks, device: torch.device, run_dir: Path) -> Trainer:
        cfg, derived = trial.config, trial.derived
        precision = Precision.build(cfg.train.precision, device)
        torch.manual_seed(cfg.train.seed)  # the same init on every rank
        model = TwoTower(cfg.model, cfg.data.image_size, derived.temperature_init, derived.bias_init,
                         cfg.loss.learn_temperature, cfg.loss.max_temperature).to(device)
        # LiT (scalestudy.train.lit): model.image_init's tower, and a locked tower's cached features.
        lit.init_image_tower(model, cfg.model, cfg.data.image_size)
        dataset = make_dataset(cfg.data, cfg.train.seed, run_dir / "cache")  # real data: one index per run
        features = lit.cached_image_features(model, cfg, dataset, run_dir, device, ranks)
        core = model if features is None else lit.LockedImageForward(model, features)
        # DDP averages gradients over ranks; the distributed losses are written for that convention.
        forward: torch.nn.Module = DistributedDataParallel(core) if ranks.world > 1 else core
        if cfg.train.compile:
            forward = torch.compile(forward)  # type: ignore[assignment]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(model, cfg.optim, derived.lr)
        monitor, extended, batch = cfg.monitor, cfg.monitor.extended, cfg.train.batch_size
        return cls(
            trial=trial, ranks=ranks, device=device, model=model, forward=forward,
            optimizer=optimizer, params=params, grad_norms=GradNorms(model),
            # fp16 overflow steps have an inf grad norm that must not enter the running median.
            spikes=SpikeDetector(monitor.spike_threshold, monitor.spike_window, device,
                                 skip_non_finite=precision.scaler is not None),
            loss_spikes=SpikeDetector(monitor.loss_spike_threshold, monitor.loss_spike_window, device,
                                      mads=monitor.loss_spike_mads
                                      if monitor.loss_spike_rule == "mad" else None),
            gate=NonFiniteGate(device),
            updates=UpdateNorm(params) if extended else None,
            update_rms=UpdateRMS(model, optimizer) if extended else None,
            tokenizer=trial_tokenizer(cfg, run_dir),
            dataset=dataset,
            local=slice(ranks.rank * batch // ranks.world, (ranks.rank + 1) * batch // ranks.world),
            precision=precision,
            micro_batch=micro_batch(cfg.train.micro_batch_size, batch // ranks.world),
            features=features,
        )

    def rows(self) -> DeviceRows:
        return DeviceRows(self.update_rms.names if self.update_rms else ())

    def batches(self, start: int) -> Iterator[tuple[int, Batch]]:
        """This rank's rows of the global batches of steps start + 1 … end, built in
        data.workers worker processes (or here), pinned for a CUDA copy."""
        cfg = self.trial.config
        return train_batches(self.dataset, cfg.train.batch_size, self.local, start,
                             self.trial.derived.steps, workers=cfg.data.workers,
                             pin_memory=self.device.type == "cuda",
                             timeout_s=cfg.data.worker_timeout_s, images=self.features is None)

    def step(self, step: int, batch: Batch | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """One optimisation step on this rank's rows `batch` of global batch `step` (built here when
        not given, as the loader would); returns its host values and its device metrics (no host
        sync)."""
        cfg = self.trial.config
        model, optimizer = self.model, self.optimizer
        lr = lr_at(step, self.trial.derived, cfg.optim.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # optim.scalar_lr's group: its own LR
        cached = self.features is not None  # LiT: rows of the feature table, not images
        if batch is None:
            batch = self.dataset.train_batch(step, cfg.train.batch_size, self.local, images=not cached)
        # uint8 over the wire (a quarter of float32's bytes), normalised on the device.
        images = (batch.index.to(self.device, non_blocking=True) if cached else
                  normalize(batch.images.to(self.device, non_blocking=True), self.dataset.mean,
                            self.dataset.std))
        tokens = self.tokenizer(batch.captions).to(self.device, non_blocking=True)
        # Rows of the global batch whose caption repeats in it: false negatives for the loss.
        captions = (batch.captions if self.ranks.world == 1
                    else self.dataset.train_captions(step, cfg.train.batch_size))
        # Built on the host, copied without waiting (made on a GPU it would be a blocking copy).
        groups = (caption_groups(captions).to(self.device, non_blocking=True)
                  if cfg.loss.duplicates != "negative" else None)

        scale = model.logit_scale()
        optimizer.zero_grad(set_to_none=True)
        image_features, text_features, loss = self.forward_backward(step, images, tokens, scale,
                                                                    groups)
        self.precision.unscale(optimizer)  # fp16: every reader below sees true gradients
        # Norms before any clipping: the spike record must show what the optimiser was handed.
        # After backward the gradients are already averaged over ranks, so every rank agrees.
        norms = self.grad_norms()
        loss_now = loss.detach()
        is_spike, ratio = self.spikes.update(norms["grad_norm"])
        is_loss_spike, loss_ratio = self.loss_spikes.update(loss_now)
        metrics = {"loss": loss_now, "grad_norm": norms["grad_norm"], "temperature": scale.detach(),
                   "is_spike": is_spike, "spike_ratio": ratio, "is_loss_spike": is_loss_spike,
                   "loss_spike_ratio": loss_ratio}
        if self.precision.scaler is None:
            optimizer.found_inf = self.gate.update(loss_now, norms["grad_norm"])  # type: ignore[attr-defined]
        else:  # an overflow skips this step only; a non-finite loss halts the trial
            overflow = self.precision.overflowed(norms["grad_norm"])
            optimizer.found_inf = torch.maximum(self.gate.update(loss_now), overflow.float())  # type: ignore[attr-defined]
            metrics["grad_overflow"] = overflow
        if model.bias is not None:
            metrics["bias"] = model.bias.detach().clone()  # clone: the step updates it in place
        if self.updates is not None:
            # With several ranks these logit means cover this rank's block of the batch.
            positive, negative = logit_means(image_features, text_features, scale, model.bias)
            metrics.update(grad_norm_image=norms["grad_norm_image"],
                           grad_norm_text=norms["grad_norm_text"],
                           logit_pos_mean=positive, logit_neg_mean=negative)
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip, foreach=True)
        if self.updates is not None:
            self.updates.snapshot()
        optimizer.step()
        self.precision.update()
        if self.updates is not None and self.update_rms is not None:
            metrics.update(self.updates.measure())
            metrics.update(self.update_rms.read())
        host: dict[str, Any] = {"step": step, "examples_seen": step * cfg.train.batch_size, "lr": lr,
                                "dup_caption_rate": dup_caption_rate(captions)}
        if model.bias is None:
            host["bias"] = None
        return host, metrics

    def forward_backward(
        self, step: int, images: torch.Tensor, tokens: torch.Tensor, scale: torch.Tensor,
        groups: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's features and the loss, with the gradients accumulated in the parameters:
        in one pass, or `micro_batch` rows at a time by gradient caching (scalestudy.train.gradcache).
        The towers run under the trial's autocast; the loss always in float32, outside it."""
        def loss_of(image_features: torch.Tensor, text_features: torch.Tensor,
                    scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return compute_loss(self.trial, step, image_features, text_features, scale, bias,
                                self.ranks.world > 1, groups)

        if self.micro_batch is not None:
            return cached_gradient_step(self.forward, images, tokens, self.micro_batch, loss_of,
                                        scale, self.model.bias, self.precision)
        with self.precision.autocast():
            image_features, text_features = self.forward(images, tokens)
        loss = loss_of(image_features, text_features, scale, self.model.bias)
        self.precision.backward(loss)
        return image_features, text_features, loss

    def evaluate(self, step: int) -> dict[str, Any]:
        results = evaluate(self.model, self.dataset, self.tokenizer, self.device)
        return {f"{EVAL}{k}": v for k, v in
                {"examples_seen": step * self.trial.config.train.batch_size, **results}.items()}

    # Checkpoints: everything a resumed trial needs to continue exactly where this one is.
    def state_dict(self, step: int, wall_s: float) -> dict[str, Any]:
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"step": step, "wall_s": wall_s, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "spikes": self.spikes.state_dict(),
                "loss_spikes": self.loss_spikes.state_dict(), "rng": rng,
                "precision": self.precision.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint loaded to the CPU: model and optimizer state move to this attempt's
        device (Optimizer.load_state_dict casts state to its parameters' devices)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.spikes.load_state_dict(state["spikes"])
        self.loss_spikes.load_state_dict(state["loss_spikes"])
        self.precision.load_state_dict(state.get("precision", {}))  # absent before train.precision
        rng = state["rng"]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])


def micro_batch(micro_batch_size: int | None, local_rows: int) -> int | None:
    """Rows per gradient-caching pass on a rank with `local_rows` rows, or None for one pass (the
    spec has checked that a smaller micro-batch divides the rows)."""
    if micro_batch_size is None or micro_batch_size >= local_rows:
        return None
    return micro_batch_size


# A BPE tokenizer learns its merges from this many training captions (SigLIP trained its
# SentencePiece model on its own data the same way; a sample suffices for a vocabulary).
BPE_SAMPLE_BATCHES, BPE_SAMPLE_BATCH = 200, 256


def trial_tokenizer(cfg: TrialConfig, run_dir: Path) -> Tokenizer:
    """model.tokenizer's tokenizer. A bpe one is trained once per dataset and vocabulary size and
    kept in RUN_DIR/tokenizers/, so every trial on that data, every rank and every resume reads
    the same file; its sample is the captions of a fixed stream (seed 0), not the trial's."""
    spec = cfg.model
    if spec.tokenizer != "bpe":
        return make_tokenizer(spec)
    key = hashlib.sha256(f"{cfg.data.model_dump_json()}|{spec.vocab_size}".encode()).hexdigest()[:12]

    def captions() -> Iterator[str]:
        sample = make_dataset(cfg.data, seed=0, cache=run_dir / "cache")
        for step in range(1, BPE_SAMPLE_BATCHES + 1):
            yield from sample.train_captions(step, BPE_SAMPLE_BATCH)

    return make_tokenizer(spec, run_dir / "tokenizers" / f"bpe-{key}.json", captions)


def train(store: TrialStore, trial: Trial, stop: threading.Event, ranks: rk.Ranks,
          device: torch.device, extra_sinks: list[MetricsSink] | None = None) -> dict[str, Any] | None:
    """The loop: steps, flushes, evaluations, checkpoints; a summary at the end (rank 0)."""
    cfg, derived = trial.config, trial.derived
    attempt_start = time.time()
    trainer = Trainer.build(trial, ranks, device, store.path.parent.parent)
    leader, distributed = ranks.leader, ranks.world > 1
    sinks = Sinks([StoreSink(store, derived.steps), *(extra_sinks or []),
                   *tracker_sinks(trial, store.path)] if leader else [])

    start, wall_before = 0, 0.0
    checkpoint = store.load_checkpoint()
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
        start, wall_before = int(checkpoint["step"]), float(checkpoint["wall_s"])
        if leader:
            store.truncate_after(start)
    elif leader:
        store.reset()

    def elapsed() -> float:
        return wall_before + time.time() - attempt_start

    pending = trainer.rows()
    clock, overflows = DeviceClock(device), OverflowRun()
    last_flush = time.time()

    def flush() -> int | None:
        """Rows to the sinks (up to a bad step); returns the step that diverged, if one did.

        Each row also gets its window's figures: the device's step time (CUDA events; the mean
        over the steps since the last flush) and the process's peak memory so far."""
        nonlocal last_flush
        rows = pending.drain()
        window_s = clock.stop()
        memory_gib = peak_memory_bytes(device) / 2**30
        for row in rows:
            row["device_step_time_s"] = None if window_s is None else window_s / len(rows)
            row["peak_memory_gib"] = memory_gib
        bad = first_bad(rows, overflows)
        diverged = None if bad is None else int(rows[bad]["step"])
        if bad is not None:
            rows = rows[:bad + 1]  # the trial stopped there; later steps changed nothing
        if leader:
            for row in rows:
                sinks.log(row.pop("step"), row)
            sinks.flush()
        last_flush = time.time()
        return diverged

    diverged_at: int | None = None
    tick = time.perf_counter()
    try:
        with closing(trainer.batches(start)) as batches:  # closing: the data workers end with it
            for step, batch in batches:
                clock.start()
                host, metrics = trainer.step(step, batch)
                now = time.perf_counter()
                host["step_time_s"], tick = now - tick, now
                pending.append(host, metrics)
                due_eval = is_due(step, cfg.train.eval_every, derived.steps)
                due_checkpoint = is_due(step, cfg.train.checkpoint_every, derived.steps)
                if distributed:
                    check = step % RANKS_CHECK_EVERY == 0 or due_eval or due_checkpoint
                    if check and rk.any_rank(stop.is_set(), device):
                        stop.set()
                else:
                    check = (due_eval or due_checkpoint or stop.is_set()
                             or time.time() - last_flush > FLUSH_EVERY_S)
                if not check:
                    continue
                diverged_at = flush()
                if diverged_at is not None:
                    break
                if due_eval and leader:
                    sinks.log(step, trainer.evaluate(step))
                if (due_checkpoint or stop.is_set()) and leader:
                    store.save_checkpoint(trainer.state_dict(step, elapsed()))
                if stop.is_set() and step < derived.steps:
                    raise Preempted(f"stopped at step {step}")
        if diverged_at is None:
            diverged_at = flush()
    except BaseException:
        sinks.close()
        raise
    if not leader:
        return None
    if diverged_at is not None:
        # The history up to the bad step is the finding; the model is the one from before it
        # (every update from the bad step on was skipped on the device).
        sinks.log(diverged_at, trainer.evaluate(diverged_at))
    error = (DivergedError(diverged_at, "non-finite loss or gradient norm")
             if diverged_at is not None else None)
    metrics = store.metrics()
    summary = summarize(metrics, store.evals(), trial, error is not None, elapsed(),
                        len(trainer.dataset.classes))
    summary.update(throughput_figures(
        summary, metrics, trial, peak_flops(device, cfg.train.precision, cfg.train.peak_tflops),
        ranks.world))
    sinks.log(summary["step"], {f"{SUMMARY}{k}": v for k, v in summary.items()})
    sinks.close()
    store.update_state(status=Status.DIVERGED if error else Status.DONE, finished_at=time.time(),
                       error=str(error) if error else None, step=summary["step"])
    return summary
