"""`llmstack` — the command line. One module per verb group in this package, each a thin wrapper over a library
function; this file only puts them on the `llmstack` command. Errors a user can fix are printed as plain lines
(exit 2 for a bad recipe or argument, 1 for other failures), never as a traceback.

    run.py       validate, run                 curate.py   curate
    train.py     train (launch.py: the `accelerate launch -m llmstack.cli.launch` entry)
    eval.py      eval, eval prepare            quantize.py quantize
    serve.py     serve, serve-key              chat.py     chat
    models.py    models fetch|convert|list     registry.py registry …
    route.py     route show|set|rollback       monitor.py  monitor
    adapters.py  adapters list|load|unload    export.py   export gguf
    usage.py     usage                         card.py     card
    generate.py  generate (batch generation over a dataset)
    sweep.py     sweep
"""

from __future__ import annotations

import sys

import typer

from llmstack.cli import (
    adapters,
    card,
    chat,
    curate,
    export,
    generate,
    models,
    monitor,
    quantize,
    registry,
    route,
    run,
    serve,
    sweep,
    train,
    usage,
)
from llmstack.cli import eval as eval_verbs

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="One YAML recipe from data curation to a guarded OpenAI-compatible endpoint.")
app.command()(run.validate)
app.command()(run.run)
app.command()(sweep.sweep)
app.command()(curate.curate)
app.command()(train.train)
app.add_typer(eval_verbs.eval_app, name="eval")
app.command()(quantize.quantize)
app.add_typer(export.export_app, name="export")
app.command()(serve.serve)
app.command("serve-key")(serve.serve_key)
app.command()(chat.chat)
app.command()(generate.generate)
app.add_typer(models.models_app, name="models")
app.add_typer(registry.registry_app, name="registry")
app.command()(card.card)
app.add_typer(route.route_app, name="route")
app.add_typer(adapters.adapters_app, name="adapters")
app.command()(usage.usage)
app.command()(monitor.monitor)


def main() -> None:  # pragma: no cover - entry for `python -m llmstack`
    app(prog_name="llmstack")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
