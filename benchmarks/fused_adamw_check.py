"""FusedAdamW (scalestudy.train.optim) against torch's own fused AdamW: bit for bit, and its step
time.

    python benchmarks/fused_adamw_check.py OUT.json [--device cuda:0]

Builds the tiny model twice on `--device`, steps one copy with `make_optimizer`'s FusedAdamW and
the other with `torch.optim.AdamW(fused=True)` over the same 30 steps (two of them skipped through
`found_inf`, two without text-tower gradients), compares every parameter, moment and step count
with `torch.equal`, then times 200 steps of each (CUDA events on a GPU, wall time on a CPU).
Results: benchmarks/device_results/h200-2026-12-01/fused_cuda.json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from scalestudy.spec import ModelSpec, OptimSpec
from scalestudy.train.models import TwoTower
from scalestudy.train.optim import make_optimizer


def model(device: torch.device) -> TwoTower:
    torch.manual_seed(0)
    return TwoTower(ModelSpec(width=32, depth=1, heads=2, embed_dim=32), 32, 10.0, -10.0, True,
                    100.0).to(device)


def ms_per_step(optimizer: torch.optim.Optimizer, device: torch.device, steps: int = 200) -> float:
    for _ in range(20):
        optimizer.step()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        return (time.perf_counter() - start) / steps * 1e3
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        optimizer.step()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()
    device = torch.device(args.device)
    ours, theirs = model(device), model(device)
    opt = make_optimizer(ours, OptimSpec(weight_decay=0.1, beta2=0.95), 1e-2)
    name_of = {id(p): n for n, p in ours.named_parameters()}
    twin = dict(theirs.named_parameters())
    ref = torch.optim.AdamW(
        [{"params": [twin[name_of[id(p)]] for p in group["params"]],
          "weight_decay": group["weight_decay"]} for group in opt.param_groups],
        lr=1e-2, betas=(0.9, 0.95), eps=opt.defaults["eps"], fused=True)
    noise = torch.Generator(device=device).manual_seed(1)
    for t in range(30):
        skip = torch.tensor(float(t in (4, 17)), device=device)
        opt.found_inf = ref.found_inf = skip  # type: ignore[attr-defined]
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            g = (None if 8 <= t <= 9 and name.startswith("text.")
                 else torch.randn(p.shape, generator=noise, device=device))
            p.grad, q.grad = g, None if g is None else g.clone()
        opt.step()
        ref.step()
    pairs = list(zip(ours.parameters(), theirs.parameters()))
    result = {
        "type": type(opt).__name__,
        "params_identical": all(torch.equal(p, q) for p, q in pairs),
        "state_identical": all(torch.equal(opt.state[p][k], ref.state[q][k]) for p, q in pairs
                               for k in ("step", "exp_avg", "exp_avg_sq")),
        "ms_per_step": {"FusedAdamW": ms_per_step(opt, device),
                        "torch AdamW fused": ms_per_step(ref, device)},
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
