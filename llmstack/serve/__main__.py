"""`python -m llmstack.serve --config server.yaml`: the guarded API under uvicorn, from a server YAML alone.

What `llmstack serve --config server.yaml` runs, without the command line on top: the entry that code below the CLI
starts a server with (the pipeline's serve stage, llmstack/stages/serve.py), so no lower layer runs
`python -m llmstack ...`. Errors a user can fix are one line on stderr and exit 2, as from `llmstack serve`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmstack.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="server YAML, e.g. serve/server.yaml")
    a = parser.parse_args(argv)

    from pydantic import ValidationError

    from llmstack.config.base import format_errors
    from llmstack.config.serve import ConfigError, ServeSpec
    from llmstack.serve.server import build_from_spec, load_spec, run_server

    try:
        spec = load_spec(a.config)
        app, _ = build_from_spec(spec)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        for line in format_errors(exc, ServeSpec):
            print(f"error: {line}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_server(app, spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
