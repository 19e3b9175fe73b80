"""A kubeconfig for the configured clusters, whose user runs `iam kubectl-credential` (an exec plugin), and
the equivalent `kubectl config` commands."""

from __future__ import annotations

import re
import shlex

import yaml

from iam.config import KubeCluster, Settings
from iam.kube import DEFAULT_SCOPE, DEVICE_GRANT, EXEC_API_VERSION, cluster_client, plugin_scope


def exec_args(settings: Settings, cluster: KubeCluster) -> list[str]:
    client = cluster_client(settings, cluster)
    args = ["kubectl-credential", "--issuer", settings.issuer, "--client-id", cluster.client_id]
    scope = plugin_scope(cluster, client)
    if scope != DEFAULT_SCOPE:
        args += ["--scope", scope]
    if DEVICE_GRANT not in client.grant_types and "authorization_code" in client.grant_types:
        args += ["--grant", "loopback"]
    return args


def user_name(cluster: KubeCluster, username: str | None) -> str:
    safe = re.sub(r"[^A-Za-z0-9@._-]", "-", username) if username else "oidc"
    return f"{safe}@{cluster.name}"


def build(settings: Settings, username: str | None = None, clusters: list[KubeCluster] | None = None,
          command: str = "iam") -> dict:
    clusters = settings.kubernetes.clusters if clusters is None else clusters
    config: dict = {"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [], "contexts": []}
    for cluster in clusters:
        entry: dict = {"server": cluster.server}
        if cluster.certificate_authority_data:
            entry["certificate-authority-data"] = cluster.certificate_authority_data
        config["clusters"].append({"name": cluster.name, "cluster": entry})
        user = user_name(cluster, username)
        config["users"].append({"name": user, "user": {"exec": {
            "apiVersion": EXEC_API_VERSION,
            "command": command,
            "args": exec_args(settings, cluster),
            "interactiveMode": "IfAvailable",
            "provideClusterInfo": False,
        }}})
        config["contexts"].append({"name": cluster.name, "context": {"cluster": cluster.name, "user": user}})
    if clusters:
        config["current-context"] = clusters[0].name
    return config


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def commands(settings: Settings, username: str | None = None, clusters: list[KubeCluster] | None = None,
             command: str = "iam") -> list[str]:
    """`kubectl config` commands that write the same entries into the current kubeconfig."""
    clusters = settings.kubernetes.clusters if clusters is None else clusters
    q = shlex.quote
    lines: list[str] = []
    for cluster in clusters:
        user = user_name(cluster, username)
        if cluster.certificate_authority_data:
            ca_file = f"{cluster.name}-ca.crt"
            lines.append(f"printf '%s' {q(cluster.certificate_authority_data)} | base64 -d > {q(ca_file)}")
            lines.append(f"kubectl config set-cluster {q(cluster.name)} --server={q(cluster.server)} "
                         f"--certificate-authority={q(ca_file)} --embed-certs=true")
        else:
            lines.append(f"kubectl config set-cluster {q(cluster.name)} --server={q(cluster.server)}")
        args = " ".join(f"--exec-arg={q(arg)}" for arg in exec_args(settings, cluster))
        lines.append(f"kubectl config set-credentials {q(user)} --exec-api-version={EXEC_API_VERSION} "
                     f"--exec-command={q(command)} {args} --exec-interactive-mode=IfAvailable "
                     "--exec-provide-cluster-info=false")
        lines.append(f"kubectl config set-context {q(cluster.name)} --cluster={q(cluster.name)} "
                     f"--user={q(user)}")
    if clusters:
        lines.append(f"kubectl config use-context {q(clusters[0].name)}")
    return lines
