"""Negatives (SigLIP §4.7 and the imbalance follow-ups): accuracy per variant — masked negatives,
the balanced bias-free loss, no bias, softmax — with Student-t intervals over seeds, retrieval,
accuracy over training, and the loss, t and b per variant with the no-learning loss marked.

    scalestudy run studies/negatives.yaml --out /tmp/studies
    python analysis/negatives/recipe.py /tmp/studies/negatives
"""

import sys
from pathlib import Path

from scalestudy.analysis.report import recipe_main

FIGURES = ["accuracy_vs_batch", "retrieval_vs_batch", "accuracy_vs_steps", "training_curves"]

if __name__ == "__main__":
    sys.exit(recipe_main(None, FIGURES, Path(__file__).parent, __doc__))
