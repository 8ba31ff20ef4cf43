"""The optimisers against hand-computed steps and torch's AdamW, their found_inf gate, weight-decay
groups and the LR schedule's known values."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scalestudy.expand import Derived
from scalestudy.spec import ModelSpec, OptimSpec
from scalestudy.train.models import TwoTower
from scalestudy.train.optim import (
    FusedAdamW, NonFiniteGate, StableAdamW, bias_corrections, lr_at, make_optimizer, update_rms,
    weight_decay_groups,
)

TINY = ModelSpec(patch_size=8, width=16, depth=1, heads=2, embed_dim=16, context_length=12,
                 vocab_size=512)


def tiny_model(bias: float | None = -10.0) -> TwoTower:
    torch.manual_seed(0)
    return TwoTower(TINY, 16, 10.0, bias, True, 100.0)


def test_stable_adamw_clips_an_update_whose_rms_exceeds_one_and_leaves_the_other_alone():
    # lr 0.1, β1 0.9, β2 0.99, ε 1e-8. Step 1: m̂ = g, v̂ = g², so RMS = 1 and both tensors move
    # by lr·g/|g| (A also decays: θ ← θ − lr·λ·θ with λ = 0.5).
    #   A: [1, −2] → [1 − 0.05 − 0.1, −2 + 0.1 − 0.1] = [0.85, −2.0]
    #   B: [0.5, 3] → [0.5 − 0.1, 3 + 0.1] = [0.4, 3.1]
    # Step 2, A with g = [10, 10]: m = 0.9·0.1 + 0.1·10 = 1.09, m̂ = 1.09 / 0.19 = 5.7368421;
    #   v = 0.99·0.01 + 0.01·100 = 1.0099, v̂ = 1.0099 / 0.0199 = 50.748744;
    #   RMS = sqrt(100 / 50.748744) = 1.4037422 > 1, so η = 0.1 / 1.4037422 = 0.0712382 and
    #   A = [0.85, −2.0]·(1 − 0.5η) − η·5.7368421 / 7.1238153 = [0.7623554, −1.9861303].
    # Step 2, B with g = [0.5, −0.5]: m = 0.09 + 0.05 = 0.14, m̂ = 0.7368421; v = 0.0099 + 0.0025,
    #   v̂ = 0.0124 / 0.0199 = 0.6231156; RMS = sqrt(0.25 / 0.6231156) = 0.6334111 ≤ 1, so η = 0.1:
    #   B = [0.4, 3.1] ∓ 0.1·0.7368421 / 0.7893767 = [0.3066552, 3.1933448].
    a = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    b = torch.nn.Parameter(torch.tensor([0.5, 3.0]))
    opt = StableAdamW([{"params": [a], "weight_decay": 0.5}, {"params": [b]}], lr=0.1,
                      betas=(0.9, 0.99), eps=1e-8)
    for grad_a, grad_b in [([1.0, 1.0], [1.0, -1.0]), ([10.0, 10.0], [0.5, -0.5])]:
        a.grad, b.grad = torch.tensor(grad_a), torch.tensor(grad_b)
        opt.step()
    assert a.tolist() == pytest.approx([0.7623554, -1.9861303], abs=1e-6)
    assert b.tolist() == pytest.approx([0.3066552, 3.1933448], abs=1e-6)
    assert opt.last_rms.tolist() == pytest.approx([1.4037422, 0.6334111], abs=1e-6)


def twin_params(seed: int) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Two identical sets of a matrix, a vector, a scalar (like t) and a 3-d tensor."""
    torch.manual_seed(seed)
    first = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 3), (5,), (), (2, 2, 2)]]
    return first, [torch.nn.Parameter(p.detach().clone()) for p in first]


def groups(params: list[torch.nn.Parameter], decay: float) -> list[dict]:
    return [{"params": params[:2], "weight_decay": decay}, {"params": params[2:], "weight_decay": 0.0}]


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.0, 0.1]))
def test_stable_adamw_is_torch_adamw_when_no_tensor_has_rms_above_one(seed, decay):
    first, second = twin_params(seed)
    torch_adamw = torch.optim.AdamW(groups(first, decay), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                    fused=True)
    stable = StableAdamW(groups(second, decay), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    directions = [torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) for p in first]
    for step in range(12):
        # Shrinking gradients: each g² is below every earlier one, so below the second moment,
        # and RMS_t < 1 after the first step (where it is 1): update clipping never acts.
        grads = [0.7**step * d for d in directions]
        for p, q, g in zip(first, second, grads):
            p.grad, q.grad = g.clone(), g.clone()
        torch_adamw.step()
        stable.step()
        assert float(stable.last_rms.max()) <= 1 + 1e-5
    for p, q in zip(first, second):
        # float32 rounding of the same formula in another order: over 200 seeds the largest
        # difference was 2.4e-7 (two ulps of a value near 1).
        torch.testing.assert_close(q, p, rtol=1e-6, atol=5e-7)
        assert torch.equal(stable.state[q]["step"], torch_adamw.state[p]["step"])


def optimizer_snapshot(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    state = [t.clone() for p in params for t in opt.state[p].values()] if opt.state else []
    return [p.detach().clone() for p in params] + state


@pytest.mark.parametrize("kind", ["adamw", "stable_adamw"])
@pytest.mark.parametrize("steps_before", [0, 3])
def test_found_inf_skips_the_step_leaving_params_moments_and_step_counts_untouched(kind, steps_before):
    model = tiny_model()
    opt = make_optimizer(model, OptimSpec(kind=kind, weight_decay=0.1), lr=1e-2)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps_before):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.found_inf = torch.zeros(())
        opt.step()
    before = optimizer_snapshot(opt, params)
    for p in params:
        p.grad = torch.full_like(p, math.nan)  # what a step that went non-finite hands over
    opt.found_inf = torch.ones(())
    opt.step()
    after = optimizer_snapshot(opt, params)
    if steps_before:
        assert len(after) == len(before)
        assert all(torch.equal(x, y) for x, y in zip(before, after))
    else:  # the first step creates zeroed state and leaves it, and the parameters, as they were
        assert all(torch.equal(x, y) for x, y in zip(before, after[:len(params)]))
        assert all(not t.any() for t in after[len(params):])


def test_a_skipped_step_changes_nothing_the_next_steps_see():
    first, second = twin_params(1)
    stable_a = StableAdamW(groups(first, 0.1), lr=1e-2, betas=(0.9, 0.95))
    stable_b = StableAdamW(groups(second, 0.1), lr=1e-2, betas=(0.9, 0.95))
    noise = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=noise) for p in first] for _ in range(4)]
    for t, step_grads in enumerate(grads):
        for p, g in zip(first, step_grads):
            p.grad = g.clone()
        stable_a.step()
        if t == 2:  # b sees one extra, skipped, non-finite step before this one
            for q in second:
                q.grad = torch.full_like(q, math.inf)
            stable_b.found_inf = torch.ones(())
            stable_b.step()
            stable_b.found_inf = torch.zeros(())
        for q, g in zip(second, step_grads):
            q.grad = g.clone()
        stable_b.step()
    for p, q in zip(first, second):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["adamw", "stable_adamw"])
def test_an_optimizer_resumes_exactly_from_its_state_dict(kind):
    spec = OptimSpec(kind=kind, weight_decay=0.1)
    whole, resumed = tiny_model(), tiny_model()
    opt_whole = make_optimizer(whole, spec, lr=1e-2)
    noise = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=noise) for p in whole.parameters()] for _ in range(5)]

    def train(model: TwoTower, opt: torch.optim.Optimizer, steps: list[list[torch.Tensor]]) -> None:
        for step_grads in steps:
            for p, g in zip(model.parameters(), step_grads):
                p.grad = g.clone()
            opt.step()

    train(whole, opt_whole, grads[:3])
    buffer = io.BytesIO()
    torch.save({"model": whole.state_dict(), "optimizer": opt_whole.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = make_optimizer(resumed, spec, lr=1e-2)
    opt_resumed.load_state_dict(ckpt["optimizer"])
    train(whole, opt_whole, grads[3:])
    train(resumed, opt_resumed, grads[3:])
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_make_optimizer_builds_fused_torch_adamw_or_stable_adamw():
    model = tiny_model()
    adamw = make_optimizer(model, OptimSpec(), lr=1e-3)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"]
    assert isinstance(make_optimizer(model, OptimSpec(kind="stable_adamw"), lr=1e-3), StableAdamW)


def test_fused_adamw_steps_bit_for_bit_as_torchs_through_skips_frozen_steps_and_a_reload():
    ours, theirs = tiny_model(), tiny_model()
    spec = OptimSpec(weight_decay=0.1, beta2=0.95)
    opt = make_optimizer(ours, spec, lr=1e-2)
    twin = dict(theirs.named_parameters())
    torch_opt = torch.optim.AdamW(
        [{"params": [twin[n] for n in names], "weight_decay": group["weight_decay"]}
         for group, names in zip(opt.param_groups, group_names(ours, opt))],
        lr=1e-2, betas=(0.9, 0.95), eps=spec.eps, fused=True)
    assert type(opt) is FusedAdamW
    noise = torch.Generator().manual_seed(5)
    for t in range(12):
        lr = 1e-2 * (1 + t % 3)
        skip = torch.tensor(float(t in (4, 9)))  # non-finite steps the gate skips
        for o in (opt, torch_opt):
            o.found_inf = skip
            for group in o.param_groups:
                group["lr"] = lr
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            # The text tower has no gradient on steps 6–7 (a frozen or unused tensor).
            g = None if 6 <= t <= 7 and name.startswith("text.") else torch.randn(p.shape,
                                                                                   generator=noise)
            p.grad, q.grad = g, None if g is None else g.clone()
        opt.step()
        torch_opt.step()
        if t == 5:  # a resume in between: ours from torch's state, theirs from ours
            ours_state, theirs_state = opt.state_dict(), torch_opt.state_dict()
            opt.load_state_dict(theirs_state)
            torch_opt.load_state_dict(ours_state)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert all(torch.equal(opt.state[p][k], torch_opt.state[q][k])
                   for k in ("step", "exp_avg", "exp_avg_sq"))


def group_names(model: TwoTower, opt: torch.optim.Optimizer) -> list[list[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [[by_id[id(p)] for p in group["params"]] for group in opt.param_groups]


def test_weight_decay_falls_on_matrices_and_embeddings_not_on_gains_biases_t_or_b():
    model = tiny_model()
    decay, no_decay = weight_decay_groups(model)
    layer = "encoder.blocks.0."
    assert set(decay) == {
        "image.patchify.weight", "image.cls", "image.pos", "image.proj.weight",
        f"image.{layer}qkv.weight", f"image.{layer}out.weight",
        f"image.{layer}fc.weight", f"image.{layer}proj.weight",
        "text.token_embedding", "text.pos", "text.proj.weight",
        f"text.{layer}qkv.weight", f"text.{layer}out.weight",
        f"text.{layer}fc.weight", f"text.{layer}proj.weight",
    }
    assert {"log_scale", "bias", "image.patchify.bias", "image.norm.weight",
            f"text.{layer}ln_1.weight", f"text.{layer}fc.bias"} <= set(no_decay)
    assert all(n.endswith(("bias", "weight", "log_scale")) for n in no_decay)
    opt = make_optimizer(model, OptimSpec(weight_decay=0.2), lr=1e-3)
    params = dict(model.named_parameters())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [len(decay), len(no_decay)]
    assert all(p is params[n] for p, n in zip(opt.param_groups[0]["params"], decay))


def test_a_frozen_tower_and_a_fixed_temperature_are_in_no_group():
    torch.manual_seed(0)
    model = TwoTower(TINY.model_copy(update={"lock_image": True}), 16, 10.0, None, False, 100.0)
    decay, no_decay = weight_decay_groups(model)
    assert not any(n.startswith("image.") for n in decay + no_decay)
    assert "log_scale" not in no_decay and "bias" not in no_decay


def test_the_gate_skips_every_step_from_the_first_non_finite_one_on():
    gate = NonFiniteGate(torch.device("cpu"))
    seen = [gate.update(torch.tensor(loss), torch.tensor(norm)).item()
            for loss, norm in [(1.0, 2.0), (1.0, math.inf), (1.0, 2.0), (math.nan, 2.0)]]
    assert seen == [0.0, 1.0, 1.0, 1.0]
    assert gate.update(torch.tensor(1.0)).dtype == torch.float32


@given(st.integers(1, 100_000), st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99, 0.999]))
def test_bias_corrections_are_one_minus_beta_to_the_t(t, beta):
    (correction,) = bias_corrections([torch.tensor(float(t))], beta)
    assert correction.item() == pytest.approx(1 - beta**t, rel=3e-7)


def test_update_rms_is_one_on_the_first_step_and_large_after_a_gradient_jump():
    g = torch.tensor([0.3, -2.0, 5.0])
    (first,) = update_rms([g], [torch.zeros(3)], [torch.zeros(())], 0.95, 1e-8)
    assert first.item() == pytest.approx(1.0, abs=1e-6)
    # 20 steady steps of g = 1 leave v = 1 − 0.95²⁰; then g = 30:
    # u = (0.95·(1 − 0.95²⁰) + 0.05·900) / (1 − 0.95²¹) = 69.164, RMS = 30 / sqrt(u) = 3.6073
    v = torch.full((4,), 1 - 0.95**20)
    (jump,) = update_rms([torch.full((4,), 30.0)], [v], [torch.tensor(20.0)], 0.95, 1e-8)
    u = (0.95 * (1 - 0.95**20) + 0.05 * 900) / (1 - 0.95**21)
    assert jump.item() == pytest.approx(30 / math.sqrt(u), rel=1e-6)
    assert jump.item() == pytest.approx(3.6073, abs=1e-4)


def test_update_rms_floors_the_second_moment_at_eps_squared():
    # A zero second moment and a gradient far below ε: g²/max(u, ε²) = g²/ε² per element.
    (rms,) = update_rms([torch.tensor([1e-10, 0.0])], [torch.zeros(2)], [torch.zeros(())], 0.9, 1e-8)
    assert rms.item() == pytest.approx(math.sqrt(0.5 * (1e-10 / 1e-8) ** 2), rel=1e-5)


def derived(steps: int, warmup: int, lr: float = 0.1) -> Derived:
    return Derived(steps=steps, examples_seen=steps * 8, lr=lr, warmup_steps=warmup,
                   temperature_init=10.0, bias_init=None)


def test_cosine_lr_known_values_at_the_schedule_boundaries():
    d = derived(steps=10, warmup=2)
    assert lr_at(1, d, "cosine") == pytest.approx(0.05)  # first step: lr · 1/2
    assert lr_at(2, d, "cosine") == pytest.approx(0.1)  # last warm-up step: the peak
    assert lr_at(3, d, "cosine") == pytest.approx(0.1)  # first decay step: still the peak
    # last step: progress 7/8, 0.05·(1 + cos(7π/8)) = 0.05·(1 − 0.9238795) = 0.0038060
    assert lr_at(10, d, "cosine") == pytest.approx(0.0038060, abs=1e-7)


def test_constant_lr_known_values_and_no_warm_up():
    d = derived(steps=10, warmup=4)
    assert [lr_at(s, d, "constant") for s in (1, 4, 5, 10)] == pytest.approx([0.025, 0.1, 0.1, 0.1])
    no_warmup = derived(steps=5, warmup=0)
    assert lr_at(1, no_warmup, "cosine") == pytest.approx(0.1)
    assert lr_at(5, no_warmup, "cosine") == pytest.approx(0.05 * (1 + math.cos(math.pi * 4 / 5)))
