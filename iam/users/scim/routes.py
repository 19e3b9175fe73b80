"""The SCIM 2.0 HTTP API under /scim/v2 (RFC 7644): thin handlers over the directory.

Internal only (never routed by the ingress). Every call needs a bearer access token from the token role:
scope `scim:read` to read (GET, searches, discovery), `scim:write` to change (POST, PUT, PATCH, DELETE).
Every refusal is a SCIM error body (RFC 7644 §3.12), and a refused request changes nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError

from iam.errors import OAuthError, PasswordRejected, PeerRejected, PeerUnavailable
from iam.resource import require_token
from iam.users.directory import Directory, DirectoryError, IfMatch
from iam.users.scim import resources
from iam.users.scim.errors import (
    ScimError,
    invalid_syntax,
    invalid_value,
    not_found,
    scim_response,
    unavailable,
)
from iam.users.scim.filter import Node, parse_filter, sort_column, to_sql
from iam.users.scim.patch import apply_patch, parse_patch
from iam.users.scim.schemas import (
    ALL_SCHEMAS,
    CORE_GROUP,
    CORE_USER,
    DEFAULT_COUNT,
    GROUP,
    IAM_USER,
    LIST_RESPONSE,
    MAX_PAYLOAD,
    MAX_RESULTS,
    RESOURCE_TYPES,
    SEARCH_REQUEST,
    USER,
    ResourceType,
    service_provider_config,
)
from iam.users.services import user_services

log = logging.getLogger("iam.scim")

router = APIRouter(prefix="/scim/v2")

READ = "scim:read"
WRITE = "scim:write"
JSON_TYPES = ("application/scim+json", "application/json")
MAX_NESTING = 16  # JSON depth of any request body
_ID = re.compile(r"[A-Za-z0-9._~-]{1,64}", re.ASCII)
_ETAG = re.compile(r'(?:W/)?"([0-9]{1,18})"', re.ASCII)
NO_STORE = {"Cache-Control": "no-store"}


# -- the edge: errors, authorization, bodies, parameters -----------------------------------------------------
def scim_endpoint(handler):
    """Turn every failure of `handler` into a SCIM error response: never a stack trace, never an OAuth body."""

    @functools.wraps(handler)
    async def endpoint(request: Request, **kwargs):
        try:
            return await handler(request, **kwargs)
        except ScimError as exc:
            return exc.response()
        except OAuthError as exc:  # from require_token: keep its status and WWW-Authenticate challenge
            detail = exc.description or ("a bearer access token is required" if exc.status == 401 else exc.error)
            return ScimError(exc.status, detail, headers=exc.headers).response()
        except DirectoryError as exc:
            return _directory_error(exc).response()
        except PasswordRejected as exc:
            return invalid_value(f"password: {exc}").response()
        except (PeerUnavailable, PeerRejected) as exc:
            log.error("peer call failed: %s", exc)
            return unavailable().response()
        except DataError:  # a value the store cannot hold that validation let through: still the client's
            log.warning("store refused a value", exc_info=True)
            return invalid_value("a value is out of range for the directory").response()
        except (IntegrityError, ProgrammingError):
            log.exception("unexpected store error")
            return ScimError(500, "unexpected error").response()
        except (DBAPIError, OSError, TimeoutError) as exc:
            log.warning("store unavailable: %s", exc.__class__.__name__)
            return unavailable().response()
        except Exception:
            log.exception("unhandled error in the SCIM API")
            return ScimError(500, "unexpected error").response()

    return endpoint


def _directory_error(exc: DirectoryError) -> ScimError:
    if exc.kind == "uniqueness":
        return ScimError(409, str(exc), "uniqueness")
    if exc.kind == "not_found":
        return not_found(str(exc))
    if exc.kind == "precondition":
        return ScimError(412, str(exc))
    if exc.kind == "conflict":
        return ScimError(409, str(exc))
    return invalid_value(str(exc))


async def authorize(request: Request, scope: str) -> None:
    await require_token(request, user_services(request).tokens, scope)


def _directory(request: Request) -> Directory:
    return user_services(request).directory


def _base(request: Request) -> str:
    # The configured base, never the Host header: a caller must not choose where links point.
    return user_services(request).settings.scim_base


async def read_json(request: Request) -> Any:
    """The request body as JSON: application/scim+json or application/json, UTF-8, at most MAX_PAYLOAD bytes."""
    media_type, _, parameters = request.headers.get("content-type", "").partition(";")
    if media_type.strip().lower() not in JSON_TYPES:
        raise ScimError(415, "the body must be application/scim+json (or application/json)")
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise ScimError(415, "the body must be UTF-8")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isascii() or not declared.isdigit()):
        raise invalid_syntax("malformed Content-Length")
    if declared is not None and int(declared) > MAX_PAYLOAD:
        raise ScimError(413, f"the body may have at most {MAX_PAYLOAD} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_PAYLOAD:
            raise ScimError(413, f"the body may have at most {MAX_PAYLOAD} bytes")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise invalid_syntax("the body is not valid JSON") from None
    _check_tree(data)
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _check_tree(data: Any) -> None:
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise invalid_syntax(f"the body nests deeper than {MAX_NESTING} levels")
        if isinstance(node, dict):
            for key, value in node.items():
                _check_string(key)
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)
        elif isinstance(node, str):
            _check_string(node)


def _check_string(value: str) -> None:
    if "\x00" in value:
        raise invalid_value("strings may not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid_value("strings may not contain unpaired surrogates") from None


def _check_id(value: str, kind: str) -> None:
    if not _ID.fullmatch(value):
        raise not_found(f"no {kind} {value!r}")


def _if_match(request: Request) -> IfMatch:
    header = request.headers.get("if-match")
    if header is None:
        return None
    if header.strip() == "*":
        return "*"
    return frozenset(int(m.group(1)) for part in header.split(",") if (m := _ETAG.fullmatch(part.strip())))


def _matches_none(request: Request, version: int) -> bool:
    """RFC 7232 §3.2: If-None-Match names the current version (weak comparison), or is *."""
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    return header.strip() == "*" or any(
        (m := _ETAG.fullmatch(part.strip())) and int(m.group(1)) == version for part in header.split(",")
    )


@dataclass(frozen=True)
class ListQuery:
    filter: Node | None = None
    sort_by: str | None = None
    descending: bool = False
    start: int = 1
    count: int = DEFAULT_COUNT
    attributes: list[str] | None = None
    excluded: list[str] | None = None


_PARAMETERS = {p.casefold(): p for p in ("filter", "sortBy", "sortOrder", "startIndex", "count", "attributes",
                                           "excludedAttributes")}


def _parameters(request: Request) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        name = _PARAMETERS.get(key.casefold())
        if name is None:
            continue
        if name in found:
            raise invalid_value(f"query parameter {name} is given more than once")
        found[name] = value
    return found


def list_query(values: dict[str, Any], *, from_json: bool = False) -> ListQuery:
    """Listing parameters (RFC 7644 §3.4.2), from the query string or a SearchRequest body."""
    query = ListQuery()
    text = values.get("filter")
    if text is not None:
        if not isinstance(text, str):
            raise invalid_value("filter must be a string")
        query = replace(query, filter=parse_filter(text))
    sort_by = values.get("sortBy")
    if sort_by is not None:
        if not isinstance(sort_by, str) or not sort_by.strip():
            raise invalid_value("sortBy must name an attribute")
        query = replace(query, sort_by=sort_by)
    order = values.get("sortOrder")
    if order is not None:
        if not isinstance(order, str) or order.lower() not in ("ascending", "descending"):
            raise invalid_value("sortOrder must be ascending or descending")
        query = replace(query, descending=order.lower() == "descending")
    start = _integer(values, "startIndex", from_json)
    if start is not None:  # RFC 7644 §3.4.2.4: a value less than 1 is interpreted as 1
        query = replace(query, start=max(1, start))
    count = _integer(values, "count", from_json)
    if count is not None:  # negative is 0; more than the maximum is the maximum
        query = replace(query, count=min(max(0, count), MAX_RESULTS))
    return replace(query, attributes=_names(values, "attributes"), excluded=_names(values, "excludedAttributes"))


def _integer(values: dict, name: str, from_json: bool) -> int | None:
    value = values.get(name)
    if value is None:
        return None
    if from_json:
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid_value(f"{name} must be an integer")
        return value
    text = value.strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,9}", text):
        raise invalid_value(f"{name} must be an integer")
    return int(text)


def _names(values: dict, name: str) -> list[str] | None:
    value = values.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid_value(f"{name} must be a list of attribute names")
    names = [v.strip() for v in value if v.strip()]
    return names or None


def _search_query(body: Any) -> ListQuery:
    if not isinstance(body, dict):
        raise invalid_syntax("the body must be a JSON object (SearchRequest)")
    values: dict[str, Any] = {}
    names = {**_PARAMETERS, "schemas": "schemas"}
    for key, value in body.items():
        name = names.get(key.casefold())
        if name is None:
            raise invalid_syntax(f"unknown SearchRequest member {key!r}")
        values[name] = value
    schemas = values.pop("schemas", None)
    if not isinstance(schemas, list) or SEARCH_REQUEST.casefold() not in {
        s.casefold() for s in schemas if isinstance(s, str)
    }:
        raise invalid_syntax(f"schemas must be [{SEARCH_REQUEST!r}]")
    return list_query(values, from_json=True)


def _list_response(query: ListQuery, total: int, found: list[dict]) -> Response:
    return scim_response(
        {"schemas": [LIST_RESPONSE], "totalResults": total, "itemsPerPage": len(found), "startIndex": query.start,
         "Resources": found},
        headers=NO_STORE,
    )


@dataclass(frozen=True)
class Shape:
    """`attributes` / `excludedAttributes` of a single-resource request, read before anything is changed."""

    attributes: list[str] | None
    excluded: list[str] | None


def _shape(request: Request) -> Shape:
    params = _parameters(request)
    return Shape(_names(params, "attributes"), _names(params, "excludedAttributes"))


def _resource(shape: Shape, rtype: ResourceType, doc: dict, version: int, status: int = 200) -> Response:
    body = resources.project(doc, rtype, shape.attributes, shape.excluded)
    headers = {**NO_STORE, "ETag": resources.etag(version)}
    if status == 201:
        headers["Location"] = doc["meta"]["location"]
    return scim_response(body, status, headers)


async def _query(request: Request, rtype: ResourceType, query: ListQuery, *, strict: bool = True,
                 offset: int | None = None, limit: int | None = None) -> tuple[int, list[dict]]:
    directory = _directory(request)
    where = to_sql(query.filter, rtype, directory.dialect, strict=strict) if query.filter is not None else None
    order = None
    if query.sort_by is not None:
        try:
            order = sort_column(query.sort_by, rtype)
        except ScimError:
            if strict:
                raise
    offset = query.start - 1 if offset is None else offset
    limit = query.count if limit is None else limit
    base = _base(request)
    if rtype is USER:
        total, found = await directory.query_users(where, order, descending=query.descending, offset=offset,
                                                   limit=limit)
        docs = [resources.user_resource(u, base) for u in found]
    else:
        members = resources.wanted("members", rtype, query.attributes, query.excluded)
        total, groups = await directory.query_groups(where, order, descending=query.descending, offset=offset,
                                                     limit=limit, members=members)
        docs = [resources.group_resource(g, base) for g in groups]
    return total, [resources.project(d, rtype, query.attributes, query.excluded) for d in docs]


# -- Users --------------------------------------------------------------------------------------------------
@router.get("/Users")
@scim_endpoint
async def list_users(request: Request) -> Response:
    await authorize(request, READ)
    query = list_query(_parameters(request))
    return _list_response(query, *await _query(request, USER, query))


@router.post("/Users/.search")
@scim_endpoint
async def search_users(request: Request) -> Response:
    await authorize(request, READ)
    query = _search_query(await read_json(request))
    return _list_response(query, *await _query(request, USER, query))


@router.post("/Users")
@scim_endpoint
async def create_user(request: Request) -> Response:
    await authorize(request, WRITE)
    shape = _shape(request)
    given = resources.parse_user(await read_json(request))
    directory = _directory(request)
    user_id = await directory.create_user(resources.new_user(given, None), password=given.password,
                                          send_verification=given.send_verification)
    user = await directory.get_user(user_id)
    if user is None:  # deleted in the meantime
        raise not_found(f"no user {user_id}")
    return _resource(shape, USER, resources.user_resource(user, _base(request)), user.version, 201)


@router.get("/Users/{user_id}")
@scim_endpoint
async def get_user(request: Request, user_id: str) -> Response:
    await authorize(request, READ)
    shape = _shape(request)
    _check_id(user_id, "user")
    user = await _directory(request).get_user(user_id)
    if user is None:
        raise not_found(f"no user {user_id}")
    if _matches_none(request, user.version):
        return Response(status_code=304, headers={"ETag": resources.etag(user.version)})
    return _resource(shape, USER, resources.user_resource(user, _base(request)), user.version)


@router.put("/Users/{user_id}")
@scim_endpoint
async def replace_user(request: Request, user_id: str) -> Response:
    await authorize(request, WRITE)
    shape = _shape(request)
    _check_id(user_id, "user")
    given = resources.parse_user(await read_json(request))
    user = await _directory(request).modify_user(
        user_id, lambda current: (resources.new_user(given, current), given.password), if_match=_if_match(request)
    )
    return _resource(shape, USER, resources.user_resource(user, _base(request)), user.version)


@router.patch("/Users/{user_id}")
@scim_endpoint
async def patch_user(request: Request, user_id: str) -> Response:
    await authorize(request, WRITE)
    shape = _shape(request)
    _check_id(user_id, "user")
    operations = parse_patch(await read_json(request), USER)

    def change(current):
        doc = resources.user_document(current)
        touched = apply_patch(doc, operations, USER)
        given = resources.parse_user({**doc, "schemas": [CORE_USER, IAM_USER]})
        if resources.VERIFIED not in touched:
            given = replace(given, email_verified=None)
        elif given.email_verified is None:  # removed: unassigned is false
            given = replace(given, email_verified=False)
        return resources.new_user(given, current), given.password

    user = await _directory(request).modify_user(user_id, change, if_match=_if_match(request))
    return _resource(shape, USER, resources.user_resource(user, _base(request)), user.version)


@router.delete("/Users/{user_id}")
@scim_endpoint
async def delete_user(request: Request, user_id: str) -> Response:
    await authorize(request, WRITE)
    _check_id(user_id, "user")
    await _directory(request).delete_user(user_id, if_match=_if_match(request))
    return Response(status_code=204)


# -- Groups -------------------------------------------------------------------------------------------------
@router.get("/Groups")
@scim_endpoint
async def list_groups(request: Request) -> Response:
    await authorize(request, READ)
    query = list_query(_parameters(request))
    return _list_response(query, *await _query(request, GROUP, query))


@router.post("/Groups/.search")
@scim_endpoint
async def search_groups(request: Request) -> Response:
    await authorize(request, READ)
    query = _search_query(await read_json(request))
    return _list_response(query, *await _query(request, GROUP, query))


@router.post("/Groups")
@scim_endpoint
async def create_group(request: Request) -> Response:
    await authorize(request, WRITE)
    shape = _shape(request)
    given = resources.parse_group(await read_json(request))
    directory = _directory(request)
    group_id = await directory.create_group(resources.new_group(given, None))
    group = await directory.get_group(group_id)
    if group is None:
        raise not_found(f"no group {group_id}")
    return _resource(shape, GROUP, resources.group_resource(group, _base(request)), group.version, 201)


@router.get("/Groups/{group_id}")
@scim_endpoint
async def get_group(request: Request, group_id: str) -> Response:
    await authorize(request, READ)
    shape = _shape(request)
    _check_id(group_id, "group")
    members = resources.wanted("members", GROUP, shape.attributes, shape.excluded)
    group = await _directory(request).get_group(group_id, members=members)
    if group is None:
        raise not_found(f"no group {group_id}")
    if _matches_none(request, group.version):
        return Response(status_code=304, headers={"ETag": resources.etag(group.version)})
    return _resource(shape, GROUP, resources.group_resource(group, _base(request)), group.version)


@router.put("/Groups/{group_id}")
@scim_endpoint
async def replace_group(request: Request, group_id: str) -> Response:
    await authorize(request, WRITE)
    shape = _shape(request)
    _check_id(group_id, "group")
    given = resources.parse_group(await read_json(request))
    group = await _directory(request).modify_group(
        group_id, lambda current: resources.new_group(given, current), if_match=_if_match(request)
    )
    return _resource(shape, GROUP, resources.group_resource(group, _base(request)), group.version)


@router.patch("/Groups/{group_id}")
@scim_endpoint
async def patch_group(request: Request, group_id: str) -> Response:
    await authorize(request, WRITE)
    shape = _shape(request)
    _check_id(group_id, "group")
    operations = parse_patch(await read_json(request), GROUP)

    def change(current):
        doc = resources.group_document(current)
        apply_patch(doc, operations, GROUP)
        return resources.new_group(resources.parse_group({**doc, "schemas": [CORE_GROUP]}), current)

    group = await _directory(request).modify_group(group_id, change, if_match=_if_match(request))
    return _resource(shape, GROUP, resources.group_resource(group, _base(request)), group.version)


@router.delete("/Groups/{group_id}")
@scim_endpoint
async def delete_group(request: Request, group_id: str) -> Response:
    await authorize(request, WRITE)
    _check_id(group_id, "group")
    await _directory(request).delete_group(group_id, if_match=_if_match(request))
    return Response(status_code=204)


# -- searching both ---------------------------------------------------------------------------------------------
@router.post("/.search")
@scim_endpoint
async def search_all(request: Request) -> Response:
    """RFC 7644 §3.4.3 at the root: Users, then Groups; an attribute a type lacks matches none of it."""
    await authorize(request, READ)
    query = _search_query(await read_json(request))
    offset = query.start - 1
    user_total, found = await _query(request, USER, query, strict=False)
    group_offset = max(0, offset - user_total)
    group_total, more = await _query(request, GROUP, query, strict=False, offset=group_offset,
                                     limit=query.count - len(found))
    return _list_response(query, user_total + group_total, found + more)


# -- discovery (RFC 7644 §4) --------------------------------------------------------------------------------------
def _no_filter(request: Request) -> None:
    if "filter" in _parameters(request):  # RFC 7644 §4: filtering discovery endpoints is refused
        raise ScimError(403, "discovery endpoints cannot be filtered")


@router.get("/ServiceProviderConfig")
@scim_endpoint
async def service_provider(request: Request) -> Response:
    await authorize(request, READ)
    _no_filter(request)
    return scim_response(service_provider_config(_base(request)))


@router.get("/ResourceTypes")
@scim_endpoint
async def resource_types(request: Request) -> Response:
    await authorize(request, READ)
    _no_filter(request)
    found = [r.definition(_base(request)) for r in RESOURCE_TYPES]
    return _list_response(ListQuery(), len(found), found)


@router.get("/ResourceTypes/{name}")
@scim_endpoint
async def resource_type(request: Request, name: str) -> Response:
    await authorize(request, READ)
    found = next((r for r in RESOURCE_TYPES if r.name == name), None)
    if found is None:
        raise not_found(f"no resource type {name!r}")
    return scim_response(found.definition(_base(request)))


@router.get("/Schemas")
@scim_endpoint
async def schemas(request: Request) -> Response:
    await authorize(request, READ)
    _no_filter(request)
    found = [s.definition(_base(request)) for s in ALL_SCHEMAS]
    return _list_response(ListQuery(), len(found), found)


@router.get("/Schemas/{urn}")
@scim_endpoint
async def schema(request: Request, urn: str) -> Response:
    await authorize(request, READ)
    found = next((s for s in ALL_SCHEMAS if s.id == urn), None)
    if found is None:
        raise not_found(f"no schema {urn!r}")
    return scim_response(found.definition(_base(request)))


_KNOWN = (
    (re.compile(r"(Users|Groups)"), "GET, POST"),
    (re.compile(r"(Users|Groups)/\.search|\.search"), "POST"),
    (re.compile(r"(Users|Groups)/[^/]+"), "GET, PUT, PATCH, DELETE"),
    (re.compile(r"(ServiceProviderConfig|ResourceTypes|Schemas)(/[^/]+)?"), "GET"),
)


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
@scim_endpoint
async def elsewhere(request: Request, rest: str) -> Response:
    await authorize(request, READ if request.method == "GET" else WRITE)
    if rest in ("Bulk", "Me") or rest.startswith("Me/"):
        raise ScimError(501, f"/{rest} is not supported (see ServiceProviderConfig)")
    for pattern, allowed in _KNOWN:
        if pattern.fullmatch(rest):
            raise ScimError(405, f"{request.method} is not allowed on /{rest}", headers={"Allow": allowed})
    raise not_found(f"no SCIM endpoint /{rest}")
