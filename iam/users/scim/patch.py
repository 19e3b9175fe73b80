"""PATCH (RFC 7644 §3.5.2): add / replace / remove, with or without a path, on a resource's document.

Operations are parsed and checked (paths, mutability) before anything is read, then applied in order to
the writable document of the current resource (`resources.user_document` / `group_document`). The result
is validated as a whole, like a PUT body, and written only if every operation applied: a PATCH is atomic.

Choices where the RFC leaves room (documented in README):
- `op` is case-insensitive ("Add", "Replace", "Remove" as Microsoft Entra sends them).
- Without a path, each key of the value object is itself a path: `{"name.givenName": "x"}` and
  `{"emails[type eq \\"work\\"].value": "x"}` work as they would with that path.
- `add` on a value filter with a sub-attribute that matches nothing, for a filter of `eq` terms only
  (`emails[type eq "work"].value`), adds a value with those sub-attributes; `replace` answers noTarget.
- `remove` of a multi-valued attribute with a `value` removes the listed values (matched on `value`).
- `remove` of a value filter that matches nothing succeeds (the values are already absent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from iam.users.scim.errors import (
    ScimError,
    invalid_path,
    invalid_syntax,
    invalid_value,
    mutability,
    no_target,
)
from iam.users.scim.filter import check_value_filter, equalities, matches, parse_path
from iam.users.scim.resources import validate, validate_one
from iam.users.scim.schemas import PATCH_OP, Attr, ResourceType

OPS = ("add", "replace", "remove")


@dataclass(frozen=True)
class Target:
    container: str | None  # None: the core schema; else the extension's id
    attr: Attr | None  # None: the whole extension
    filter: Any = None
    sub: Attr | None = None
    text: str = ""

    @property
    def key(self) -> str:
        name = self.attr.name if self.attr else "*"
        return name if self.container is None else f"{self.container}:{name}"


@dataclass(frozen=True)
class Operation:
    op: str
    target: Target | None
    value: Any


def parse_patch(body: Any, rtype: ResourceType) -> list[Operation]:
    if not isinstance(body, dict):
        raise invalid_syntax("the body must be a JSON object (PatchOp)")
    operations = None
    for key, value in body.items():
        folded = key.casefold()
        if folded == "schemas":
            if not isinstance(value, list) or PATCH_OP.casefold() not in {
                s.casefold() for s in value if isinstance(s, str)
            }:
                raise invalid_syntax(f"schemas must be [{PATCH_OP!r}]")
        elif folded == "operations":
            operations = value
        else:
            raise invalid_syntax(f"unknown PatchOp member {key!r}")
    if not any(k.casefold() == "schemas" for k in body):
        raise invalid_syntax(f"schemas must be [{PATCH_OP!r}]")
    if not isinstance(operations, list) or not operations:
        raise invalid_syntax("Operations must be a non-empty array")
    return [_operation(item, i, rtype) for i, item in enumerate(operations)]


def _operation(item: Any, index: int, rtype: ResourceType) -> Operation:
    where = f"Operations[{index}]"
    if not isinstance(item, dict):
        raise invalid_syntax(f"{where} must be an object")
    fields: dict[str, Any] = {}
    for key, value in item.items():
        folded = key.casefold()
        if folded not in ("op", "path", "value"):
            raise invalid_syntax(f"{where}: unknown member {key!r}")
        fields[folded] = value
    op = fields.get("op")
    if not isinstance(op, str) or op.lower() not in OPS:
        raise invalid_syntax(f"{where}.op must be add, replace or remove")
    op = op.lower()
    path = fields.get("path")
    if path is not None and not isinstance(path, str):
        raise invalid_path(f"{where}.path must be a string")
    target = target_of(path, rtype) if path is not None and path.strip() else None
    if op == "remove" and target is None:
        raise no_target(f"{where}: remove needs a path")
    if op != "remove" and "value" not in fields:
        raise invalid_syntax(f"{where}: {op} needs a value")
    return Operation(op, target, fields.get("value"))


def target_of(path: str, rtype: ResourceType) -> Target:
    path = path.strip()
    extension = rtype.extension(path)
    if extension is not None:
        return Target(extension.id, None, text=path)
    parsed = parse_path(path, invalid_path)
    found = rtype.attr(parsed.path.name, parsed.path.urn)
    if found is None:
        raise invalid_path(f"{path!r}: no such attribute of {rtype.name}")
    schema, attr = found
    sub = None
    sub_name = parsed.path.sub or parsed.sub
    if sub_name is not None:
        sub = attr.child(sub_name) if attr.type == "complex" else None
        if sub is None:
            raise invalid_path(f"{path!r}: {attr.name} has no sub-attribute {sub_name!r}")
    if parsed.filter is not None:
        if not (attr.multi and attr.type == "complex"):
            raise invalid_path(f"{path!r}: a value filter needs a multi-valued complex attribute")
        check_value_filter(parsed.filter, attr, invalid_path)
    if attr.read_only or (sub is not None and sub.read_only):
        hint = ": group membership is managed through the Group resources" if attr.name == "groups" else ""
        raise mutability(f"{path!r} is read-only{hint}")
    return Target(None if schema is rtype.schema else schema.id, attr, parsed.filter, sub, path)


def apply_patch(doc: dict, operations: list[Operation], rtype: ResourceType) -> set[str]:
    """Apply the operations to `doc` in place; answer the keys of the attributes they touched."""
    touched: set[str] = set()
    for operation in operations:
        if operation.target is None:
            _without_path(doc, operation, rtype, touched)
        else:
            _apply(doc, operation.op, operation.target, operation.value, rtype, touched)
    return touched


def _without_path(doc: dict, operation: Operation, rtype: ResourceType, touched: set[str]) -> None:
    # RFC 7644 §3.5.2.1 / §3.5.2.3: the value is an object of attributes to add or replace.
    if not isinstance(operation.value, dict):
        raise invalid_value(f"{operation.op} without a path needs an object of attributes as its value")
    for key, value in operation.value.items():
        if key.casefold() == "schemas":
            continue
        try:
            target = target_of(key, rtype)
        except ScimError as exc:
            if exc.scim_type == "invalidPath":
                raise invalid_syntax(f"unknown attribute {key!r} for {rtype.name}") from None
            raise
        _apply(doc, operation.op, target, value, rtype, touched)


def _apply(doc: dict, op: str, target: Target, value: Any, rtype: ResourceType, touched: set[str]) -> None:
    container = doc if target.container is None else doc.setdefault(target.container, {})
    if target.attr is None:  # the whole extension
        assert target.container is not None  # a target is an attribute, or an extension by its URN
        extension = rtype.extension(target.container)
        assert extension is not None  # the path resolved to it
        if op == "remove":
            doc.pop(extension.id, None)
            touched.update(f"{extension.id}:{a.name}" for a in extension.attributes)
            return
        if not isinstance(value, dict):
            raise invalid_value(f"{extension.id} must be an object")
        for name, item in value.items():
            attr = extension.attr(name)
            if attr is None:
                raise invalid_syntax(f"unknown attribute {name!r} of {extension.id}")
            _apply(doc, op, Target(extension.id, attr, text=f"{extension.id}:{attr.name}"), item, rtype, touched)
        return
    attr = target.attr
    touched.add(target.key)
    where = target.text
    if attr.mutability == "writeOnly":  # password
        if op == "remove":
            raise mutability(f"{attr.name} cannot be removed: set a new one, or deactivate the user")
        container[attr.name] = validate(attr, value, where)
        return
    if target.filter is not None:
        _filtered(container, op, target, value)
    elif target.sub is not None:
        _sub(container, op, attr, target.sub, value, where)
    elif op == "remove":
        if not attr.clearable:  # the same rule as a null value
            validate(attr, None, where)
        if value is not None and attr.multi and attr.child("value") is not None:
            _remove_listed(container, attr, value, where)
        else:
            container.pop(attr.name, None)
    elif attr.multi:
        items = validate(attr, [value] if isinstance(value, dict) else value, where) or []
        if op == "add":
            _append(container, attr, items)
        else:
            _set(container, attr.name, items)
            _settle_primary(items, items)
    elif attr.type == "complex":  # add and replace both merge the sub-attributes given (§3.5.2.3)
        checked = validate(attr, value, where)
        if checked is None:
            container.pop(attr.name, None)
        else:
            container[attr.name] = {**(container.get(attr.name) or {}), **checked}
    else:
        _set(container, attr.name, validate(attr, value, where))
    if target.container is not None and not container:
        doc.pop(target.container, None)


def _set(container: dict, name: str, value: Any) -> None:
    if value in (None, [], {}):
        container.pop(name, None)
    else:
        container[name] = value


def _same(attr: Attr, a: dict, b: dict) -> bool:
    if attr.name == "members":
        return str(a.get("value", "")).lower() == str(b.get("value", "")).lower()
    return a == b


def _append(container: dict, attr: Attr, items: list[dict]) -> None:
    values = [dict(v) for v in container.get(attr.name) or ()]
    added = []
    for item in items:
        if any(_same(attr, existing, item) for existing in values):
            continue
        values.append(item)
        added.append(item)
    _settle_primary(values, added)
    _set(container, attr.name, values)


def _settle_primary(values: list, changed: list) -> None:
    """A value newly made primary takes the flag from the others (RFC 7643 §2.4: primary at most once)."""
    if any(isinstance(v, dict) and v.get("primary") is True for v in changed):
        for value in values:
            if isinstance(value, dict) and not any(value is c for c in changed):
                value.pop("primary", None)


def _remove_listed(container: dict, attr: Attr, value: Any, where: str) -> None:
    listed = [value] if isinstance(value, dict) else value
    if not isinstance(listed, list) or not all(isinstance(v, dict) and isinstance(v.get("value"), str) for v in listed):
        raise invalid_value(f"{where}: remove with a value lists objects with a string value")
    gone = {v["value"].lower() for v in listed}
    kept = [v for v in container.get(attr.name) or () if str(v.get("value", "")).lower() not in gone]
    _set(container, attr.name, kept)


def _sub(container: dict, op: str, attr: Attr, sub: Attr, value: Any, where: str) -> None:
    if not attr.multi:  # e.g. name.givenName
        current = dict(container.get(attr.name) or {})
        if op == "remove":
            current.pop(sub.name, None)
        else:
            _set(current, sub.name, validate(sub, value, where))
        _set(container, attr.name, current)
        return
    values = [dict(v) for v in container.get(attr.name) or ()]  # e.g. emails.type: every value
    if not values:
        if op == "remove":
            return
        raise no_target(f"{where}: {attr.name} has no values")
    for item in values:
        if op == "remove":
            item.pop(sub.name, None)
        else:
            _set(item, sub.name, validate(sub, value, where))
    if op != "remove" and sub.name == "primary" and value is True and len(values) > 1:
        raise invalid_value(f"{where}: at most one value may be primary")
    _set(container, attr.name, [v for v in values if v])


def _filtered(container: dict, op: str, target: Target, value: Any) -> None:
    attr, sub, where = target.attr, target.sub, target.text
    assert attr is not None  # a filtered path names a multi-valued attribute
    values = [dict(v) for v in container.get(attr.name) or ()]
    hits = [v for v in values if matches(target.filter, v, attr)]
    if op == "remove":
        if sub is None:
            values = [v for v in values if not any(v is h for h in hits)]
        else:
            for hit in hits:
                hit.pop(sub.name, None)
        _set(container, attr.name, [v for v in values if v])
        return
    if sub is None:
        item = validate_one(attr, value, where, complete=op != "add")
        if item is None:
            raise invalid_value(f"{where}: the value must be an object of {attr.name} sub-attributes")
        changed = []
        for hit in hits:
            replacement = dict(item) if op == "replace" else {**hit, **item}
            hit.clear()
            hit.update(replacement)
            changed.append(hit)
    else:
        checked = validate(sub, value, where)
        changed = []
        for hit in hits:
            _set(hit, sub.name, checked)
            changed.append(hit)
        item = None if checked is None else {sub.name: checked}
    if not hits:
        pinned = equalities(target.filter) if op == "add" else None
        if pinned is None or item is None:
            raise no_target(f"{where}: no value of {attr.name} matches the filter")
        new = validate_one(attr, {**pinned, **item}, where)
        values.append(new)
        changed = [new]
    _settle_primary(values, changed)
    _set(container, attr.name, [v for v in values if v])
