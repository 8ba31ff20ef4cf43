"""Batch scaling (SigLIP Fig. 2): zero-shot accuracy and retrieval against batch size per loss,
with seed CIs and saturating power-law fits, plus instability and per-trial traces.

    scalestudy run studies/batch_scaling.yaml --out /tmp/studies
    python analysis/batch_scaling/recipe.py /tmp/studies/batch_scaling
"""

import sys
from pathlib import Path

from scalestudy.analysis.report import recipe_main

FIGURES = ["accuracy_vs_batch", "retrieval_vs_batch", "instability", "traces"]

if __name__ == "__main__":
    sys.exit(recipe_main(None, FIGURES, Path(__file__).parent, __doc__))
