"""What both registry stores share: the error type and the URL schemes that pick the MLflow store."""

from __future__ import annotations

MLFLOW_SCHEMES = ("mlflow://", "mlflow+https://")


class RegistryError(Exception):
    pass
