"""The server keeps a privacy-safe profile of live prompts and exports drift against the training data to Prometheus;
`llmstack monitor` reads the profile from the live server."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

from fastapi.testclient import TestClient

from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
from llmstack.monitor import profile_texts
from llmstack.serve.app import build_app
from llmstack.serve.engines import HfEngine
from llmstack.serve.guard import hash_key
from tests.test_monitor import english, shifted

KEY = "sk-llmstack-drift-test"
H = {"Authorization": f"Bearer {KEY}"}


def psi_lines(text: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r'llmstack_drift_psi\{feature="(\w+)"\} ([0-9.e+-]+)', text)}


def test_live_profile_and_drift_gauge(tiny_model, tmp_path):
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps(profile_texts(english(random.Random(0), 300)).to_json()))
    spec = ServeSpec(engine="hf", max_model_len=512, drift_reference=str(reference), drift_min_requests=20)
    keys = KeyFile.model_validate({"keys": [{"id": "t", "sha256": hash_key(KEY)}]})
    policy = GuardPolicy.model_validate({"rate_limits": {"requests_per_minute": 10_000},
                                         "caps": {"max_tokens": 8, "default_max_tokens": 1}})
    with TestClient(build_app(HfEngine(tiny_model, "tiny", max_model_len=512), spec, policy, keys)) as c:
        def ask(text):
            r = c.post("/v1/chat/completions", headers=H, json={
                "model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": text}]})
            assert r.status_code == 200, r.text

        for text in english(random.Random(1), 25):
            ask(text)
        assert psi_lines(c.get("/metrics", headers=H).text)["language"] < 0.1  # same distribution: no drift
        profile = c.get("/v1/monitor/profile", headers=H).json()
        assert profile["n"] == 25 and "weather" not in json.dumps(profile)  # counts only, never the text
        assert c.get("/v1/monitor/profile").status_code == 401

        for text in shifted(random.Random(2), 60):
            ask(text[:450])
        psi = psi_lines(c.get("/metrics", headers=H).text)
        assert psi["language"] > 0.25 and psi["words"] > 0.25  # the alert rule's threshold

        (tmp_path / "live.json").write_text(json.dumps(c.get("/v1/monitor/profile", headers=H).json()))
    proc = subprocess.run([sys.executable, "-m", "llmstack", "monitor", "--reference", str(reference),
                           "--live", str(tmp_path / "live.json"), "--out", str(tmp_path / "report")],
                          capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr  # drift found
    assert "language" in proc.stdout and (tmp_path / "report" / "report.md").exists()
