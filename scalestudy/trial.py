"""The one trial entry point every executor calls: `python -m scalestudy.trial TRIAL_DIR`.

Exit status: 0 done or diverged (both are results), 1 failed (traceback in state.json),
3 preempted (checkpoint saved; running it again resumes).
"""

from __future__ import annotations

import argparse
import sys
import traceback

from scalestudy.errors import Preempted
from scalestudy.executors.process import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scalestudy.trial", description=__doc__)
    parser.add_argument("trial_dir", help="RUN_DIR/trials/<id>, holding config.json")
    parser.add_argument("--backend", default="local", help="recorded in state.json")
    args = parser.parse_args(argv)
    # Imported here: torch takes a second to import, and `--help` should not wait for it.
    from scalestudy.train.loop import run_trial

    try:
        run_trial(args.trial_dir, backend=args.backend)
    except Preempted as stopped:
        print(f"preempted: {stopped}", file=sys.stderr)
        return EXIT_PREEMPTED
    except Exception:  # noqa: BLE001 - already recorded as failed in state.json with the traceback
        traceback.print_exc()
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
