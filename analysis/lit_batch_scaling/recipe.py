"""Locked-image batch scaling (SigLiT, SigLIP Fig. 2's own setting): zero-shot accuracy and
retrieval against batch size per loss with a frozen image tower, Student-t intervals over seeds,
paired sigmoid − softmax comparisons, accuracy over training, training curves, and the measured
caption/scene duplicates per batch size.

    scalestudy run studies/lit_tower.yaml --out /tmp/studies
    scalestudy run studies/lit_batch_scaling.yaml --out /tmp/studies --set model.image_init=/tmp/studies/lit_tower
    python analysis/lit_batch_scaling/recipe.py /tmp/studies/lit_batch_scaling
"""

import sys
from pathlib import Path

from scalestudy.analysis.proxy import duplicate_section
from scalestudy.analysis.report import recipe_main

FIGURES = ["accuracy_vs_batch", "accuracy_vs_examples", "retrieval_vs_batch", "training_curves"]

if __name__ == "__main__":
    sys.exit(recipe_main(None, FIGURES, Path(__file__).parent, __doc__, duplicate_section))
