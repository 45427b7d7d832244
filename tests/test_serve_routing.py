"""Canary/shadow routing table: the split matches the configured share, users stick to a side, rollback restores."""

import uuid

import pytest
from pydantic import ValidationError

from llmstack.serve.routing import Route, Router


def make(percent=10.0, shadow=None) -> Router:
    return Router({"assistant": Route.model_validate(
        {"primary": "v1", "canary": {"model": "v2", "percent": percent}, "shadow": shadow})})


def test_canary_share_within_tolerance():
    r = make(10)
    n = 5000
    canary = sum(r.pick("assistant", uuid.uuid4().hex)[1] == "canary" for _ in range(n))
    # binomial sd at p=0.1, n=5000 is ~21 requests; 4 sd either side
    assert abs(canary - 500) < 90, canary
    assert sum(make(0).pick("assistant", uuid.uuid4().hex)[1] == "canary" for _ in range(500)) == 0
    assert sum(make(100).pick("assistant", uuid.uuid4().hex)[1] == "canary" for _ in range(500)) == 500


def test_users_stick_to_one_side_and_unrouted_names_pass_through():
    r = make(50)
    for user in ("alice", "bob", "carol", "dave"):
        sides = {r.pick("assistant", user) for _ in range(20)}
        assert len(sides) == 1
    assert r.pick("other-model", "alice") == ("other-model", "primary", None)


def test_shadow_is_named_for_every_request():
    r = make(10, shadow="v3")
    assert {r.pick("assistant", uuid.uuid4().hex)[2] for _ in range(50)} == {"v3"}
    assert r.targets() == {"v1", "v2", "v3"}


def test_rollback_restores_previous_routing():
    r = make(10)
    before = r.snapshot()
    r.set("assistant", Route.model_validate({"primary": "v2"}))  # promote the canary
    assert r.pick("assistant", "alice") == ("v2", "primary", None)
    r.rollback("assistant")
    assert r.snapshot() == before
    with pytest.raises(KeyError, match="no earlier version"):
        r.rollback("assistant")


def test_bad_routes_are_rejected():
    with pytest.raises(ValidationError, match="canary must be another version"):
        Route.model_validate({"primary": "v1", "canary": {"model": "v1", "percent": 5}})
    with pytest.raises(ValidationError):
        Route.model_validate({"primary": "v1", "canary": {"model": "v2", "percent": 150}})
