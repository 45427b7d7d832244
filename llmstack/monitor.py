"""Drift monitoring: compare what users send a deployed model with what it was trained on.

Privacy first: the server never stores prompts for this. `TrafficProfile.observe(text)` turns a prompt into a few
coarse features and only increments bin counters — prompt length, share of digits, code-likeness, and language (via
py3langid) — so a profile is a small JSON of counts. The training side's profile is built the same way from the
curated dataset's user turns (`profile_dataset`). `compare` scores each feature with PSI (population stability
index, the standard drift score on binned data) and a KS statistic on the binned CDF, and flags features past the
thresholds. `llmstack monitor` writes the report with plots; Prometheus alert rules in serve/alerts.yaml fire on the
`llmstack_drift_psi` gauge the server exports.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fixed bin edges (not quantiles of the reference) so a server can bin live traffic without knowing the reference.
NUMERIC_BINS: dict[str, list[float]] = {
    "words": [0, 4, 8, 16, 32, 64, 128, 256, 512, 1024, math.inf],
    "digit_share": [0, 0.001, 0.02, 0.05, 0.1, 0.2, 0.5, math.inf],
    "code_share": [0, 0.001, 0.01, 0.03, 0.06, 0.1, math.inf],
}
TOP_LANGUAGES = ["en", "zh", "es", "fr", "de", "ru", "ja", "pt", "it", "ko", "ar"]
CODE_CHARS = re.compile(r"[{}()\[\];=<>_/\\|`$#]")

PSI_ALERT = 0.25  # conventional: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 significant shift
PSI_WARN = 0.1


def features(text: str) -> dict[str, Any]:
    import py3langid

    words = len(text.split())
    chars = max(len(text), 1)
    lang = py3langid.classify(text)[0] if text.strip() else "none"
    return {"words": words, "digit_share": sum(c.isdigit() for c in text) / chars,
            "code_share": len(CODE_CHARS.findall(text)) / chars,
            "language": lang if lang in TOP_LANGUAGES else "other"}


def _bin(value: float, edges: list[float]) -> int:
    for i in range(len(edges) - 1):
        if edges[i] <= value < edges[i + 1]:
            return i
    return len(edges) - 2


@dataclass
class TrafficProfile:
    """Bin counters per feature. Thread-safe; `to_json`/`from_json` round-trip; no text is ever kept."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    n: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def observe(self, text: str) -> None:
        f = features(text)
        with self._lock:
            self.n += 1
            for name, edges in NUMERIC_BINS.items():
                key = str(_bin(f[name], edges))
                self.counts.setdefault(name, {}).setdefault(key, 0)
                self.counts[name][key] += 1
            lang = self.counts.setdefault("language", {})
            lang[f["language"]] = lang.get(f["language"], 0) + 1

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {"n": self.n, "bins": {k: [str(e) for e in v] for k, v in NUMERIC_BINS.items()},
                    "counts": json.loads(json.dumps(self.counts))}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrafficProfile:
        return cls(counts={k: dict(v) for k, v in data["counts"].items()}, n=data["n"])


def profile_texts(texts: Iterable[str]) -> TrafficProfile:
    p = TrafficProfile()
    for t in texts:
        p.observe(t)
    return p


def profile_dataset(dataset_dir: str | Path, split: str = "train") -> TrafficProfile:
    """The reference profile of a curated dataset: user turns of `messages`, prompts of `preference`, or `text`."""
    from datasets import load_from_disk

    ds = load_from_disk(str(dataset_dir))[split]

    def prompts():
        for row in ds:
            if "messages" in row:
                yield from (m["content"] for m in row["messages"] if m["role"] == "user")
            elif "prompt" in row:
                p = row["prompt"]
                yield p if isinstance(p, str) else next((m["content"] for m in p if m["role"] == "user"), "")
            else:
                yield row["text"]

    return profile_texts(prompts())


def _dist(counts: dict[str, int], keys: list[str], eps: float = 1e-4) -> list[float]:
    total = sum(counts.get(k, 0) for k in keys) or 1
    raw = [counts.get(k, 0) / total for k in keys]
    smoothed = [max(p, eps) for p in raw]  # PSI is undefined for empty bins: the usual small floor
    s = sum(smoothed)
    return [p / s for p in smoothed]


def psi(ref: list[float], live: list[float]) -> float:
    return sum((b - a) * math.log(b / a) for a, b in zip(ref, live))


def ks_binned(ref: list[float], live: list[float]) -> float:
    """Largest gap between the two binned CDFs (KS on binned data: a lower bound of the raw-sample statistic)."""
    ca = cb = gap = 0.0
    for a, b in zip(ref, live):
        ca, cb = ca + a, cb + b
        gap = max(gap, abs(ca - cb))
    return gap


def compare(reference: TrafficProfile, live: TrafficProfile, psi_alert: float = PSI_ALERT) -> dict[str, Any]:
    out: dict[str, Any] = {"reference_n": reference.n, "live_n": live.n, "features": {}}
    for name in [*NUMERIC_BINS, "language"]:
        r, l_ = reference.counts.get(name, {}), live.counts.get(name, {})
        if name in NUMERIC_BINS:
            keys = [str(i) for i in range(len(NUMERIC_BINS[name]) - 1)]
        else:
            keys = sorted(set(r) | set(l_))
        pr, pl = _dist(r, keys), _dist(l_, keys)
        score = psi(pr, pl)
        out["features"][name] = {
            "psi": round(score, 4), "ks": round(ks_binned(pr, pl), 4) if name in NUMERIC_BINS else None,
            "status": "drift" if score > psi_alert else "watch" if score > PSI_WARN else "stable",
            "bins": keys, "reference": [round(x, 4) for x in pr], "live": [round(x, 4) for x in pl]}
    out["max_psi"] = max(f["psi"] for f in out["features"].values())
    out["drift"] = [k for k, f in out["features"].items() if f["status"] == "drift"]
    return out


def write_report(result: dict[str, Any], out_dir: str | Path) -> Path:
    """report.md + one PNG per feature (reference vs live bin shares) + drift.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps(result, indent=2))
    lines = ["# Drift report", "", f"Reference rows: {result['reference_n']}; live requests: {result['live_n']}. "
             f"PSI > {PSI_ALERT} = drift, > {PSI_WARN} = watch.", "",
             "| feature | PSI | KS (binned) | status |", "|---|---|---|---|"]
    for name, f in result["features"].items():
        ks = "" if f["ks"] is None else f"{f['ks']:.3f}"
        lines.append(f"| {name} | {f['psi']:.3f} | {ks} | {f['status']} |")
        fig, ax = plt.subplots(figsize=(6, 2.6))
        x = range(len(f["bins"]))
        ax.bar([i - 0.2 for i in x], f["reference"], width=0.4, label="training data")
        ax.bar([i + 0.2 for i in x], f["live"], width=0.4, label="live traffic")
        labels = f["bins"] if name == "language" else _edge_labels(NUMERIC_BINS[name])
        ax.set_xticks(list(x), labels, rotation=45, fontsize=7)
        ax.set_title(f"{name}: PSI {f['psi']:.3f} ({f['status']})", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=90)
        plt.close(fig)
        lines.append("")
    lines += [""] + [f"![{n}]({n}.png)" for n in result["features"]]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _edge_labels(edges: list[float]) -> list[str]:
    return [f"{edges[i]:g}–{edges[i + 1]:g}" for i in range(len(edges) - 1)]


def load_profile(source: str, api_key: str | None = None) -> TrafficProfile:
    """A profile from a JSON file, a curated dataset folder, or a running server's /v1/monitor/profile URL."""
    if source.startswith(("http://", "https://")):
        import urllib.request

        req = urllib.request.Request(source, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return TrafficProfile.from_json(json.loads(r.read()))
    path = Path(source)
    if path.is_dir():
        return profile_dataset(path)
    if path.is_file():
        return TrafficProfile.from_json(json.loads(path.read_text()))
    raise FileNotFoundError(f"{source}: not a profile JSON, a curated dataset folder, or a URL")
