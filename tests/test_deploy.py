"""The deployment reference an operator copies (serve/deploy/): the Kubernetes manifest is schema-checked offline with
kubernetes-validate (it ships the API schemas; strict: unknown fields are errors), and its wiring is checked against
what `llmstack serve` reads: the mounted server.yaml and guard.yaml load and build a server, every replica points at
the one redis Service for routes and rate limits, ports and probes line up. No cluster runs here: validated, not run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "serve" / "deploy" / "kubernetes.yaml"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes minor still in upstream support when this was written


def objects() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}


def test_every_object_passes_the_kubernetes_schema_strictly():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in requirements/main.lock")
    objs = objects()
    assert {k for k, _ in objs} == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                                    "PersistentVolumeClaim"}
    for obj in objs.values():
        kv.validate(obj, K8S_VERSION, strict=True)
    # the validator is live: a misspelt field in the pod template is an error, not ignored
    broken = copy.deepcopy(objs[("Deployment", "llmstack")])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health"}}
    with pytest.raises(kv.ValidationError, match="readinesProbe"):
        kv.validate(broken, K8S_VERSION, strict=True)


def test_the_mounted_config_is_one_llmstack_serve_accepts_and_replicas_share_one_redis(tmp_path, tiny_model):
    from llmstack.config.serve import GuardPolicy
    from llmstack.serve.app import PUBLIC_PATHS
    from llmstack.serve.guard import hash_key
    from llmstack.serve.server import build_from_spec, load_spec

    objs = objects()
    dep = objs[("Deployment", "llmstack")]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = objs[("ConfigMap", volumes["config"]["configMap"]["name"])]
    assert dep["spec"]["replicas"] >= 2

    # the command reads the ConfigMap's server.yaml where the volume puts it; materialize the volumes under tmp_path
    assert container["command"][:3] == ["llmstack", "serve", "--config"]
    config_path = Path(container["command"][3])
    assert config_path.parent == Path(mounts["config"]) and config_path.name in config_map["data"]
    root = tmp_path / "pod"
    for name, text in config_map["data"].items():
        (root / mounts["config"].lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / mounts["config"].lstrip("/") / name).write_text(text)
    spec = load_spec(root / config_path.relative_to("/"))
    guard_path = Path(spec.guard)
    assert guard_path.is_file(), f"guard {spec.guard} is not in the mounted ConfigMap"
    policy = GuardPolicy.model_validate(yaml.safe_load(guard_path.read_text()))

    # keys come from the Secret volume, at the path server.yaml names
    assert "secret" in volumes["keys"] and Path(spec.keys).parent == Path(mounts["keys"])
    # replicas agree only if routes and rate limits live in the one redis the manifest runs
    redis_svc = objs[("Service", "llmstack-redis")]
    redis = f"redis://{redis_svc['metadata']['name']}:{redis_svc['spec']['ports'][0]['port']}/0"
    assert spec.routes_store == redis and policy.rate_limits.storage == redis
    redis_pod = objs[("Deployment", "llmstack-redis")]["spec"]["template"]
    assert redis_svc["spec"]["selector"].items() <= redis_pod["metadata"]["labels"].items()

    # the Service reaches the port the server listens on, on all interfaces; probes need no key
    svc = objs[("Service", "llmstack")]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}[svc["spec"]["ports"][0]["targetPort"]]
    assert port == spec.port and spec.host == "0.0.0.0"
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in PUBLIC_PATHS
    # a SIGTERM'd replica finishes its requests before Kubernetes kills it
    assert pod["terminationGracePeriodSeconds"] > spec.drain_timeout_s + 5
    hpa = objs[("HorizontalPodAutoscaler", "llmstack")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "llmstack" and hpa["spec"]["minReplicas"] >= 2
    assert "cpu" in container["resources"]["requests"]  # CPU utilization is measured against the request

    # and `llmstack serve` builds a server from exactly this config (the model and keys swapped for test ones)
    keys = root / spec.keys.lstrip("/")
    keys.parent.mkdir(parents=True)
    keys.write_text(yaml.safe_dump({"keys": [{"id": "ops", "sha256": hash_key("sk-test-deploy"), "admin": True}]}))
    app, engine = build_from_spec(spec.model_copy(update={"model": str(tiny_model), "engine": "hf",
                                                         "keys": str(keys)}))
    assert engine.names == [spec.served_model_name] and app is not None
