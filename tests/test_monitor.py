"""Drift monitoring: a planted distribution shift is detected, a same-distribution control is not; no text is kept."""

import json
import random

from llmstack.monitor import TrafficProfile, compare, profile_texts, write_report

EN = ("please write a short story about the weather and explain how people feel when the day is long and the "
      "evening comes with rain over the quiet town near the river").split()
FR = ("bonjour je voudrais savoir comment les prix de la maison ont changé depuis l'année dernière et pourquoi "
      "le gouvernement a décidé de modifier les impôts pour les familles").split()


def english(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(EN) for _ in range(rng.randint(6, 30))) + "?" for _ in range(n)]


def shifted(rng: random.Random, n: int) -> list[str]:
    """Longer French prompts full of numbers: language, length and digit share all move."""
    return [" ".join(rng.choice(FR) if rng.random() < 0.7 else str(rng.randint(1000, 99999))
                     for _ in range(rng.randint(80, 200))) for _ in range(n)]


def test_planted_shift_detected_and_control_is_not(tmp_path):
    reference = profile_texts(english(random.Random(0), 400))
    control = compare(reference, profile_texts(english(random.Random(1), 300)))
    assert control["drift"] == [] and control["max_psi"] < 0.1, control["max_psi"]

    drift = compare(reference, profile_texts(shifted(random.Random(2), 300)))
    assert {"words", "digit_share", "language"} <= set(drift["drift"])
    assert drift["features"]["language"]["psi"] > 1.0

    report = write_report(drift, tmp_path / "monitor")
    assert "| language |" in report.read_text() and (tmp_path / "monitor" / "words.png").stat().st_size > 5000
    assert json.loads((tmp_path / "monitor" / "drift.json").read_text())["drift"] == drift["drift"]


def test_profile_keeps_counts_not_text():
    p = TrafficProfile()
    secret = "my password is hunter2 and my email is alice@example.com"
    p.observe(secret)
    dumped = json.dumps(p.to_json())
    assert "hunter2" not in dumped and "alice" not in dumped
    assert p.n == 1 and sum(p.counts["words"].values()) == 1
    again = TrafficProfile.from_json(json.loads(dumped))
    assert again.counts == p.counts and again.n == 1
