"""SCIM JSON <-> directory records: request validation, representations, `attributes` projection.

Request bodies are validated against `schemas` (RFC 7643): attribute names are case-insensitive and come
out canonical; an attribute the schema does not define is 400 invalidSyntax (RFC 7644 §3.12 — this server
does not silently drop what a client asked to store); a value of the wrong type or size is 400
invalidValue. Read-only attributes (`id`, `meta`, a User's `groups`) may be sent back as read, but not
changed: a different `id`, or `groups` that differ from the current memberships, is 400 mutability.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from iam.users.directory import Email, Group, NewGroup, NewUser, User, primary_email
from iam.users.scim.errors import invalid_syntax, invalid_value, mutability
from iam.users.scim.filter import parse_attr_path
from iam.users.scim.schemas import (
    CORE_GROUP,
    CORE_USER,
    GROUP,
    IAM_USER,
    USER,
    USER_SCHEMA,
    Attr,
    ResourceType,
)

VERIFIED = f"{IAM_USER}:emailVerified"
# Core User attributes kept in the `attributes` JSON column (the others have columns or tables).
JSON_ATTRIBUTES = ("nickName", "profileUrl", "title", "userType", "preferredLanguage", "locale", "timezone",
                   "phoneNumbers")
NAME_COLUMNS = ("givenName", "familyName")


# -- validation -------------------------------------------------------------------------------------------
def validate(attr: Attr, value: Any, where: str) -> Any:
    """The canonical form of `value` for `attr`, or None for "unassigned" (null, [] and {} alike)."""
    if value is None:
        if not attr.clearable:
            raise invalid_value(f"{where} cannot be unassigned: give it a value")
        return None
    if attr.multi:
        if not isinstance(value, list):
            raise invalid_value(f"{where} is multi-valued: it must be an array")
        items = [v for i, item in enumerate(value) if (v := validate_one(attr, item, f"{where}[{i}]")) is not None]
        return items or None
    return validate_one(attr, value, where)


def validate_one(attr: Attr, value: Any, where: str, *, complete: bool = True) -> Any:
    """One value of `attr`; `complete=False` accepts a complex value without its required sub-attributes
    (a PATCH merging a few sub-attributes into an existing value)."""
    if value is None:
        return None
    if attr.type == "complex":
        if not isinstance(value, dict):
            raise invalid_value(f"{where} must be an object")
        result: dict = {}
        seen: set[str] = set()
        for key, item in value.items():
            sub = attr.child(key)
            if sub is None:
                raise invalid_syntax(f"{where} has no sub-attribute {key!r}")
            if sub.name in seen:
                raise invalid_syntax(f"{where}.{sub.name} is given twice")
            seen.add(sub.name)
            if sub.read_only:  # computed by the server (e.g. members.display): ignored on input
                continue
            checked = validate_one(sub, item, f"{where}.{sub.name}")
            if checked is not None:
                result[sub.name] = checked
        for sub in attr.sub if complete else ():
            if sub.required and sub.name not in result:
                raise invalid_value(f"{where}.{sub.name} is required")
        return result or None
    if attr.type == "boolean":
        if not isinstance(value, bool):
            raise invalid_value(f"{where} must be true or false")
        return value
    if not isinstance(value, str):
        raise invalid_value(f"{where} must be a string")
    if len(value) > attr.max_length:
        raise invalid_value(f"{where} may have at most {attr.max_length} characters")
    return value


def _schemas(body: dict, rtype: ResourceType, where: str = "schemas") -> None:
    listed = _get(body, "schemas")
    if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
        raise invalid_syntax(f"{where} must be an array of schema URIs including {rtype.schema.id}")
    known = {s.casefold() for s in rtype.schema_ids}
    for urn in listed:
        if urn.casefold() not in known:
            raise invalid_syntax(f"unknown schema {urn!r} for {rtype.name}")
    if rtype.schema.id.casefold() not in {s.casefold() for s in listed}:
        raise invalid_syntax(f"{where} must include {rtype.schema.id}")


def _get(body: dict, name: str) -> Any:
    folded = name.casefold()
    return next((v for k, v in body.items() if k.casefold() == folded), None)


def document(body: Any, rtype: ResourceType) -> tuple[dict, dict]:
    """(writable attributes, read-only attributes as sent) of a resource body, names canonical."""
    if not isinstance(body, dict):
        raise invalid_syntax(f"the body must be a JSON object ({rtype.name} resource)")
    _schemas(body, rtype)
    doc: dict = {}
    read_only: dict = {}
    seen: set[str] = set()
    for key, value in body.items():
        if key.casefold() == "schemas":
            continue
        extension = rtype.extension(key)
        if extension is not None:
            if key.casefold() in seen:
                raise invalid_syntax(f"{extension.id} is given twice")
            seen.add(key.casefold())
            if value is None:  # null clears every attribute of the extension (RFC 7644 §3.5.1)
                value = dict.fromkeys(a.name for a in extension.attributes)
            if not isinstance(value, dict):
                raise invalid_value(f"{extension.id} must be an object")
            inner: dict = {}
            for name, item in value.items():
                attr = extension.attr(name)
                if attr is None:
                    raise invalid_syntax(f"unknown attribute {name!r} of {extension.id}")
                if attr.name in inner:
                    raise invalid_syntax(f"{extension.id}:{attr.name} is given twice")
                inner[attr.name] = validate(attr, item, f"{extension.id}:{attr.name}")
            doc[extension.id] = inner
            continue
        path = parse_attr_path(key)
        found = rtype.attr(path.name, path.urn) if path and path.sub is None else None
        if found is None:
            raise invalid_syntax(f"unknown attribute {key!r} for {rtype.name}")
        _, attr = found
        if attr.name in seen:
            raise invalid_syntax(f"{attr.name} is given twice")
        seen.add(attr.name)
        if attr.read_only:
            read_only[attr.name] = value
            continue
        checked = validate(attr, value, attr.name)
        if checked is not None:
            doc[attr.name] = checked
    return doc, read_only


@dataclass(frozen=True)
class UserInput:
    new: NewUser
    password: str | None
    active: bool | None  # None: not given (a replace keeps the current value)
    email_verified: bool | None  # None: not given (kept while the primary email stays the same)
    id: str | None
    groups: frozenset[str] | None  # the read-only `groups` as sent back, to check it did not change
    send_verification: bool = False  # a create mails a verification link (never stored)


def parse_user(body: Any) -> UserInput:
    doc, read_only = document(body, USER)
    return user_input(doc, read_only)


def user_input(doc: dict, read_only: dict | None = None) -> UserInput:
    read_only = read_only or {}
    user_name = doc.get("userName")
    if not user_name:
        raise invalid_value("userName is required")
    emails = tuple(_email(e, i) for i, e in enumerate(doc.get("emails") or ()))
    if sum(e.primary for e in emails) > 1:
        raise invalid_value("emails: at most one value may be primary")
    for i, phone in enumerate(doc.get("phoneNumbers") or ()):
        if not phone.get("value"):
            raise invalid_value(f"phoneNumbers[{i}].value is required")
    if sum(bool(p.get("primary")) for p in doc.get("phoneNumbers") or ()) > 1:
        raise invalid_value("phoneNumbers: at most one value may be primary")
    name = dict(doc.get("name") or {})
    attributes = {key: doc[key] for key in JSON_ATTRIBUTES if key in doc}
    extra_name = {k: v for k, v in name.items() if k not in NAME_COLUMNS}
    if extra_name:
        attributes["name"] = extra_name
    new = NewUser(
        user_name=user_name,
        external_id=doc.get("externalId"),
        display_name=doc.get("displayName"),
        given_name=name.get("givenName"),
        family_name=name.get("familyName"),
        attributes=attributes,
        emails=emails,
    )
    extension = doc.get(IAM_USER) or {}
    # Given, unassigned (null) is false; omitted, None: the current value stays while the primary email does.
    verified = extension["emailVerified"] is True if "emailVerified" in extension else None
    password = doc.get("password")
    return UserInput(new, password, doc.get("active"), verified, _read_only_id(read_only),
                     _group_ids(read_only.get("groups")), extension.get("sendVerification") is True)


def _email(value: dict, index: int) -> Email:
    if not value.get("value"):
        raise invalid_value(f"emails[{index}].value is required")
    return Email(value["value"], value.get("type"), bool(value.get("primary")), value.get("display"))


def _read_only_id(read_only: dict) -> str | None:
    value = read_only.get("id")
    if value is not None and not isinstance(value, str):
        raise invalid_value("id must be a string")
    return value


def _group_ids(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(g, dict) and isinstance(g.get("value"), str) for g in value):
        raise invalid_value("groups must be an array of objects with a string value")
    return frozenset(g["value"].lower() for g in value)


def new_user(inp: UserInput, current: User | None) -> NewUser:
    """The user to store: for a create (`current` None) or a replace of `current`."""
    if current is None:
        if inp.groups:
            raise mutability("groups is read-only: group membership is managed through the Group resources")
        return replace(inp.new, active=True if inp.active is None else inp.active,
                       email_verified=bool(inp.email_verified))
    if inp.id is not None and inp.id != current.id:
        raise mutability("id is read-only and cannot change")
    if inp.groups is not None and inp.groups != frozenset(g.id for g in current.groups):
        raise mutability("groups is read-only: group membership is managed through the Group resources")
    if inp.email_verified is not None:
        verified = inp.email_verified
    else:  # a new primary address is not verified unless the same request says so
        verified = current.email_verified and primary_email(inp.new.all_emails()) == current.email
    return replace(inp.new, active=current.active if inp.active is None else inp.active, email_verified=verified)


@dataclass(frozen=True)
class GroupInput:
    new: NewGroup
    id: str | None


def parse_group(body: Any) -> GroupInput:
    doc, read_only = document(body, GROUP)
    return group_input(doc, read_only)


def group_input(doc: dict, read_only: dict | None = None) -> GroupInput:
    display_name = doc.get("displayName")
    if not display_name:
        raise invalid_value("displayName is required")
    members = []
    for i, member in enumerate(doc.get("members") or ()):
        value = member.get("value")
        if not value:
            raise invalid_value(f"members[{i}].value is required")
        kind = member.get("type")
        if kind is not None and kind.casefold() != "user":
            raise invalid_value(f"members[{i}]: only users can be members (type User), not {kind!r}")
        members.append(value.lower())
    new = NewGroup(display_name=display_name, external_id=doc.get("externalId"), members=tuple(members))
    return GroupInput(new, _read_only_id(read_only or {}))


def new_group(inp: GroupInput, current: Group | None) -> NewGroup:
    if current is not None and inp.id is not None and inp.id != current.id:
        raise mutability("id is read-only and cannot change")
    return inp.new


# -- representations --------------------------------------------------------------------------------------
def timestamp(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def etag(version: int) -> str:
    return f'W/"{version}"'


def _meta(kind: str, created: int, modified: int, location: str, version: int) -> dict:
    return {"resourceType": kind, "created": timestamp(created), "lastModified": timestamp(modified),
            "location": location, "version": etag(version)}


def user_resource(user: User, base: str) -> dict:
    doc: dict = {"schemas": [CORE_USER, IAM_USER], "id": user.id}
    if user.external_id is not None:
        doc["externalId"] = user.external_id
    doc["userName"] = user.user_name
    stored = user.attributes
    name = {**(stored.get("name") or {}), "givenName": user.given_name, "familyName": user.family_name}
    name_attr = USER_SCHEMA.attr("name")
    assert name_attr is not None  # the core User schema has it
    name = {a.name: name[a.name] for a in name_attr.sub if name.get(a.name) is not None}
    if name:
        doc["name"] = name
    if user.display_name is not None:
        doc["displayName"] = user.display_name
    for key in JSON_ATTRIBUTES[:-1]:
        if stored.get(key) is not None:
            doc[key] = stored[key]
    doc["active"] = user.active
    if user.emails:
        doc["emails"] = [_email_json(e) for e in user.emails]
    if stored.get("phoneNumbers"):
        doc["phoneNumbers"] = stored["phoneNumbers"]
    if user.groups:
        doc["groups"] = [
            {"value": g.id, "$ref": f"{base}/Groups/{g.id}", "display": g.display_name, "type": "direct"}
            for g in user.groups
        ]
    doc[IAM_USER] = {"emailVerified": user.email_verified}
    doc["meta"] = _meta("User", user.created_at, user.updated_at, f"{base}/Users/{user.id}", user.version)
    return doc


def _email_json(email: Email) -> dict:
    value: dict = {"value": email.value}
    if email.type is not None:
        value["type"] = email.type
    if email.primary:
        value["primary"] = True
    if email.display is not None:
        value["display"] = email.display
    return value


def user_document(user: User) -> dict:
    """The writable part of a user's representation: what PATCH operations apply to."""
    doc = user_resource(user, "")
    for key in ("schemas", "id", "meta", "groups"):
        doc.pop(key, None)
    return doc


def group_resource(group: Group, base: str) -> dict:
    doc: dict = {"schemas": [CORE_GROUP], "id": group.id}
    if group.external_id is not None:
        doc["externalId"] = group.external_id
    doc["displayName"] = group.display_name
    if group.members:
        doc["members"] = [
            {"value": m.id, "$ref": f"{base}/Users/{m.id}", "display": m.display_name or m.user_name, "type": "User"}
            for m in group.members
        ]
    doc["meta"] = _meta("Group", group.created_at, group.updated_at, f"{base}/Groups/{group.id}", group.version)
    return doc


def group_document(group: Group) -> dict:
    doc = group_resource(group, "")
    for key in ("schemas", "id", "meta"):
        doc.pop(key, None)
    for member in doc.get("members", ()):
        member.pop("$ref", None)
    return doc


# -- attributes / excludedAttributes (RFC 7644 §3.4.2.5) ------------------------------------------------------
Selection = tuple[str | None, str, str | None]  # (extension id or None for core, attribute, sub-attribute)


def selections(names: list[str] | None, rtype: ResourceType) -> list[Selection]:
    """The attributes named (unknown names are ignored: they select nothing)."""
    chosen: list[Selection] = []
    for text in names or ():
        text = text.strip()
        extension = rtype.extension(text)
        if extension is not None:
            chosen.extend((extension.id, a.name, None) for a in extension.attributes)
            continue
        path = parse_attr_path(text) if text else None
        found = rtype.attr(path.name, path.urn) if path else None
        if found is None:
            continue
        schema, attr = found
        assert path is not None  # found only for a parsed path
        sub = attr.child(path.sub) if path.sub else None
        if path.sub and sub is None:
            continue
        chosen.append((None if schema is rtype.schema else schema.id, attr.name, sub.name if sub else None))
    return chosen


def wanted(name: str, rtype: ResourceType, attributes: list[str] | None, excluded: list[str] | None) -> bool:
    """Whether the core attribute `name` is in the answer (to skip loading, e.g., a large members list)."""
    if attributes:
        return any(a == name and c is None for c, a, _ in selections(attributes, rtype))
    return not any(a == name and c is None and s is None for c, a, s in selections(excluded, rtype))


def project(doc: dict, rtype: ResourceType, attributes: list[str] | None, excluded: list[str] | None) -> dict:
    if attributes:
        chosen = selections(attributes, rtype)
        out = {key: doc[key] for key in ("schemas", "id") if key in doc}  # returned: always
        whole = {(c, a) for c, a, s in chosen if s is None}
        for container, name, sub in chosen:
            source = doc if container is None else doc.get(container)
            if not isinstance(source, dict) or name not in source:
                continue
            target = out if container is None else out.setdefault(container, {})
            value = source[name]
            if sub is None:
                target[name] = value
            elif (container, name) in whole:
                continue
            elif isinstance(value, dict):
                if sub in value:
                    target.setdefault(name, {})[sub] = value[sub]
            elif isinstance(value, list):
                picked = target.get(name) or [{} for _ in value]
                for item, into in zip(value, picked, strict=True):
                    if sub in item:
                        into[sub] = item[sub]
                target[name] = picked
        for key, value in list(out.items()):
            if isinstance(value, list) and key != "schemas":
                out[key] = [v for v in value if v != {}] or None
                if out[key] is None:
                    del out[key]
        return out
    if excluded:
        out = copy.deepcopy(doc)
        for container, name, sub in selections(excluded, rtype):
            if container is None and name in ("id", "schemas"):
                continue
            target = out if container is None else out.get(container)
            if not isinstance(target, dict):
                continue
            if sub is None:
                target.pop(name, None)
            elif isinstance(target.get(name), dict):
                target[name].pop(sub, None)
            elif isinstance(target.get(name), list):
                for item in target[name]:
                    item.pop(sub, None)
        return out
    return doc
