"""SCIM error responses (RFC 7644 §3.12): `status` is a string, `scimType` only where the RFC defines one."""

from __future__ import annotations

import json

from fastapi.responses import Response

ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"
MEDIA_TYPE = "application/scim+json"


class ScimError(Exception):
    def __init__(self, status: int, detail: str, scim_type: str | None = None, headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.scim_type = scim_type
        self.headers = headers or {}

    def body(self) -> dict:
        body: dict = {"schemas": [ERROR_SCHEMA], "status": str(self.status)}
        if self.scim_type:
            body["scimType"] = self.scim_type
        body["detail"] = self.detail
        return body

    def response(self) -> Response:
        return scim_response(self.body(), self.status, {"Cache-Control": "no-store", **self.headers})


def scim_response(body: object, status: int = 200, headers: dict | None = None) -> Response:
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(payload, status, headers, media_type=MEDIA_TYPE)


def bad_request(scim_type: str, detail: str) -> ScimError:
    return ScimError(400, detail, scim_type)


def invalid_syntax(detail: str) -> ScimError:
    return bad_request("invalidSyntax", detail)


def invalid_value(detail: str) -> ScimError:
    return bad_request("invalidValue", detail)


def invalid_filter(detail: str) -> ScimError:
    return bad_request("invalidFilter", detail)


def invalid_path(detail: str) -> ScimError:
    return bad_request("invalidPath", detail)


def no_target(detail: str) -> ScimError:
    return bad_request("noTarget", detail)


def mutability(detail: str) -> ScimError:
    return bad_request("mutability", detail)


def not_found(detail: str = "no such resource") -> ScimError:
    return ScimError(404, detail)


def unavailable() -> ScimError:
    return ScimError(503, "a store or service this request needs is unavailable; retry later",
                     headers={"Retry-After": "1"})
