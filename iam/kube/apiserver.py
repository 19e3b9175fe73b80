"""`iam kube apiserver-config`: how kube-apiserver should trust this issuer's ID tokens.

Two forms, never both on one API server: the `--oidc-*` flags, or a structured AuthenticationConfiguration
(`--authentication-config`, apiserver.config.k8s.io/v1beta1, Kubernetes 1.30+), which adds an in-cluster
`discoveryURL`, several audiences and CEL validation rules.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from iam.config import ConfigError, KubeCluster, Settings

SIGNING_ALGS = ["RS256"]  # iam signs ID tokens with RS256, kube-apiserver's default


def _issuer_ca(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        pem = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError(f"{path}: not a PEM certificate")
    return pem


def flags(settings: Settings, cluster: KubeCluster, issuer_ca_file: str | None = None) -> list[str]:
    """The legacy `--oidc-*` flags (one audience only: the client id)."""
    args = [
        f"--oidc-issuer-url={settings.issuer}",
        f"--oidc-client-id={cluster.client_id}",
        f"--oidc-username-claim={cluster.username_claim}",
        f"--oidc-username-prefix={cluster.username_prefix or '-'}",  # "-": no prefix (else `issuer#`)
        f"--oidc-groups-claim={cluster.groups_claim}",
        f"--oidc-groups-prefix={cluster.groups_prefix}",
        f"--oidc-signing-algs={','.join(SIGNING_ALGS)}",
    ]
    if issuer_ca_file:
        args.append(f"--oidc-ca-file={issuer_ca_file}")
    return args


def authentication_configuration(settings: Settings, cluster: KubeCluster,
                                 issuer_ca_file: str | None = None) -> dict:
    issuer: dict = {"url": settings.issuer}  # byte for byte the `iss` of the tokens and discovery's `issuer`
    if cluster.discovery_url:
        issuer["discoveryURL"] = cluster.discovery_url
    pem = _issuer_ca(issuer_ca_file)
    if pem:
        issuer["certificateAuthority"] = pem
    issuer["audiences"] = list(cluster.audiences)
    if len(cluster.audiences) > 1:
        issuer["audienceMatchPolicy"] = "MatchAny"
    jwt: dict = {"issuer": issuer}
    if cluster.username_claim == "email":
        # kube-apiserver rejects `email_verified: false` but accepts a token without it; iam always sends it
        # with `email`, so require it outright (an absent claim fails the expression too).
        jwt["claimValidationRules"] = [{
            "expression": "claims.email_verified == true",
            "message": "the email address must be verified (email_verified: true)",
        }]
    jwt["claimMappings"] = {
        "username": {"claim": cluster.username_claim, "prefix": cluster.username_prefix},
        "groups": {"claim": cluster.groups_claim, "prefix": cluster.groups_prefix},
    }
    return {"apiVersion": "apiserver.config.k8s.io/v1beta1", "kind": "AuthenticationConfiguration",
            "jwt": [jwt]}


def render(settings: Settings, cluster: KubeCluster, form: str = "structured",
           issuer_ca_file: str | None = None) -> str:
    if not settings.issuer.startswith("https://"):
        # Still printed: the operator sees what to change. kube-apiserver refuses a non-https issuer.
        note = f"# WARNING: kube-apiserver accepts only an https issuer; {settings.issuer} is not\n"
    else:
        note = ""
    if form == "flags":
        header = (f"# kube-apiserver flags for cluster {cluster.name} (the `command:` of a static pod);\n"
                  "# not together with --authentication-config\n")
        return note + header + yaml.safe_dump(flags(settings, cluster, issuer_ca_file),
                                              default_flow_style=False)
    header = (f"# kube-apiserver --authentication-config=<this file> for cluster {cluster.name} "
              "(Kubernetes 1.30+); not together with --oidc-* flags\n")
    document = authentication_configuration(settings, cluster, issuer_ca_file)
    return note + header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
