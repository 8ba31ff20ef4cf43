"""One trial, top to bottom: set up, resume if a checkpoint exists, train, evaluate, summarise.

Every executor runs this same function (through `python -m scalestudy.trial TRIAL_DIR` or
directly), so a trial behaves the same everywhere. Batch arithmetic: step s (1-based) trains on
global batch s of the seed's stream (examples_seen = s × batch_size) and the run ends at
derived.steps = ceil(train.examples_seen / batch_size). With W data-parallel ranks each rank takes
rows [r·B/W, (r+1)·B/W) of that same global batch and the loss is computed over all B pairs, so
the trial trains the same model as on one process.
"""

from __future__ import annotations

import functools
import math
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from scalestudy.errors import DivergedError
from scalestudy.expand import Trial
from scalestudy.losses import sigmoid_loss, softmax_loss
from scalestudy.store import TrialStore, atomic_write_json
from scalestudy.train import ranks as rk
from scalestudy.train.data import HashTokenizer, make_dataset
from scalestudy.train.evaluate import evaluate
from scalestudy.train.models import TwoTower
from scalestudy.train.monitors import SpikeDetector, UpdateNorm, adam_staleness, logit_means, norm
from scalestudy.train.optim import lr_at, make_optimizer
from scalestudy.train.summary import summarize

# Metric rows reach disk at least this often, so status and the dashboard see live progress.
FLUSH_EVERY_S = 2.0


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: the trial checkpoints where it is and stops as `preempted`."""


def is_due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (eval, checkpoint) runs after `step`; always after the last."""
    return step == total or (every > 0 and step % every == 0)


def grad_norm(params: list[torch.nn.Parameter]) -> float:
    return norm([p.grad for p in params if p.grad is not None])


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
) -> torch.Tensor:
    """The configured loss over the global batch (the distributed forms exchange features).

    Negative masking draws from a generator seeded by (train.seed, step), so a resumed trial masks
    exactly the pairs the uninterrupted one would have.
    """
    spec = trial.config.loss
    if distributed:  # same signatures as the single-process losses, so one call per kind
        from scalestudy.distributed_losses import distributed_sigmoid_loss as sigmoid
        from scalestudy.distributed_losses import distributed_softmax_loss as softmax
    else:
        sigmoid, softmax = sigmoid_loss, softmax_loss
    if spec.kind == "softmax":
        return softmax(image_features, text_features, scale, spec.chunk_size)
    masking = torch.Generator().manual_seed(trial.config.train.seed * 1_000_003 + step)
    return sigmoid(image_features, text_features, scale, bias, spec.chunk_size,
                   negative_weight=spec.negative_weight, negative_mask_ratio=spec.negative_mask_ratio,
                   generator=masking)


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
        store.start_attempt(backend)
    try:
        with stop_on_signals(stop):
            if scheduled is None and world > 1:
                body = functools.partial(_rank_entry, trial_dir)
                with rk.local_children(world, body) as init_method:
                    return _train(store, trial, stop, rk.Ranks(0, world, 0), init_method)
            return _train(store, trial, stop, ranks, "env://")
    except Preempted:
        if ranks.leader:
            store.update_state(status="preempted")
        raise
    except Exception:
        if ranks.leader:
            store.update_state(status="failed", error=traceback.format_exc(),
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
    cfg, derived = trial.config, trial.derived
    torch.set_num_threads(max(1, cfg.resources.cpus // ranks.world))
    device = ranks.device(cfg.resources.gpus, cfg.train.device)
    distributed = ranks.world > 1
    if distributed:
        rk.join(ranks, device, init_method)
    try:
        return _loop(store, trial, stop, ranks, device)
    finally:
        if distributed:
            dist.destroy_process_group()


def _loop(
    store: TrialStore, trial: Trial, stop: threading.Event, ranks: rk.Ranks, device: torch.device,
) -> dict[str, Any] | None:
    cfg, derived = trial.config, trial.derived
    leader, distributed = ranks.leader, ranks.world > 1
    attempt_start = time.time()

    torch.manual_seed(cfg.train.seed)  # the same init on every rank
    model = TwoTower(
        cfg.model,
        cfg.data.image_size,
        derived.temperature_init,
        derived.bias_init,
        cfg.loss.learn_temperature,
        cfg.loss.max_temperature,
    ).to(device)
    # DDP averages gradients over ranks; the distributed losses are written for that convention.
    forward = DistributedDataParallel(model) if distributed else model
    params = [p for p in model.parameters() if p.requires_grad]
    tower_params = {
        name: [p for p in getattr(model, name).parameters() if p.requires_grad]
        for name in ("image", "text")
    }
    optimizer = make_optimizer(model, cfg.optim, derived.lr)
    spikes = SpikeDetector(cfg.monitor.spike_threshold, cfg.monitor.spike_window)
    loss_spikes = SpikeDetector(cfg.monitor.spike_threshold, cfg.monitor.spike_window)
    updates = UpdateNorm(params)
    tokenizer = HashTokenizer(cfg.model.vocab_size, cfg.model.context_length)
    dataset = make_dataset(cfg.data, cfg.train.seed)
    eval_batch = dataset.eval_set() if leader else None

    start, wall_before = 0, 0.0
    if store.checkpoint_path.exists():
        # weights_only: a checkpoint is data, never code (nothing on disk can run on load).
        ckpt = torch.load(store.checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        spikes.load_state_dict(ckpt["spikes"])
        loss_spikes.load_state_dict(ckpt["loss_spikes"])
        torch.set_rng_state(ckpt["rng"])
        start, wall_before = int(ckpt["step"]), float(ckpt["wall_s"])
        if leader:
            store.truncate_after(start)
    elif leader:
        store.reset()

    rows: list[dict[str, Any]] = []
    last_flush = time.time()

    def elapsed() -> float:
        return wall_before + time.time() - attempt_start

    def flush() -> None:
        nonlocal last_flush
        if rows and leader:
            store.append_metrics(rows)
            store.update_state(step=rows[-1]["step"], steps=derived.steps, loss=rows[-1]["loss"])
        rows.clear()
        last_flush = time.time()

    def save_checkpoint(step: int) -> None:
        flush()
        if not leader:
            return
        state = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "spikes": spikes.state_dict(),
            "loss_spikes": loss_spikes.state_dict(),
            "rng": torch.get_rng_state(),
            "wall_s": elapsed(),
        }
        tmp = store.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(store.checkpoint_path)

    def record_eval(step: int) -> None:
        if leader:
            store.append_eval({"step": step, "examples_seen": step * batch_size,
                               **evaluate(model, dataset, eval_batch, tokenizer, device)})

    diverged = False
    batch_size = cfg.train.batch_size
    local = slice(ranks.rank * batch_size // ranks.world, (ranks.rank + 1) * batch_size // ranks.world)
    extended = cfg.monitor.extended
    step = start
    for step in range(start + 1, derived.steps + 1):
        t0 = time.perf_counter()
        lr = lr_at(step, derived, cfg.optim.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = dataset.train_batch(step, batch_size)
        images = batch.images[local].to(device)
        tokens = tokenizer(batch.captions[local]).to(device)

        image_features, text_features = forward(images, tokens)
        scale = model.logit_scale()
        loss = compute_loss(trial, step, image_features, text_features, scale, model.bias,
                            distributed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Norms before any clipping: the spike record must show what the optimiser was handed.
        # After backward the gradients are already averaged over ranks, so every rank agrees.
        norm_now = grad_norm(params)
        loss_value = loss.item()
        is_spike, ratio = spikes.update(norm_now)
        is_loss_spike, loss_ratio = loss_spikes.update(loss_value)
        row = {
            "step": step,
            "examples_seen": step * batch_size,
            "loss": loss_value,
            "grad_norm": norm_now,
            "lr": lr,
            "temperature": scale.item(),
            "bias": None if model.bias is None else model.bias.item(),
            "is_spike": is_spike,
            "spike_ratio": ratio,
            "is_loss_spike": is_loss_spike,
            "loss_spike_ratio": loss_ratio,
        }
        if extended:
            # With several ranks these logit means cover this rank's block of the batch.
            positive, negative = logit_means(image_features, text_features, scale, model.bias)
            row.update(
                grad_norm_image=grad_norm(tower_params["image"]),
                grad_norm_text=grad_norm(tower_params["text"]),
                logit_pos_mean=positive,
                logit_neg_mean=negative,
                adam_staleness=adam_staleness(optimizer),
            )
        if not (math.isfinite(loss_value) and math.isfinite(norm_now)):
            row["step_time_s"] = time.perf_counter() - t0
            rows.append(row)
            diverged = True
            break
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        if extended:
            updates.snapshot()
        optimizer.step()
        if extended:
            row["update_norm"] = updates.measure()
            row["param_norm"] = norm([p.detach() for p in params])
        row["step_time_s"] = time.perf_counter() - t0
        rows.append(row)

        if distributed and rk.any_rank(stop.is_set(), device):
            stop.set()
        if is_due(step, cfg.train.eval_every, derived.steps):
            flush()
            record_eval(step)
        if is_due(step, cfg.train.checkpoint_every, derived.steps) or stop.is_set():
            save_checkpoint(step)
        elif time.time() - last_flush > FLUSH_EVERY_S:
            flush()
        if stop.is_set() and step < derived.steps:
            raise Preempted(f"stopped at step {step}")

    flush()
    if not leader:
        return None
    if diverged:
        # The history up to the bad step is the finding; evaluate the model as it was before it.
        record_eval(step)
    store.compact_metrics()
    summary = summarize(store.metrics(), store.evals(), derived, diverged, elapsed(),
                        len(dataset.classes), cfg.monitor.spike_window)
    atomic_write_json(store.summary_path, summary)
    error = str(DivergedError(step, "non-finite loss or gradient norm")) if diverged else None
    store.update_state(
        status="diverged" if diverged else "done", finished_at=time.time(), error=error,
        step=summary["step"],
    )
    return summary
