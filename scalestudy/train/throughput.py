"""How fast a trial runs against what its hardware could do: model FLOPs, MFU, peak memory, and
the step time on the device's own clock.

Model FLOPs follow PaLM's MFU convention (Chowdhery et al. 2022, Appendix B): the FLOPs the model
needs, not the FLOPs the hardware ran, so recomputation (gradient checkpointing, the second
forward of gradient caching) is not counted and MFU stays comparable across those options. A
multiply–add is 2 FLOPs; only matmuls and attention are counted (norms, activations and the
softmax are a few per element, noise next to them). Per tower and sample, with L tokens of width
w, depth d and a 4w MLP:

    per block:  24·L·w²   (q|k|v 6Lw², output 2Lw², MLP 16Lw²)
              +  4·L²·w   (q·kᵀ and attention·v over all heads; a causal mask is not discounted)

plus the patch embedding 2·N·3p²·w (N = patches), a MAP head (k|v 4Lw², attention 4Lw, output
2w², MLP 16w²), mean pooling of the text (2Lw) and the projections 2·w·e. A trainable tower's training step costs 3× its forward
(backward: gradients of inputs and of weights, 2× the forward); a locked tower runs its forward
only. The loss's logits cost 2·B·e per pair forward, 3× with backward. `tests/test_engine.py`
checks the forward count against torch's FlopCounterMode on the real model.

MFU = model FLOPs per second per device / the device's peak dense FLOP/s in the trial's
arithmetic (`PEAK_TFLOPS`: NVIDIA's datasheets, dense, without 2:4 sparsity), or
`train.peak_tflops` when given. A CPU has no entry: its MFU is None unless the user gives a peak.
"""

from __future__ import annotations

import re
import resource
import sys

import torch

from scalestudy.spec import ModelSpec, TrialConfig

# Dense peak TFLOP/s per GPU and arithmetic (fp16 = bf16 on every GPU here that has bf16; fp32 is
# the CUDA cores' rate, tf32 the tensor cores' on float32). Matched against
# torch.cuda.get_device_name in this order, so a longer name wins (H100 PCIe before H100, A100
# before A10). V100 has no bf16 and no TF32 (its tf32 is its fp32).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    r"H100.*PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    r"H100.*NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    r"H100|H200|GH200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    r"A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    r"L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    r"\bL4\b": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    r"\bA10\b": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    r"V100": {"fp16": 125.0, "tf32": 15.7, "fp32": 15.7},
}


def block_flops(tokens: int, width: int) -> int:
    """Forward FLOPs of one pre-norm attention block (MLP 4× wide) over `tokens` tokens."""
    return 24 * tokens * width**2 + 4 * tokens**2 * width


def image_forward_flops(spec: ModelSpec, image_size: int) -> int:
    """Forward FLOPs of the image tower for one image."""
    width, patch = spec.width, spec.patch_size
    patches = (image_size // patch) ** 2
    tokens = patches + (spec.image_pool == "cls")
    flops = 2 * patches * 3 * patch * patch * width + spec.depth * block_flops(tokens, width)
    if spec.image_pool == "map":
        flops += 4 * tokens * width**2 + 4 * tokens * width + 2 * width**2 + 16 * width**2
    if spec.image_projection == "linear":
        flops += 2 * width * spec.embed_dim
    return flops


def text_forward_flops(spec: ModelSpec) -> int:
    """Forward FLOPs of the text tower for one caption (padded to the context, as it runs)."""
    width, depth, _ = spec.text_tower
    pool = 2 * spec.context_length * width if spec.text_pool == "mean" else 0  # a weighted sum
    return depth * block_flops(spec.context_length, width) + pool + 2 * width * spec.embed_dim


def training_flops_per_sample(config: TrialConfig) -> float:
    """Model FLOPs of one image–caption pair in a training step (see the module docstring)."""
    spec = config.model
    image = image_forward_flops(spec, config.data.image_size) * (1 if spec.lock_image else 3)
    text = text_forward_flops(spec) * (1 if spec.lock_text else 3)
    loss = 3 * 2 * config.train.batch_size * spec.embed_dim
    return float(image + text + loss)


def peak_flops(device: torch.device, precision: str, peak_tflops: float | None) -> float | None:
    """The device's peak dense FLOP/s in `precision`: `train.peak_tflops` when given, else the
    table's entry for this GPU, else None (a CPU, an unknown GPU)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    return table_peak_flops(torch.cuda.get_device_name(device), precision)


def table_peak_flops(device_name: str, precision: str) -> float | None:
    """PEAK_TFLOPS's figure for a GPU called `device_name` (as torch.cuda.get_device_name gives
    it) in `precision`, in FLOP/s; None for a GPU or arithmetic the table does not know."""
    for pattern, peaks in PEAK_TFLOPS.items():
        if re.search(pattern, device_name):
            value = peaks.get(precision)
            return None if value is None else value * 1e12
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held: on CUDA the caching allocator's peak of allocated
    tensor bytes on `device`; on a CPU the process's resident-set high-water mark (getrusage), the
    interpreter and libraries included, as torch keeps no peak statistics for CPU tensors."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(high_water if sys.platform == "darwin" else high_water * 1024)  # Linux: KiB


class DeviceClock:
    """The device time of a window of steps, from two CUDA events: one recorded when the window's
    first step is queued, one at its flush, after the host has read the window's metrics (so both
    have completed and reading them waits for nothing). It measures the stream's busy time plus
    any time the device sat idle waiting for the host, so a host-bound trial shows it. None on a
    CPU, where the loop's wall-clock step_time_s is the device's time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._start: torch.cuda.Event | None = None

    def start(self) -> None:
        """Called before every step; marks the window's start once."""
        if self.cuda and self._start is None:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def stop(self) -> float | None:
        """Seconds since `start`, after the flush's read; opens a new window."""
        if self._start is None:
            return None
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()  # the stream is already drained by the flush's read
        seconds = self._start.elapsed_time(end) / 1000
        self._start = None
        return seconds
