"""Negatives (SigLIP §4.7 and the imbalance follow-ups): accuracy per variant — masked negatives,
the balanced bias-free loss, no bias, softmax — with seed CIs, and the early training loss.

    scalestudy run studies/negatives.yaml --out /tmp/studies
    python analysis/negatives/recipe.py /tmp/studies/negatives
"""

import sys
from pathlib import Path

from scalestudy.analysis.report import recipe_main

FIGURES = ["accuracy_vs_batch", "retrieval_vs_batch", "early_loss", "instability"]

if __name__ == "__main__":
    sys.exit(recipe_main(None, FIGURES, Path(__file__).parent, __doc__))
