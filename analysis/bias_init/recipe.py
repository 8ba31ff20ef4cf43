"""Bias and temperature init (SigLIP §3.2, §4.6, plus no-bias and b = −log B): final accuracy over
the init grid as a heatmap, early training loss per init, and the traces of t and b.

    scalestudy run studies/bias_init.yaml --out /tmp/studies
    python analysis/bias_init/recipe.py /tmp/studies/bias_init
"""

import sys
from pathlib import Path

from scalestudy.analysis.report import recipe_main

FIGURES = ["init_sensitivity", "early_loss", "accuracy_vs_batch", "traces"]

if __name__ == "__main__":
    sys.exit(recipe_main(None, FIGURES, Path(__file__).parent, __doc__))
