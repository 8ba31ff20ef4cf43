"""The results store: everything a run directory holds, and the only code that reads or writes it.

`run` writes the manifest and the trials' config.json; trials write their state, metrics, evals,
summary and checkpoints; executors write state; everything downstream (status, report, dashboard,
analysis) reads these files and nothing else, so a run directory copied anywhere still reads.
"""

from scalestudy.store.files import (
    atomic_write, atomic_write_json, atomic_write_parquet, atomic_write_text, part_name,
    part_range, read_json, read_ordered, read_parts,
)
from scalestudy.store.records import (
    ENDS, RESULTS, Derived, Manifest, Status, Trial, TrialState,
)
from scalestudy.store.results import Rows, file_version, flatten, results_frame, trial_row, write_results
from scalestudy.store.run import RunStore, TrialStore
from scalestudy.store.schema import RESULT_COLUMNS, STEP_SCHEMA

__all__ = [
    "ENDS", "RESULTS", "RESULT_COLUMNS", "STEP_SCHEMA", "Derived", "Manifest", "Rows", "RunStore",
    "Status", "Trial", "TrialState", "TrialStore", "atomic_write", "atomic_write_json",
    "atomic_write_parquet", "atomic_write_text", "file_version", "flatten", "part_name",
    "part_range", "read_json", "read_ordered", "read_parts", "results_frame", "trial_row",
    "write_results",
]
