"""HTML pages (login, errors, device entry, kubeconfig): Jinja2 templates with browser hardening on every one.

No third-party resources, no inline script; the stylesheet and the one script (passkeys: the WebAuthn browser API
has no HTML form) are served by every role from /assets.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

_HERE = Path(__file__).resolve().parent
_env = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=select_autoescape(["html"]))
_CSS = (_HERE / "assets" / "iam.css").read_bytes()
_PASSKEYS_JS = (_HERE / "assets" / "passkeys.js").read_bytes()

# Pages, and the redirects of the browser flows: RFC 9700 §4.16 (clickjacking), §4.2.4 (no referrer leaks);
# ASVS 5 V3.4. What every response carries (nosniff, HSTS) is added by the request middleware: every_response().
HARDENING = {
    # script-src and connect-src: /assets/passkeys.js, fetching its WebAuthn options from this origin only.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}



def every_response(issuer: str) -> list[tuple[bytes, bytes]]:
    """Headers for every response, computed once (ASVS 5 V3.4.1 HSTS on an https issuer, V3.4.4 nosniff)."""
    headers = [(b"x-content-type-options", b"nosniff")]
    if issuer.startswith("https://"):
        headers.append((b"strict-transport-security", b"max-age=63072000; includeSubDomains"))
    return headers


router = APIRouter()


def render(template: str, status: int = 200, headers: dict | None = None, **context) -> Response:
    html = _env.get_template(template).render(**context)
    return Response(html, status, {**HARDENING, **(headers or {})}, media_type="text/html")


def error_page(title: str, message: str, status: int = 400) -> Response:
    """An error shown to the person in the browser; used where redirecting would be unsafe (RFC 6749 §4.1.2.1)."""
    return render("error.html", status, title=title, message=message)


@router.get("/assets/iam.css")
async def stylesheet() -> Response:
    return Response(_CSS, media_type="text/css", headers={"Cache-Control": "public, max-age=86400"})


@router.get("/assets/passkeys.js")
async def passkeys_script() -> Response:
    return Response(_PASSKEYS_JS, media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"})
