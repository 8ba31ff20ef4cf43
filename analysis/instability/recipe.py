"""Instability (SigLIP §4.4; Wortsman et al. 2023, §3): loss-spike and grad-norm-spike rates per
arm, each swept knob (LR, β2, optimizer, loss) against the spike rate and the collapse fraction,
the update RMS around spike onsets and how well it predicts them against shuffled spike times,
and every trial's loss and grad norm with its spikes marked.

    scalestudy run studies/instability.yaml --out /tmp/studies
    python analysis/instability/recipe.py /tmp/studies/instability
"""

import sys
from pathlib import Path

from scalestudy.analysis.report import recipe_main

FIGURES = ["instability", "instability_knobs", "training_curves", "traces"]
# Drawn only when some trial had a loss spike after warm-up and recorded the update RMS.
NO_SPIKES = "no trial had a loss spike that the update RMS could be related to"
OPTIONAL = {"spike_rms": NO_SPIKES, "spike_prediction": NO_SPIKES}

if __name__ == "__main__":
    sys.exit(recipe_main(None, FIGURES, Path(__file__).parent, __doc__, optional=OPTIONAL))
