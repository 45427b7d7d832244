"""Print, as `uv pip install` arguments, the package sources and constraints pip would use here.

The Makefile installs the locks with uv, but uv reads neither pip.conf nor the PIP_* variables. On a machine whose pip
is configured with a local wheel folder or an extra index (a mirror, a folder holding torch's `+cpu` build), uv would
otherwise look on PyPI alone and miss files pip finds. So uv gets pip's effective settings: the index, the extra
indexes, the find-links folders and the constraint files.

The two installers pick a pin's file differently. pip pools every file of that version from every source and takes the
best-tagged one; uv (even with `--index-strategy unsafe-best-match`, which lets it look past the first index that knows
a name) takes a version's files from the first index that has that version only. A partial local mirror listing only
`multiprocess-…-py310-none-any.whl` then wins over PyPI's `py311` wheel that pip installs. So pip's main index goes
first (`--index`, highest priority) and the extra indexes after it: where the main index is a superset of the mirrors,
as PyPI is, uv takes the file pip takes, and a pin only a mirror or a find-links folder holds is still found.

pip has no public API for its effective options (`pip config list` prints each file's raw values, not which one wins
over the environment), so this asks pip's own option parser, exactly as `pip install` would read them.

    .venv/bin/python scripts/pip_sources_for_uv.py   # e.g. … --index https://pypi.org/simple --find-links /opt/wheels …
"""

from __future__ import annotations

from pip._internal.commands import create_command


def uv_arguments() -> list[str]:
    """The `uv pip install` arguments for the sources and constraints `pip install` would use in this environment."""
    options, _ = create_command("install").parse_args([])
    args = ["--index-strategy", "unsafe-best-match"]
    if options.no_index:
        args.append("--no-index")
    else:
        for url in [options.index_url, *options.extra_index_urls]:  # earlier --index entries take priority in uv
            args += ["--index", url]
        args += ["--default-index", options.index_url]
    for location in options.find_links:
        args += ["--find-links", location]
    for path in options.constraints:
        args += ["--constraint", path]
    return args


if __name__ == "__main__":
    print(" ".join(uv_arguments()))  # the Makefile splits the words on spaces
