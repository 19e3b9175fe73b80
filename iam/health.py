"""Probes served by every role: liveness never touches a store; readiness checks the role's stores."""

import asyncio

from fastapi import APIRouter, Request, Response

from iam.errors import json_response
from iam.observability import metrics_response
from iam.runtime import shared
from iam.store import StoreError

router = APIRouter()

_NO_CACHE = {"Cache-Control": "no-store"}


@router.get("/health/live")
async def live() -> Response:
    return Response(b'{"status":"ok"}', headers=_NO_CACHE, media_type="application/json")


@router.get("/metrics")
async def metrics() -> Response:
    return metrics_response()


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    iam = shared(request)
    if iam.draining:
        return json_response({"status": "draining"}, 503, _NO_CACHE)
    results = await asyncio.gather(*(store.check() for store in iam.stores.values()), return_exceptions=True)
    problems = [str(result) for result in results if isinstance(result, StoreError)]
    if problems:
        return json_response({"status": "unavailable", "problems": problems}, 503, _NO_CACHE)
    return json_response({"status": "ok", "role": iam.settings.role.value}, 200, _NO_CACHE)
