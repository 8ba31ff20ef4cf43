"""Adam beta2 and stability (SigLIP §4.4): spike rate, worst spike and divergence against batch
size per loss and beta2, final accuracy, and the per-trial grad-norm / Adam-staleness traces.

    scalestudy run studies/beta2_stability.yaml --out /tmp/studies
    python analysis/beta2_stability/recipe.py /tmp/studies/beta2_stability
"""

import sys
from pathlib import Path

from scalestudy.analysis.report import recipe_main

FIGURES = ["instability", "accuracy_vs_batch", "traces"]

if __name__ == "__main__":
    sys.exit(recipe_main(None, FIGURES, Path(__file__).parent, __doc__))
