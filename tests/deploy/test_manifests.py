"""deploy/ checked offline, without a cluster and without PyTorch.

- Every YAML document under deploy/ is something to apply: a kustomization, a resource that a
  kustomization lists, or a KServe InferenceService (applied with -f).
- The Kubernetes resources validate for Kubernetes 1.30, strictly (unknown fields refused), with
  kubernetes-validate's schemas; the TLS variant (the tls component) is rendered with
  `kubectl kustomize` where kubectl is installed, and validated too.
- The InferenceServices validate against KServe's CRD schema (tests/schemas/kserve/), strictly.
- What the manifests say about the server agrees with the server: ports, probes, grace, the
  NETWORK3_* variables, the image's tag and, where the Containerfile is here, its ENV and user.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30"
KSERVE_SCHEMA = ROOT / "tests" / "schemas" / "kserve" / "v0.20.0" / "inferenceservice-v1beta1.json"
KSERVE_API = "serving.kserve.io/v1beta1"
KUSTOMIZE_API = "kustomize.config.k8s.io/"
KUBECTL = shutil.which("kubectl")


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def is_kustomization(path: Path) -> bool:
    return path.name in ("kustomization.yaml", "kustomization.yml")


def is_kserve(doc: dict) -> bool:
    return doc.get("apiVersion") == KSERVE_API


def resources_in_files() -> list[dict]:
    """Every document under deploy/ but the kustomizations themselves."""
    return [d for p in yaml_files() if not is_kustomization(p) for d in load_docs(p)]


def k8s_resources(docs) -> list[dict]:
    return [d for d in docs if not is_kserve(d)]


def kustomize(directory: Path) -> list[dict]:
    if KUBECTL is None:
        pytest.skip("kubectl (with its kustomize) is not installed")
    r = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, f"kubectl kustomize {directory}: {r.stderr}"
    return [d for d in yaml.safe_load_all(r.stdout) if d is not None]


def base_files() -> list[dict]:
    (k,) = load_docs(DEPLOY / "kustomization.yaml")
    return [d for r in k["resources"] for d in load_docs(DEPLOY / r)]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    """What `kubectl apply -k deploy/` applies (its files, where kubectl is not installed)."""
    return kustomize(DEPLOY) if KUBECTL else base_files()


@pytest.fixture(scope="module")
def with_tls(tmp_path_factory) -> list[dict]:
    """deploy/ with the tls component, from an overlay as a user would write it (kustomize wants
    relative paths, and no overlay inside the base it names)."""
    overlay = tmp_path_factory.mktemp("overlay")
    rel = lambda p: os.path.relpath(p, overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(DEPLOY)], "components": [rel(DEPLOY / "tls")]}))
    return kustomize(overlay)


def one(docs, kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


# ---- every document is something to apply ----

def test_every_yaml_document_under_deploy_is_a_resource_to_apply():
    listed: set[Path] = set()
    for p in yaml_files():
        if is_kustomization(p):
            (k,) = load_docs(p)
            assert k["apiVersion"].startswith(KUSTOMIZE_API) and k["kind"] in ("Kustomization", "Component"), p
            listed |= {(p.parent / r).resolve() for r in k.get("resources", [])}
    assert yaml_files(), "no YAML under deploy/"
    for p in yaml_files():
        if is_kustomization(p):
            continue
        docs = load_docs(p)
        assert docs, f"{p}: no document"
        for d in docs:
            assert {"apiVersion", "kind", "metadata"} <= d.keys() and d["metadata"].get("name"), \
                f"{p}: a document that is not a resource"
            if is_kserve(d):
                assert d["kind"] == "InferenceService", p
            else:
                assert p.resolve() in listed, f"{p.relative_to(ROOT)}: {d['kind']} listed by no kustomization"


def test_kustomizations_name_only_what_exists_and_render():
    kustomizations = list(filter(is_kustomization, yaml_files()))
    for p in kustomizations:
        (k,) = load_docs(p)
        for entry in k.get("resources", []) + k.get("components", []):
            target = p.parent / entry
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{p}: {entry} does not exist"
        for patch in k.get("patches", []):
            assert "path" in patch or "patch" in patch, f"{p}: {patch}"
            if "path" in patch:
                assert (p.parent / patch["path"]).is_file(), f"{p}: {patch['path']} does not exist"
    for p in kustomizations:
        if load_docs(p)[0]["kind"] == "Kustomization":
            kustomize(p.parent)


def test_the_base_renders_what_its_files_hold(base):
    # Kustomize adds nothing (no name prefix or common labels to drift from the files' selectors).
    if KUBECTL is None:
        pytest.skip("kubectl (with its kustomize) is not installed")
    key = lambda d: (d["kind"], d["metadata"]["name"])
    assert sorted(base, key=key) == sorted(base_files(), key=key)


# ---- schemas ----

@pytest.mark.parametrize("doc", k8s_resources(resources_in_files()), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_resources_validate_strictly(doc):
    assert kv.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION


def test_the_tls_variant_validates_strictly(with_tls):
    for doc in with_tls:
        kv.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_refuses_a_misspelt_field():
    deployment = copy.deepcopy(one(resources_in_files(), "Deployment"))
    c = container(deployment)
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kv.ValidationError, match="readinesProbe"):
        kv.validate(deployment, K8S_VERSION, strict=True)


def strict(schema):
    """The CRD's schema as the API server applies it with strict field validation (kubectl's
    default since 1.27): an object with `properties` has no others, unless it says it keeps them."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (out.get("type") == "object" and isinstance(out.get("properties"), dict)
            and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def kserve_validator():
    schema = strict(json.loads(KSERVE_SCHEMA.read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def object_meta_validator():
    """Kubernetes' own ObjectMeta (the CRD's schema says only `type: object` of metadata)."""
    directory = f"kubernetes-json-schema/v{K8S_VERSION}.0-local-strict"
    schema = kv.schema_contents(f"{directory}/objectmeta-meta-v1.json", K8S_VERSION)
    definitions = Resource.from_contents(kv.schema_contents(f"{directory}/_definitions.json", K8S_VERSION))
    return jsonschema.Draft202012Validator(schema, registry=definitions @ Registry())


def inference_services() -> list[dict]:
    return [d for d in resources_in_files() if is_kserve(d)]


@pytest.mark.parametrize("doc", inference_services(), ids=lambda d: d["metadata"]["name"])
def test_inference_services_validate_against_kserves_crd_schema(doc, kserve_validator, object_meta_validator):
    kserve_validator.validate(doc)
    object_meta_validator.validate(doc["metadata"])


def test_the_kserve_schema_refuses_a_misspelt_field(kserve_validator):
    doc = copy.deepcopy(next(d for d in inference_services() if "containers" in d["spec"]["predictor"]))
    doc["spec"]["predictor"]["containers"][0]["prots"] = doc["spec"]["predictor"]["containers"][0].pop("ports")
    with pytest.raises(jsonschema.ValidationError, match="prots"):
        kserve_validator.validate(doc)


# ---- the manifests agree with the server ----

def serve_env_names() -> set[str]:
    """NETWORK3_<OPTION> for every option of `network3 serve` (its long name, upper case, - to _),
    and any variable an option names itself."""
    import click

    from serving.server import serve_command
    options = [p for p in serve_command.params if isinstance(p, click.Option)]
    return ({"NETWORK3_" + max(p.opts, key=len).lstrip("-").replace("-", "_").upper() for p in options}
            | {p.envvar for p in options if isinstance(p.envvar, str)})


def image_facts() -> tuple[dict[str, str], str | None]:
    """The ENV (literal values only) and USER of the Containerfile's last stage, the image, when
    the Containerfile is here."""
    path = ROOT / "Containerfile"
    if not path.is_file():
        pytest.skip("no Containerfile: what the image sets is not known here")
    env, user = {}, None
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("FROM", "ENV", "USER"):
            continue
        if words[0].upper() == "FROM":
            env, user = {}, None
        elif words[0].upper() == "USER":
            user = words[1]
        elif "=" not in words[1]:  # ENV KEY value
            env[words[1]] = " ".join(words[2:])
        else:
            env.update(w.split("=", 1) for w in words[1:] if "=" in w)
    return {k: v.strip('"') for k, v in env.items() if "$" not in v}, user


def server_containers(docs) -> list[dict]:
    """Every container that runs our image."""
    version = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)[1]  # no tomllib in 3.10
    tag = f"network3:{version}"
    out = []
    for d in docs:
        if d["kind"] not in ("Deployment", "InferenceService"):
            continue
        spec = d["spec"]["template"]["spec"] if d["kind"] == "Deployment" else d["spec"]["predictor"]
        out += [c for c in spec.get("containers", []) if c["image"].startswith("network3:")]
    for c in out:
        assert c["image"] == tag, f"{c['image']}: the project's version is {tag}"
    return out


def effective(c: dict, option: str, image_env: dict[str, str] | None = None):
    """An option of the server in container c: its env, else the image's ENV, else the default."""
    from serving.server import ServerOptions
    name = "NETWORK3_" + option.upper()
    for env in (env_of(c), image_env or {}):
        if name in env:
            return env[name]
    return {f.name: f.default for f in dataclasses.fields(ServerOptions)}[option]


def test_every_network3_variable_is_a_serve_option(with_tls):
    names = serve_env_names()
    assert {"NETWORK3_PORT", "NETWORK3_TOKEN_FILE", "NETWORK3_GRACE"} <= names  # the rule, checked on known ones
    containers = server_containers(resources_in_files() + with_tls)
    assert len(containers) >= 3  # the Deployment (with and without TLS) and the KServe predictor
    for c in containers:
        for name in env_of(c):
            if name.startswith("NETWORK3_"):
                assert name in names, f"{name}: `network3 serve` has no such option"


def test_ports_probes_and_service_agree_with_the_server(base, with_tls):
    from serving.api.http import OPEN_ROUTES, build_app
    from serving.server import OPEN_METHODS
    for docs in (base, with_tls):
        deployment, service, policy = one(docs, "Deployment"), one(docs, "Service"), one(docs, "NetworkPolicy")
        c = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == int(effective(c, "port"))
        assert ports["http"] == int(effective(c, "http_port"))
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[kind]
            if "grpc" in probe:  # the kubelet's gRPC probe: grpc.health.v1, open without a token
                assert probe["grpc"]["port"] == ports["grpc"]
                assert any(m.startswith("/grpc.health.v1.Health/") for m in OPEN_METHODS)
            else:
                get = probe["httpGet"]
                assert get["port"] in ("http", ports["http"]) and get["path"].startswith(OPEN_ROUTES), probe
                assert f'"{get["path"]}"' in inspect.getsource(build_app), f"{get['path']}: no such route"
                assert get.get("scheme", "HTTP") == ("HTTPS" if "NETWORK3_TLS_CERT" in env_of(c) else "HTTP")
        # The Service and the NetworkPolicy open exactly the container's ports, by name.
        assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
        assert {p["port"] for (rule,) in [policy["spec"]["ingress"]] for p in rule["ports"]} == set(ports)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                         policy["spec"]["podSelector"]["matchLabels"],
                         one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
            assert selector.items() <= labels.items()
        assert one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"
    tls_ports = {p["name"]: p.get("appProtocol") for p in one(with_tls, "Service")["spec"]["ports"]}
    assert tls_ports["http"] == "https"


def test_the_image_facts_the_manifests_rely_on(base):
    image_env, user = image_facts()
    deployment = one(base, "Deployment")
    c = container(deployment)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert effective(c, "host", image_env) in ("0.0.0.0", "::"), "the server must listen beyond loopback"
    assert ports["grpc"] == int(effective(c, "port", image_env))
    assert ports["http"] == int(effective(c, "http_port", image_env))
    assert ports["metrics"] == int(effective(c, "metrics_port", image_env))
    for isvc in inference_services():
        for kc in isvc["spec"]["predictor"].get("containers", []):
            (port,) = kc["ports"]
            assert port["containerPort"] == int(effective(kc, "port", image_env))
    if user is not None and user.split(":")[0].isdigit():
        assert int(user.split(":")[0]) == deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def test_prometheus_scrapes_the_metrics_port(base):
    deployment = one(base, "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    for isvc in inference_services():
        if "prometheus.kserve.io/port" in isvc["metadata"].get("annotations", {}):
            assert int(isvc["metadata"]["annotations"]["prometheus.kserve.io/port"]) == ports["metrics"]


def test_termination_grace_covers_prestop_and_the_drain(base, with_tls):
    for docs in (base, with_tls):
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        c = container(one(docs, "Deployment"))
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        grace = float(effective(c, "grace"))
        assert pod["terminationGracePeriodSeconds"] > pre_stop + grace


def test_credentials_come_from_whole_secrets_mounted_as_files(base, with_tls):
    """NETWORK3_TOKEN_FILE, _TLS_CERT and _TLS_KEY name a key of a Secret mounted without
    subPath (so that Kubernetes swaps in a rotated one)."""
    example = {d["metadata"]["name"]: d for d in resources_in_files() if d["kind"] == "Secret"}
    tls_keys = {"tls.crt", "tls.key"}  # what a kubernetes.io/tls Secret holds
    seen = set()
    for docs in (base, with_tls):
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        c = container(one(docs, "Deployment"))
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"] if m["name"] in secrets}
        for name in ("NETWORK3_TOKEN_FILE", "NETWORK3_TLS_CERT", "NETWORK3_TLS_KEY"):
            if name not in env_of(c):
                continue
            seen.add(name)
            path = Path(env_of(c)[name])
            mount = mounts.get(str(path.parent))
            assert mount is not None and mount.get("readOnly") and "subPath" not in mount, f"{name}: {path}"
            secret = secrets[mount["name"]]
            keys = set(example[secret].get("stringData", {})) | set(example[secret].get("data", {})) \
                if secret in example else tls_keys
            assert path.name in keys, f"{name}: {secret} has no key {path.name}"
    assert seen == {"NETWORK3_TOKEN_FILE", "NETWORK3_TLS_CERT", "NETWORK3_TLS_KEY"}


def test_every_server_container_is_locked_down(base):
    """Non-root, read-only root filesystem, no capabilities, RuntimeDefault seccomp, and an
    emptyDir at /tmp for what does get written."""
    for d in [one(base, "Deployment"), *inference_services()]:
        pod = d["spec"]["template"]["spec"] if d["kind"] == "Deployment" else d["spec"]["predictor"]
        for c in pod.get("containers", []):
            sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
            assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, d["metadata"]["name"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["seccompProfile"]["type"] == "RuntimeDefault"
            empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
            assert any(m["mountPath"] == "/tmp" and m["name"] in empty for m in c["volumeMounts"])


def test_kserve_predictors_expose_grpc_as_knative_wants_it():
    """One port per container, named h2c (cleartext HTTP/2), as KServe documents for gRPC."""
    isvcs = inference_services()
    assert {i["spec"]["predictor"].get("model", {}).get("modelFormat", {}).get("name") for i in isvcs} >= {"triton"}
    for isvc in isvcs:
        predictor = isvc["spec"]["predictor"]
        for c in predictor.get("containers", []) + ([predictor["model"]] if "model" in predictor else []):
            (port,) = c["ports"]
            assert port["name"] == "h2c" and port.get("protocol", "TCP") == "TCP"
