"""A training stage's `args`, checked against TRL's own config class before any model loads: unknown names (with a
did-you-mean), values of the wrong type, then TRL's __post_init__ checks (`check_trainer_args`).

Importing a TRL config class costs seconds: transformers' training_args pulls in peft, bitsandbytes, scikit-learn and
torch's compiler, longer than everything else `llmstack validate` does. The answer for one stage kind's arguments
depends only on those arguments, the installed packages, this module and the environment variables TrainingArguments
reads, so it is remembered under the cache root (`trainer-checks/`), keyed by all of them: a recipe whose stages were
checked before, here, is answered without importing trl. Arguments the key cannot spell exactly (a YAML date, a
mapping with non-text keys) are always checked afresh.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from llmstack.config.base import did_you_mean
from llmstack.config.kinds import stage_kind
from llmstack.paths import cache_root

# What a check's answer depends on besides the arguments: these packages' versions and the environment variables
# TrainingArguments.__post_init__ reads (accelerate's launch settings, torchelastic, FSDP, visible GPUs).
PACKAGES = ("trl", "transformers", "torch", "accelerate", "peft")
ENVIRONMENT = ("ACCELERATE_", "FSDP_", "TORCHELASTIC_", "CUDA_VISIBLE_DEVICES")


def trl_config_class(stage_type: str):
    """TRL's config class for a stage type, as its registry entry names it (imported lazily: trl takes seconds to
    import): a name in `trl`, or "module:Class" (trl.experimental, whose import warning is silenced: the docs' method
    table says which kinds are experimental upstream).

    Importing trl imports bitsandbytes, whose CPU backend logs "Failed to load CPU gemm_4bit_forward from
    kernels-community" on AVX512-BF16 machines without the optional `kernels` package: noise in front of
    `llmstack validate`'s answer, so that logger is quiet while trl is first imported (training that uses the
    kernel is unaffected: it falls back to bitsandbytes' own CPU code either way)."""
    import importlib
    import warnings

    # An experimental package imports its trainer, and with it TRL's vLLM client: vLLM's import-time log lines and
    # TRL's vLLM-version warnings concern generation, not the arguments being checked.
    noisy = [logging.getLogger(n) for n in ("bitsandbytes", "vllm")]
    levels = [logger.level for logger in noisy]
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    name = stage_kind(stage_type).trl_config
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
            if ":" in name:
                module, cls = name.split(":")
                os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
                return getattr(importlib.import_module(module), cls)
            import trl

            # trl is a lazy module: the classes (and bitsandbytes) are imported on first attribute access
            return getattr(trl, name)
    finally:
        for logger, level in zip(noisy, levels):
            logger.setLevel(level)


# Keys llmstack sets itself from other parts of the recipe; a user setting them in `args` would be ignored or conflict.
RESERVED_ARGS = {"output_dir"}


def check_trainer_args(stage_type: str, args: dict[str, Any]) -> list[tuple[str, str]]:
    """Problems with `args` as (key, message) pairs: unknown names first, then TRL's own validation; the remembered
    answer where the same check ran before under the same packages and environment (see the module's docstring)."""
    key = cache_key(stage_type, args)
    remembered = cache_root() / "trainer-checks" / f"{key}.json" if key else None
    if remembered is not None:
        try:
            return [(str(k), str(msg)) for k, msg in json.loads(remembered.read_text())]
        except (OSError, ValueError, TypeError):
            pass  # not checked yet, or a torn/foreign file: check again and rewrite it
    problems = _check(stage_type, args)
    if remembered is not None:
        try:
            remembered.parent.mkdir(parents=True, exist_ok=True)
            partial = remembered.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(problems))
            partial.replace(remembered)  # atomic: a concurrent reader sees the whole answer or none
        except OSError:
            pass  # a read-only cache only costs the next check its time
    return problems


def cache_key(stage_type: str, args: dict[str, Any]) -> str | None:
    """The check's identity as a hex digest, or None where the arguments have no exact JSON spelling."""
    if not _plain(args):
        return None
    identity = {"kind": stage_type, "config": stage_kind(stage_type).trl_config, "args": args,
                "environment": {k: v for k, v in os.environ.items() if k.startswith(ENVIRONMENT)}, **_installed()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@functools.cache
def _installed() -> dict[str, Any]:
    """The key's parts that hold for the whole process (a sweep's check asks for the key once per value and stage)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"packages": versions, "python": sys.version, "machine": platform.machine(),
            "checker": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}


def _plain(value: Any) -> bool:
    """JSON spells it exactly (JSON would turn a tuple into a list, an int key into text, a date into an error)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _check(stage_type: str, args: dict[str, Any]) -> list[tuple[str, str]]:
    cls = trl_config_class(stage_type)
    name = stage_kind(stage_type).trl_config_name
    known = [f.name for f in fields(cls) if f.init]
    problems = []
    for key in args:
        if key in RESERVED_ARGS:
            problems.append((key, "set by llmstack (the run directory decides it); remove it"))
        elif key not in known:
            problems.append((key, f"not an argument of {name}{did_you_mean(key, known)}"))
    problems += _type_problems(cls, args)
    if problems:
        return problems
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # The CPU-safe device defaults keep TRL's checks from failing on a machine without bf16/CUDA.
            cls(output_dir=tmp, **{"use_cpu": True, "bf16": False, **args})
        except Exception as exc:  # TRL/transformers raise ValueError, TypeError or ImportError here
            problems.append(("", f"{name} rejected these arguments: {exc}"))
    return problems


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys("null" if a is type(None) else _type_name(a) for a in args))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _type_problems(cls, args: dict[str, Any]) -> list[tuple[str, str]]:
    """TRL's config classes are dataclasses that do not check types (`max_steps: "ten"` constructs fine and fails
    hours later, or never): check each value against the field's annotation, strictly (no "10" -> 10), the way the
    trainer will use it. A YAML pitfall gets its own hint: `5e-4` without a dot is text to YAML 1.1."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation we cannot resolve: TRL's own checks still run
        return []
    problems = []
    for key, value in args.items():
        hint = hints.get(key)
        if hint is None:
            continue
        try:
            adapter = TypeAdapter(hint)
        except Exception:  # noqa: BLE001 - a type pydantic cannot build a validator for (a callable, a class)
            continue
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError:
            hint_text = ""
            if isinstance(value, str) and _looks_like_float(value):
                hint_text = f" (YAML reads {value} as text: write it with a dot, e.g. {_dotted(value)})"
            problems.append((key, f"must be {_type_name(hint)}, got {value!r}{hint_text}"))
    return problems


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _dotted(text: str) -> str:
    mantissa, _, exponent = text.lower().partition("e")
    return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}" if exponent else text
