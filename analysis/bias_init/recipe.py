"""Bias and temperature init (SigLIP §3.2, §4.6, plus no-bias and b = −log B): final accuracy over
the init grid as a heatmap, accuracy over training, and the loss, t and b per setting with the
no-learning loss marked.

    scalestudy run studies/bias_init.yaml --out /tmp/studies
    python analysis/bias_init/recipe.py /tmp/studies/bias_init
"""

import sys
from pathlib import Path

from scalestudy.analysis.report import recipe_main

FIGURES = ["init_sensitivity", "accuracy_vs_steps", "training_curves", "accuracy_vs_batch"]

if __name__ == "__main__":
    sys.exit(recipe_main(None, FIGURES, Path(__file__).parent, __doc__))
