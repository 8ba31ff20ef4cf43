"""What the built-in shapes data leaves of an artifact at each batch size: the share of a batch's
rows whose caption repeats in it (false negatives for the loss) and whose *scene* repeats (the
caption without its digits: rows that a model which cannot read the digits sees as duplicates).
Recipes add this table to their findings, so a reader sees the measured proxy limit."""

from __future__ import annotations

from scalestudy.spec import DataSpec
from scalestudy.store import RunStore, results_frame
from scalestudy.train.data import dup_caption_rate
from scalestudy.train.datasets import make_dataset
from scalestudy.train.shapes_vocab import scene


def duplicate_table(data: DataSpec, batch_sizes: list[int], batches: int = 20, seed: int = 0) -> str:
    """A markdown table: per batch size, the mean over `batches` training batches of the caption
    and scene duplicate rates."""
    dataset = make_dataset(data, seed)
    lines = ["| B | rows whose caption repeats in the batch | rows whose scene (caption without digits) repeats |",
             "|---:|---:|---:|"]
    for size in batch_sizes:
        captions = [dataset.train_captions(step, size) for step in range(1, batches + 1)]
        exact = sum(map(dup_caption_rate, captions)) / batches
        scenes = sum(dup_caption_rate([scene(c) for c in batch]) for batch in captions) / batches
        lines.append(f"| {size} | {100 * exact:.2f} % | {100 * scenes:.1f} % |")
    return "\n".join(lines)


def duplicate_section(store: RunStore) -> str:
    """findings.md's section on duplicates for a study's own data and batch sizes (its trials'
    stored configs: nothing is re-validated beyond the data section)."""
    frame = results_frame(store).filter("in_study")
    sizes = sorted(set(frame["train.batch_size"].to_list()))
    stored = store.trial(frame["trial_id"][0]).config()["config"]["data"]
    data = DataSpec.model_validate(stored)
    if data.kind != "shapes":
        return ""
    return ("## Caption and scene duplicates per batch size\n\n" + duplicate_table(data, sizes)
            + "\n\nMeasured on 20 training batches of the study's data (seed 0) by "
            "scalestudy.analysis.proxy. A scene repeat is a false negative for a model that does "
            "not read the digits: the `zeroshot_top1_digit*` columns of the trials show whether it does.")
