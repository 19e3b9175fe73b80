"""The signed-in person's kubeconfig for the configured Kubernetes clusters: a page and a download.

The kubeconfig holds no secret: its user runs `iam kubectl-credential`, which logs in on first use.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from iam.authn.services import authn_services
from iam.authn.web import current_session, page
from iam.kube import kubeconfig
from iam.pages import HARDENING, error_page

router = APIRouter()


async def _kubeconfig(request: Request) -> tuple[Response | None, dict]:
    services = authn_services(request)
    session = await current_session(request)
    if session is None:
        return RedirectResponse("/authn/login", 303, headers=HARDENING), {}
    if not services.settings.kubernetes.clusters:
        return error_page("No clusters", "No Kubernetes clusters are configured here.", 404), {}
    user = await services.directory.claims(session.subject)
    username = user.preferred_username if user is not None else None
    return None, {
        "user": user,
        "clusters": services.settings.kubernetes.clusters,
        "kubeconfig": kubeconfig.dump(kubeconfig.build(services.settings, username)),
        "commands": "\n".join(kubeconfig.commands(services.settings, username)),
    }


@router.get("/authn/kubeconfig")
async def kubeconfig_page(request: Request) -> Response:
    stop, context = await _kubeconfig(request)
    if stop is not None:
        return stop
    return page(request, "kubeconfig.html", issuer=authn_services(request).settings.issuer, **context)


@router.get("/authn/kubeconfig.yaml")
async def kubeconfig_download(request: Request) -> Response:
    stop, context = await _kubeconfig(request)
    if stop is not None:
        return stop
    return Response(context["kubeconfig"], 200, media_type="application/yaml", headers={
        **HARDENING, "Content-Disposition": 'attachment; filename="kubeconfig.yaml"'})
