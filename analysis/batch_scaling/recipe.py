"""Batch scaling (SigLIP Fig. 2): zero-shot accuracy and retrieval against batch size per loss,
with Student-t intervals over seeds and paired sigmoid − softmax comparisons, accuracy over
training, training curves, and the measured caption/scene duplicates per batch size.

    scalestudy run studies/batch_scaling.yaml --out /tmp/studies
    python analysis/batch_scaling/recipe.py /tmp/studies/batch_scaling
"""

import sys
from pathlib import Path

from scalestudy.analysis.proxy import duplicate_section
from scalestudy.analysis.report import recipe_main

FIGURES = ["accuracy_vs_batch", "accuracy_vs_examples", "retrieval_vs_batch", "training_curves"]

if __name__ == "__main__":
    sys.exit(recipe_main(None, FIGURES, Path(__file__).parent, __doc__, duplicate_section))
