"""From a server YAML to a running app: load the server config, the guard policy and the key file, and build the
engine and the guarded API (`llmstack serve` runs the result under uvicorn)."""

from __future__ import annotations

import logging
from pathlib import Path

from llmstack.config.serve import ConfigError, GuardPolicy, KeyFile, ServeSpec, load_yaml_model

log = logging.getLogger("llmstack.serve")


def load_spec(config: Path | None, **overrides) -> ServeSpec:
    spec = load_yaml_model(config, ServeSpec) if config else ServeSpec()
    base = config.parent if config else Path(".")
    data = spec.model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    spec = ServeSpec.model_validate(data)
    if config:  # file paths inside a server YAML are relative to that YAML
        for name in ("guard", "keys", "audit_log"):
            value = getattr(spec, name)
            if value and name not in {k for k, v in overrides.items() if v is not None} \
                    and not Path(value).is_absolute():
                setattr(spec, name, str(base / value))
    return spec


def build_from_spec(spec: ServeSpec, model_path: Path | None = None):
    """(app, engine) for a spec: resolves the model, reads guard + keys. Raises ConfigError for unusable input."""
    from llmstack.models import ModelSourceError, resolve
    from llmstack.serve.app import build_app
    from llmstack.serve.engines import make_engine

    if model_path is None:
        if not spec.model:
            raise ConfigError("no model to serve: pass --model (a model folder or packaged name) or set `model:`")
        try:
            model_path = resolve(spec.model)
        except ModelSourceError as exc:
            raise ConfigError(str(exc)) from None
    for name, path in spec.adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"adapters.{name}: {path} has no adapter_config.json (not a PEFT LoRA adapter folder)")
    if not spec.keys:
        raise ConfigError("no API keys: pass --keys serve/keys.yaml (make a key with `llmstack serve-key NAME`)")
    keys = load_yaml_model(spec.keys, KeyFile)
    policy = load_yaml_model(spec.guard, GuardPolicy) if spec.guard else GuardPolicy()
    name = spec.served_model_name or Path(model_path).name
    engine = make_engine(spec, model_path, name)
    return build_app(engine, spec, policy, keys), engine
