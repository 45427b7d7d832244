"""The launch entry moved: `python -m llmstack.train` says where, in one line, and exits 1."""

import sys

sys.exit("llmstack.train is not a launch entry any more: use "
         "`accelerate launch [--config_file ...] -m llmstack.cli.launch RECIPE --stage NAME` (same arguments)")
