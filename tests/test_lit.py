"""Locked-image tuning (LiT / SigLiT): a finite training pool of shapes whose rows carry their pool
index, an image tower loaded from a finished trial (model.image_init) and checked before anything
runs, the locked tower's features computed once per pool and reused, and warm-up in steps."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from scalestudy.cli import main
from scalestudy.expand import derive, expand
from scalestudy.load import load_study
from scalestudy.spec import DataSpec, ModelSpec, TrialConfig
from scalestudy.store import RunStore, Status, TrialStore
from scalestudy.store.files import atomic_write_json, save_torch
from scalestudy.train import lit
from scalestudy.train.data import draw_scenes, normalize, pool_index, render
from scalestudy.train.datasets import make_dataset
from scalestudy.train.loop import Trainer, compute_loss, run_trial
from scalestudy.train.models import IMAGE_TOWER_KEYS, TwoTower, image_tower_shapes
from scalestudy.train.ranks import Ranks
from tests.conftest import TINY_BASE, tiny_study

TINY_MODEL = ModelSpec(**TINY_BASE["model"])


def pooled(pool: int, seed: int = 0, **data) -> object:
    return make_dataset(DataSpec(image_size=16, train_pool=pool, **data), seed)


# --- the finite pool ----------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), pool=st.integers(1, 96), batch=st.integers(1, 64),
       step=st.integers(1, 40))
def test_a_pooled_batch_is_a_pure_function_of_seed_and_step(seed, pool, batch, step):
    first, again = pooled(pool, seed, caption_noise=0.25), pooled(pool, seed, caption_noise=0.25)
    a, b = first.train_batch(step, batch), again.train_batch(step, batch)
    assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)
    assert a.captions == b.captions and torch.equal(a.labels, b.labels)
    assert first.train_captions(step, batch) == a.captions
    assert a.index.min() >= 0 and a.index.max() < pool


def test_the_pool_is_drawn_from_the_seed_and_a_row_shows_its_pool_item():
    dataset = pooled(50, seed=3)
    assert pooled(50, seed=4).train_batch(1, 16).captions != dataset.train_batch(1, 16).captions
    batch = dataset.train_batch(2, 16)
    pool = draw_scenes(3, "pool", 0, 50, None)
    assert torch.equal(batch.images, render(pool.rows(batch.index), 16))
    assert torch.equal(dataset.pool_images(0, 50)[batch.index], batch.images)
    assert batch.captions == [pool.captions()[i] for i in batch.index.tolist()]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), pool=st.integers(1, 60), batch=st.integers(1, 50),
       epochs=st.integers(1, 4))
def test_every_epoch_shows_every_pool_item_exactly_once(seed, pool, batch, epochs):
    steps = -(-epochs * pool // batch)  # enough steps to cover `epochs` whole epochs
    stream = torch.cat([pool_index(seed, pool, step, batch) for step in range(1, steps + 1)])
    for epoch in range(epochs):
        seen = stream[epoch * pool:(epoch + 1) * pool]
        assert torch.equal(seen.sort().values, torch.arange(pool))
    if pool > 3:  # each epoch its own permutation
        assert not torch.equal(pool_index(seed, pool, 1, pool), pool_index(seed, pool, 2, pool))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_each_rank_slices_exactly_its_rows_of_the_global_batch(world):
    dataset, batch = pooled(40, seed=1, caption_noise=0.2), 24
    for step in (1, 2, 5):  # 5 crosses an epoch boundary: positions 96..119 of a 40-item pool
        whole = dataset.train_batch(step, batch)
        for rank in range(world):
            rows = slice(rank * batch // world, (rank + 1) * batch // world)
            part = dataset.train_batch(step, batch, rows)
            assert torch.equal(part.images, whole.images[rows]) and torch.equal(part.index, whole.index[rows])
            assert part.captions == whole.captions[rows] and torch.equal(part.labels, whole.labels[rows])
            blind = dataset.train_batch(step, batch, rows, images=False)
            assert blind.images is None and torch.equal(blind.index, part.index)
            assert blind.captions == part.captions and torch.equal(blind.labels, part.labels)


def test_without_a_pool_the_stream_is_endless_and_unchanged():
    dataset = make_dataset(DataSpec(image_size=16), seed=2)
    batch = dataset.train_batch(7, 32)
    scenes = draw_scenes(2, "train", 7, 32, None)
    assert batch.index is None and dataset.pool_size is None
    assert torch.equal(batch.images, render(scenes, 16)) and batch.captions == scenes.captions()


def test_a_pool_of_fifty_thousand_scenes_is_drawn_once_and_imageless_batches_render_nothing(monkeypatch):
    # What keeps a big pool cheap (0.07 s for this on one core, measured): the pool's scenes are
    # drawn in one vectorised call, the first time they are needed, and a LiT step's batch of
    # pool indices renders no image. Counted, not timed, so a loaded machine cannot fail it.
    import scalestudy.train.data as data

    draws, renders = [], []
    draw_scenes, render = data.draw_scenes, data.render
    monkeypatch.setattr(data, "draw_scenes", lambda *a: draws.append(a[1:4]) or draw_scenes(*a))
    monkeypatch.setattr(data, "render", lambda *a: renders.append(a) or render(*a))
    dataset = pooled(50_000)
    batch = dataset.train_batch(1, 16_384, images=False)
    captions = dataset.train_captions(2, 16_384)
    assert draws == [("pool", 0, 50_000)]
    assert renders == []
    assert batch.images is None and len(batch.index) == len(captions) == 16_384


def test_train_pool_is_for_shapes_only(tmp_path):
    with pytest.raises(ValidationError, match="data.train_pool=100 .* already a finite pool"):
        DataSpec(kind="csv", csv=str(tmp_path / "pairs.csv"), train_pool=100)


def test_real_data_rows_carry_their_sample_index_and_imageless_batches_replace_the_same_rows(tmp_path):
    rows = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        if i == 5:
            path.write_bytes(b"not an image")  # unreadable: its rows get a replacement
        else:
            Image.new("RGB", (8, 8), (20 * i, 100, 7 * i)).save(path)
        rows.append({"image": path.name, "caption": f"picture {i}"})
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    dataset = make_dataset(DataSpec(kind="csv", csv=str(tmp_path / "pairs.csv"), image_size=8,
                                    eval_images=2), seed=0)
    assert dataset.pool_size == 10  # the last 2 samples are held out
    pool = dataset.pool_images(0, 10)  # decodes every item: the unreadable one is now known
    assert pool[5].eq(0).all() and not pool[4].eq(0).all()
    visited = set()
    for step in range(1, 5):  # 16 positions: every item of the 10-item pool comes up
        batch = dataset.train_batch(step, 4)
        assert 5 not in batch.index.tolist()
        assert torch.equal(batch.images, pool[batch.index])
        assert batch.captions == [f"picture {i}" for i in batch.index.tolist()]
        blind = dataset.train_batch(step, 4, images=False)
        assert blind.images is None and torch.equal(blind.index, batch.index)
        assert blind.captions == batch.captions
        visited |= set(batch.index.tolist())
    assert visited == set(range(10)) - {5}


# --- model.image_init ---------------------------------------------------------------------------


def tower(spec: ModelSpec = TINY_MODEL, seed: int = 0, image_size: int = 16) -> TwoTower:
    torch.manual_seed(seed)
    return TwoTower(spec, image_size, 10.0, -10.0, True, 100.0)


def test_image_init_loads_exactly_the_image_tower_and_nothing_else(tmp_path):
    source = tower(seed=1)
    save_torch(tmp_path / "source.pt", {"model": source.state_dict(), "step": 3})
    target = tower(seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    spec = TINY_MODEL.model_copy(update={"image_init": str(tmp_path / "source.pt")})
    lit.init_image_tower(target, spec, 16)
    after, loaded = target.state_dict(), source.state_dict()
    image_keys = [k for k in after if k.startswith("image.")]
    assert image_keys and all(torch.equal(after[k], loaded[k]) for k in image_keys)
    assert any(not torch.equal(before[k], loaded[k]) for k in image_keys)
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("image."))


def test_image_init_reads_a_bare_state_dict_too(tmp_path):
    source = tower(seed=1)
    torch.save(source.state_dict(), tmp_path / "bare.pt")
    image = lit.read_image_state(str(tmp_path / "bare.pt"))
    assert set(image) == set(image_tower_shapes(TINY_MODEL, 16))
    assert torch.equal(image["pos"], source.image.pos)


@pytest.mark.parametrize(
    ("change", "image_size", "key"),
    [({"width": 32, "heads": 2}, 16, "cls"),  # the first tensor in the state dict's order
     ({}, 32, "pos"),
     ({"patch_size": 4}, 16, "pos")],
    ids=["width", "image-size", "patch"],
)
def test_image_init_refuses_a_tower_of_other_shapes_naming_the_key_and_both_shapes(tmp_path, change, image_size, key):
    save_torch(tmp_path / "source.pt", {"model": tower().state_dict()})
    spec = TINY_MODEL.model_copy(update={**change, "image_init": str(tmp_path / "source.pt")})
    theirs = tuple(tower().image.state_dict()[key].shape)
    mine = tuple(image_tower_shapes(spec, image_size)[key])
    with pytest.raises(ValueError) as err:
        lit.init_image_tower(tower(spec, image_size=image_size), spec, image_size)
    message = str(err.value)
    assert message.startswith("model.image_init: ") and f"image.{key}" in message
    assert f"({', '.join(map(str, theirs))})" in message and f"({', '.join(map(str, mine))})" in message


def test_image_init_refuses_a_tower_with_other_tensors():
    image = {k: torch.zeros(s) for k, s in image_tower_shapes(TINY_MODEL, 16).items()}
    with_ln_pre = ModelSpec(**{**TINY_BASE["model"], "ln_pre": True})
    problem = lit.shape_problem(image, with_ln_pre, 16, Path("source.pt"))
    assert problem is not None and "source.pt has no image.ln_pre.weight" in problem
    assert "this trial's image tower has, of shape (16)" in problem
    problem = lit.shape_problem({**image, "extra": torch.zeros(2)}, TINY_MODEL, 16, Path("source.pt"))
    assert problem is not None and "has image.extra (2)" in problem


def test_every_model_key_is_an_image_tower_setting_or_leaves_the_tower_alone():
    # A new model.* key must be classified: the feature cache and image_init trust this list.
    elsewhere = {"preset", "text_width", "text_depth", "text_heads", "text_pool", "causal_text",
                 "text_projection_bias", "vocab_size", "context_length", "tokenizer", "tokenizer_file",
                 "grad_checkpointing", "lock_image", "lock_text", "image_init"}
    assert set(IMAGE_TOWER_KEYS) | elsewhere == set(ModelSpec.model_fields)
    assert not set(IMAGE_TOWER_KEYS) & elsewhere


def test_image_init_is_recorded_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ModelSpec(image_init="runs/a/trials/x").image_init == str(tmp_path / "runs/a/trials/x")


def lit_study(image_init: str, **model) -> dict:
    return tiny_study(grid={"train.seed": [0]},
                      base={"model": {"lock_image": True, "image_init": image_init, **model},
                            "data": {"train_pool": 256}})


def test_validate_exits_2_naming_model_image_init_for_a_missing_path(write_study, tmp_path, capsys):
    missing = tmp_path / "runs" / "old" / "trials" / "abc"
    assert main(["validate", str(write_study(lit_study(str(missing))))]) == 2
    err = capsys.readouterr().err
    assert "base.model.image_init" in err and f"{missing} does not exist" in err


def test_validate_exits_2_for_a_trial_that_has_not_finished(write_study, tmp_path, capsys):
    trial_dir = tmp_path / "runs" / "old" / "trials" / "abc"
    save_torch(trial_dir / "checkpoint.pt", {"model": tower().state_dict()})  # a mid-run checkpoint
    TrialStore(trial_dir).update_state(status=Status.PREEMPTED)
    assert main(["plan", str(write_study(lit_study(str(trial_dir))))]) == 2
    err = capsys.readouterr().err
    assert "base.model.image_init" in err and "is not finished (its status is preempted)" in err
    TrialStore(trial_dir).update_state(status=Status.DONE)
    atomic_write_json(trial_dir / "config.json", {"config": {"model": {"activation": "quick_gelu"}}})
    assert main(["validate", str(write_study(lit_study(str(trial_dir))))]) == 2
    assert "model.activation='quick_gelu' but this trial has model.activation='gelu'" in capsys.readouterr().err
    assert main(["validate", str(write_study(lit_study(str(trial_dir), activation="quick_gelu")))]) == 0
    wider = lit_study(str(trial_dir), activation="quick_gelu", width=32, embed_dim=32)
    assert main(["run", str(write_study(wider)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "base.model.image_init: image.cls is (1, 1, 16) in" in err and "but (1, 1, 32) in this" in err
    assert not (tmp_path / "out").exists()


def test_a_directory_that_is_not_a_trial_is_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    assert "not a trial's (it has no state.json)" in lit.source_problem(str(tmp_path / "folder"))


def test_a_run_directory_of_one_trial_stands_for_that_trial_and_one_of_two_must_be_named(tmp_path):
    run = RunStore(tmp_path / "tower")
    for tid in ("aaa", "bbb"):
        run.trial(tid).path.mkdir(parents=True)
        run.trial(tid).config_path.write_text("{}")
    assert "a run directory with 2 trials" in lit.source_problem(str(run.root))
    shutil.rmtree(run.trial("bbb").path)
    assert lit.trial_of(str(run.root)) == run.trial("aaa").path
    assert lit.checkpoint_of(str(run.root)) == run.trial("aaa").checkpoint_path


# --- the feature cache --------------------------------------------------------------------------


def test_the_cache_key_follows_the_tower_weights_settings_and_data_not_the_text_tower():
    config = TrialConfig(model=TINY_MODEL.model_copy(update={"lock_image": True}),
                         data=DataSpec(image_size=16, train_pool=64))
    dataset, cpu = make_dataset(config.data, 0), torch.device("cpu")
    key = lit.cache_key(tower(seed=0), config, dataset, cpu)
    text = TINY_MODEL.model_copy(update={"lock_image": True, "text_width": 32, "text_heads": 2})
    assert lit.cache_key(tower(text, seed=0), config, dataset, cpu) == key
    assert lit.cache_key(tower(seed=1), config, dataset, cpu) != key
    assert lit.cache_key(tower(seed=0), config, make_dataset(config.data, 1), cpu) != key
    bigger = config.model_copy(update={"data": DataSpec(image_size=16, train_pool=65)})
    assert lit.cache_key(tower(seed=0), bigger, make_dataset(bigger.data, 0), cpu) != key
    gelu = config.model_copy(update={"model": config.model.model_copy(update={"activation": "quick_gelu"})})
    assert lit.cache_key(tower(seed=0), gelu, dataset, cpu) != key
    assert lit.cache_key(tower(seed=0), config, dataset, torch.device("meta")) != key


@pytest.mark.train
def test_a_locked_image_trial_trains_its_text_tower_on_features_computed_once(write_study, tmp_path, monkeypatch, capsys):
    # The image tower: a finished trial of its own study.
    source_trial = expand(load_study(write_study(tiny_study(grid={"train.seed": [5]}), "source.yaml")))[0]
    source = RunStore(tmp_path / "source").add_trial(source_trial)
    run_trial(str(source.path))
    assert source.state().status == "done"

    study = tiny_study(grid={"loss.kind": ["sigmoid", "softmax"]},
                       base={"model": {"lock_image": True, "image_init": str(source.path)},
                             "data": {"train_pool": 512},
                             "train": {"examples_seen": 32 * 48, "eval_every": 0}})
    path = write_study(study, "lit.yaml")
    assert main(["validate", str(path)]) == 0
    sigmoid, softmax = expand(load_study(path))
    run = RunStore(tmp_path / "lit")
    first = run.add_trial(sigmoid)
    run_trial(str(first.path))
    assert first.state().status == "done"
    losses = first.metrics()["loss"].to_list()
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8  # the text tower learns
    final = torch.load(first.checkpoint_path, weights_only=True)["model"]
    trained = torch.load(source.checkpoint_path, weights_only=True)["model"]
    assert all(torch.equal(final[k], trained[k]) for k in trained if k.startswith("image."))

    [cache] = (run.root / "cache" / "image_features").iterdir()
    written = cache.stat().st_mtime_ns

    def computed_again(*args, **kwargs):
        raise AssertionError("the second trial recomputed the image features")

    monkeypatch.setattr(lit, "compute_features", computed_again)
    second = run.add_trial(softmax)
    run_trial(str(second.path))
    assert second.state().status == "done"
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]
    assert cache.stat().st_mtime_ns == written

    # The cached table is what the locked tower computes, so the first step's loss is the same.
    trainer = Trainer.build(sigmoid, Ranks(), torch.device("cpu"), run.root)
    batch = trainer.dataset.train_batch(1, sigmoid.config.train.batch_size)
    with torch.no_grad():
        images = trainer.model.encode_image(normalize(batch.images, trainer.dataset.mean, trainer.dataset.std))
        texts = trainer.model.encode_text(trainer.tokenizer(batch.captions))
        plain = compute_loss(sigmoid, 1, images, texts, trainer.model.logit_scale(), trainer.model.bias, False)
    assert torch.allclose(trainer.features[batch.index], images, rtol=0, atol=1e-6)
    _, metrics = trainer.step(1)
    assert float(metrics["loss"]) == pytest.approx(float(plain), rel=1e-6)


@pytest.mark.train
def test_a_two_worker_locked_image_trial_matches_its_single_process_twin(write_study, tmp_path):
    base = {"train": {"examples_seen": 32 * 12, "batch_size": 32, "checkpoint_every": 6,
                      "eval_every": 6}, "resources": {"cpus": 2},
            "model": {"lock_image": True}, "data": {"train_pool": 100}}
    single = expand(load_study(write_study(tiny_study(grid={"train.seed": [0]}, base=base))))[0]
    twin = single.model_copy(update={"config": single.config.model_copy(
        update={"resources": single.config.resources.model_copy(update={"workers": 2})})})
    metrics = {}
    for name, trial in (("single", single), ("workers2", twin)):
        ts = RunStore(tmp_path / name).add_trial(trial)
        run_trial(str(ts.path))  # rank 0 fills the cache; rank 1 waits for it and reads it
        assert ts.state().status == "done"
        assert len(list((tmp_path / name / "cache" / "image_features").iterdir())) == 1
        metrics[name] = ts.metrics().select("step", "loss", "grad_norm", "temperature", "bias")
    a, b = metrics["single"], metrics["workers2"]
    assert a["step"].to_list() == b["step"].to_list() == list(range(1, 13))
    for column in ("loss", "grad_norm", "temperature", "bias"):
        assert a[column].to_numpy() == pytest.approx(b[column].to_numpy(), rel=1e-4, abs=1e-6), column


# --- warm-up in steps ---------------------------------------------------------------------------


@pytest.mark.parametrize(("warmup", "batch", "expected"), [(None, 64, 26), (50, 64, 50), (50, 1024, 16),
                                                           (0, 64, 0)])
def test_warmup_steps_win_over_the_fraction_and_are_clipped_to_the_steps(warmup, batch, expected):
    config = TrialConfig.model_validate({"optim": {"warmup_steps": warmup},
                                         "train": {"batch_size": batch, "examples_seen": 16384}})
    assert derive(config).warmup_steps == expected


def test_plan_shows_the_warmup_steps(write_study, capsys):
    study = tiny_study(grid={"train.batch_size": [32, 128]}, base={"optim": {"warmup_steps": 6}})
    assert main(["plan", "--json", str(write_study(study))]) == 0
    rows = json.loads(capsys.readouterr().out)["trials"]
    assert [row["derived.warmup_steps"] for row in rows] == [6, 4]  # 512 / 128 = 4 steps in all


# --- a learning rate of their own for t and b ---------------------------------------------------


@pytest.mark.parametrize("scalar_lr", [None, 0.05])
def test_scalar_lr_moves_t_and_b_by_their_own_learning_rate(write_study, tmp_path, scalar_lr):
    # Adam's first step moves every parameter entry by its LR times sign(gradient) (up to ε).
    study = tiny_study(grid={"train.seed": [0]},
                       base={"optim": {"lr": 1e-3, "scalar_lr": scalar_lr, "warmup_steps": 0,
                                       "schedule": "constant"}})
    trial = expand(load_study(write_study(study)))[0]
    trainer = Trainer.build(trial, Ranks(), torch.device("cpu"), tmp_path)
    model = trainer.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.step(1)
    moved = {name: (p.detach() - before[name]).abs() for name, p in model.named_parameters()}
    expected = 1e-3 if scalar_lr is None else scalar_lr
    for name in ("bias", "log_scale"):
        assert float(moved[name]) == pytest.approx(expected, rel=1e-3), name
    assert float(moved["text.norm.bias"].max()) == pytest.approx(1e-3, rel=1e-3)
    assert len(trainer.optimizer.param_groups) == (2 if scalar_lr is None else 3)
