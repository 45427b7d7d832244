"""`accelerate launch [--config_file recipes/accelerate/X.yaml] -m llmstack.cli.launch recipes/R.yaml --stage sft`

Runs one training stage of a recipe inside the run folder runs/<recipe>/<run id>/, on however many processes
accelerate started. One process: this is `llmstack run R.yaml --only <earlier stages> --only <stage>` (earlier stages
run or are reused as usual). Several processes: every rank builds the same stage context from the manifest (the
earlier stages must be done: run them first with `llmstack run`), all ranks train, rank 0 records the result with
the pipeline's own fingerprint, so the next `llmstack run` reuses the stage.

The documented name of the launched worker (llmstack/worker.py), which does all of the above.
"""

from __future__ import annotations

import sys

from llmstack.worker import main as worker_main


def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, prog="python -m llmstack.cli.launch")


if __name__ == "__main__":
    sys.exit(main())
