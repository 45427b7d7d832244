"""`llmstack route …`: read and change a running server's canary/shadow routes (needs an admin key).

    llmstack route show
    llmstack route set assistant --primary v1 --canary v2 --percent 10 --shadow v3
    llmstack route rollback assistant          # one command back to the routing before the last change
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from llmstack.cli.common import Base, KeyEnv, admin_call

route_app = typer.Typer(no_args_is_help=True, help="Canary/shadow routes of a running server (admin key).")
@route_app.command()
def show(api_base: Base = "http://127.0.0.1:8000", api_key_env: KeyEnv = "LLMSTACK_ADMIN_KEY"):
    """Print the current routes."""
    print(json.dumps(admin_call("GET", f"{api_base}/admin/routes", api_key_env), indent=2))


@route_app.command("set")
def set_(name: Annotated[str, typer.Argument(help="public model name")],
         primary: Annotated[str, typer.Option(help="version that answers by default")],
         canary: Annotated[str | None, typer.Option(help="canary version")] = None,
         percent: Annotated[float, typer.Option(help="share of traffic for the canary")] = 10.0,
         shadow: Annotated[str | None, typer.Option(help="version that gets a copy of each request")] = None,
         api_base: Base = "http://127.0.0.1:8000", api_key_env: KeyEnv = "LLMSTACK_ADMIN_KEY"):
    """Set a route (the previous one is kept for rollback)."""
    body = {"primary": primary, **({"canary": {"model": canary, "percent": percent}} if canary else {}),
            **({"shadow": shadow} if shadow else {})}
    print(json.dumps(admin_call("PUT", f"{api_base}/admin/routes/{name}", api_key_env, body)[name], indent=2))


@route_app.command()
def rollback(name: Annotated[str, typer.Argument(help="public model name")],
             api_base: Base = "http://127.0.0.1:8000", api_key_env: KeyEnv = "LLMSTACK_ADMIN_KEY"):
    """Put back the routing this name had before its last change."""
    routes = admin_call("POST", f"{api_base}/admin/routes/{name}/rollback", api_key_env)
    print(json.dumps(routes.get(name, "(no route: the name serves the model of that name)"), indent=2))
