"""kubectl login with iam: the exec credential plugin, kube-apiserver configuration, kubeconfigs, a self-test.

kube-apiserver verifies iam's ID tokens itself (`--oidc-*` flags or a structured AuthenticationConfiguration);
kubectl gets them from `iam kubectl-credential`, an exec credential plugin that logs in with the device flow
(or a loopback redirect) and refreshes silently.
"""

from __future__ import annotations

from iam.config import ClientConfig, ConfigError, KubeCluster, Settings

DEFAULT_SCOPE = "openid email groups offline_access"
EXEC_API_VERSION = "client.authentication.k8s.io/v1"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Which scope releases a claim kube-apiserver reads (iam.token.claims.SCOPE_CLAIMS, plus `sub` always).
CLAIM_SCOPES = {"email": "email", "email_verified": "email", "groups": "groups",
                "preferred_username": "profile", "name": "profile"}


def discovery_url(issuer: str) -> str:
    """Where kube-apiserver (go-oidc) and kubelogin look: the issuer without its trailing slash + the path."""
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def find_cluster(settings: Settings, name: str | None) -> KubeCluster:
    clusters = settings.kubernetes.clusters
    if not clusters:
        raise ConfigError("no Kubernetes clusters are configured (kubernetes.clusters)")
    if name is None:
        if len(clusters) == 1:
            return clusters[0]
        raise ConfigError("several clusters are configured; choose one with --cluster: "
                          + ", ".join(cluster.name for cluster in clusters))
    for cluster in clusters:
        if cluster.name == name:
            return cluster
    raise ConfigError(f"no cluster {name!r} in kubernetes.clusters (configured: "
                      + ", ".join(cluster.name for cluster in clusters) + ")")


def cluster_client(settings: Settings, cluster: KubeCluster) -> ClientConfig:
    for client in settings.clients:
        if client.client_id == cluster.client_id:
            return client
    raise ConfigError(f"no client {cluster.client_id!r} in clients")  # config validation prevents this


def plugin_scope(cluster: KubeCluster, client: ClientConfig) -> str:
    """The plugin's scope: openid, the scopes of the mapped claims, offline_access (as the client allows)."""
    wanted = ["openid"]
    for claim in (cluster.username_claim, cluster.groups_claim, "email"):
        scope = CLAIM_SCOPES.get(claim)
        if scope and scope not in wanted:
            wanted.append(scope)
    wanted.append("offline_access")
    return " ".join(scope for scope in wanted if scope == "openid" or scope in client.scopes)
