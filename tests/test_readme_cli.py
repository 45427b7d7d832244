"""The README shows every CLI verb with an example: a verb added without one fails here, so the README stays true."""

import re
from pathlib import Path

from llmstack.cli import app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def verbs() -> list[tuple[str | None, str]]:
    out = [(None, c.name or c.callback.__name__) for c in app.registered_commands]
    for g in app.registered_groups:
        out += [(g.name, (c.name or c.callback.__name__).replace("_", "-"))
                for c in g.typer_instance.registered_commands]
    return out


def test_every_cli_verb_has_an_example_in_the_readme():
    missing = []
    for group, verb in verbs():
        if group is None:
            ok = re.search(rf"`llmstack {re.escape(verb)}\b", README)
        else:  # in a line that shows `llmstack GROUP ...`: "llmstack GROUP VERB", "GROUP VERB" or "`VERB ..."
            lines = [x for x in README.splitlines() if f"llmstack {group}" in x]
            ok = any(re.search(rf"{group} {re.escape(verb)}\b|`{re.escape(verb)}\b|/ {re.escape(verb)}\b", x)
                     for x in lines)
        if not ok:
            missing.append(f"{group} {verb}" if group else verb)
    assert not missing, f"no README example for: {', '.join(missing)}"
    assert len(verbs()) > 20  # the walk saw the whole command tree
