"""SCIM filters (RFC 7644 §3.4.2.2) and PATCH paths (§3.5.2): a small recursive-descent parser.

    FILTER    = orExp
    orExp     = andExp *("or" andExp)
    andExp    = unary *("and" unary)                       ; "and" binds tighter than "or"
    unary     = "not" "(" FILTER ")" / "(" FILTER ")" / attrExp / valuePath
    valuePath = attrPath "[" valFilter "]"                 ; valFilter: a FILTER over sub-attributes
    attrExp   = attrPath "pr" / attrPath compareOp compValue
    attrPath  = [URN ":"] ATTRNAME ["." subAttr]
    PATH      = attrPath / valuePath ["." subAttr]          ; PATCH "path"

Keywords and attribute names are case-insensitive. The tree compiles to a SQLAlchemy condition over the
users or groups table (list and search), or is evaluated in memory on the values of a multi-valued
attribute (PATCH value filters). Every refusal is a ScimError (400 invalidFilter, or invalidPath for
PATCH paths), never another exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, exists, false, func, not_, or_, select, true

from iam.users.scim.errors import ScimError, invalid_filter, invalid_value
from iam.users.scim.schemas import GROUP, IAM_USER, USER, Attr, ResourceType
from iam.users.store import groups, memberships, user_emails, users

MAX_FILTER = 4096  # characters
MAX_DEPTH = 32  # nested parentheses / not
MAX_TERMS = 200  # comparisons in one filter

COMPARE = frozenset({"eq", "ne", "co", "sw", "ew", "gt", "lt", "ge", "le"})
KEYWORDS = COMPARE | {"and", "or", "not", "pr", "true", "false", "null"}
_NAME = re.compile(r"\$?[A-Za-z][A-Za-z0-9_-]*")
_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<punct>[()\[\]])
    | (?P<string>"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*")
    | (?P<number>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)(?![A-Za-z0-9_.$:])
    | (?P<word>[A-Za-z_$][A-Za-z0-9_$:.\-]*)
    | (?P<dot>\.)
    """,
    re.VERBOSE,
)


# -- the tree ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttrPath:
    urn: str | None
    name: str
    sub: str | None = None

    def __str__(self) -> str:
        text = f"{self.name}.{self.sub}" if self.sub else self.name
        return f"{self.urn}:{text}" if self.urn else text


@dataclass(frozen=True)
class Compare:
    path: AttrPath
    op: str
    value: Any  # str | bool | int | float | None


@dataclass(frozen=True)
class Present:
    path: AttrPath


@dataclass(frozen=True)
class And:
    terms: tuple


@dataclass(frozen=True)
class Or:
    terms: tuple


@dataclass(frozen=True)
class Not:
    term: Any


@dataclass(frozen=True)
class ValuePath:
    path: AttrPath
    filter: Any


@dataclass(frozen=True)
class PatchPath:
    path: AttrPath
    filter: Any = None
    sub: str | None = None


Node = Compare | Present | And | Or | Not | ValuePath


# -- parsing ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Token:
    kind: str  # punct | string | number | word | dot | end
    text: str
    pos: int
    value: Any = None


def _tokens(text: str, error: Callable[[str], ScimError]) -> list[_Token]:
    if len(text) > MAX_FILTER:
        raise error(f"a filter or path may have at most {MAX_FILTER} characters")
    found: list[_Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise error(f"unexpected character {text[pos]!r} at position {pos + 1}")
        kind = match.lastgroup or ""  # every alternative of _TOKEN is a named group
        if kind == "string":
            value = json.loads(match.group())
            if "\x00" in value or not _encodable(value):
                raise error(f"a string at position {pos + 1} holds characters that cannot be stored")
            found.append(_Token("string", match.group(), pos, value))
        elif kind == "number":
            found.append(_Token("number", match.group(), pos, json.loads(match.group())))
        elif kind != "space":
            found.append(_Token(kind, match.group(), pos))
        pos = match.end()
    found.append(_Token("end", "", len(text)))
    return found


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
        return False
    return True


class _Parser:
    def __init__(self, text: str, error: Callable[[str], ScimError]) -> None:
        self.error = error
        self.tokens = _tokens(text, error)
        self.at = 0
        self.terms = 0

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.at + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        token = self.peek()
        self.at = min(self.at + 1, len(self.tokens) - 1)
        return token

    def fail(self, token: _Token, expected: str) -> ScimError:
        found = "the end" if token.kind == "end" else repr(token.text)
        return self.error(f"expected {expected} at position {token.pos + 1}, found {found}")

    def keyword(self, token: _Token, *words: str) -> bool:
        return token.kind == "word" and token.text.lower() in words

    def expect(self, text: str) -> None:
        token = self.take()
        if token.text != text or token.kind not in ("punct", "dot"):
            raise self.fail(token, repr(text))

    def filter(self, depth: int, inner: bool) -> Node:
        if depth > MAX_DEPTH:
            raise self.error(f"a filter may nest at most {MAX_DEPTH} levels")
        terms = [self.conjunction(depth, inner)]
        while self.keyword(self.peek(), "or"):
            self.take()
            terms.append(self.conjunction(depth, inner))
        return terms[0] if len(terms) == 1 else Or(tuple(terms))

    def conjunction(self, depth: int, inner: bool) -> Node:
        terms = [self.unary(depth, inner)]
        while self.keyword(self.peek(), "and"):
            self.take()
            terms.append(self.unary(depth, inner))
        return terms[0] if len(terms) == 1 else And(tuple(terms))

    def unary(self, depth: int, inner: bool) -> Node:
        token = self.peek()
        if self.keyword(token, "not") and self.peek(1).text == "(":
            self.take()
            self.take()
            node = self.filter(depth + 1, inner)
            self.expect(")")
            return Not(node)
        if token.kind == "punct" and token.text == "(":
            self.take()
            node = self.filter(depth + 1, inner)
            self.expect(")")
            return node
        return self.attribute_expression(depth, inner)

    def attribute_path(self) -> AttrPath:
        token = self.take()
        if token.kind != "word" or token.text.lower() in KEYWORDS:
            raise self.fail(token, "an attribute name")
        path = parse_attr_path(token.text)
        if path is None:
            raise self.error(f"{token.text!r} is not a valid attribute path")
        return path

    def attribute_expression(self, depth: int, inner: bool) -> Node:
        path = self.attribute_path()
        token = self.peek()
        if token.kind == "punct" and token.text == "[":
            if inner:
                raise self.error("value filters cannot nest")
            if path.sub is not None:
                raise self.error(f"a value filter applies to a multi-valued attribute, not to {path}")
            self.take()
            node = self.filter(depth + 1, True)
            self.expect("]")
            return ValuePath(path, node)
        operator = self.take()
        op = operator.text.lower() if operator.kind == "word" else ""
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise self.error(f"a filter may hold at most {MAX_TERMS} comparisons")
        if op == "pr":
            return Present(path)
        if op not in COMPARE:
            raise self.fail(operator, "an operator (eq, ne, co, sw, ew, gt, lt, ge, le, pr)")
        value = self.take()
        if value.kind in ("string", "number"):
            return Compare(path, op, value.value)
        if self.keyword(value, "true", "false", "null"):
            return Compare(path, op, {"true": True, "false": False, "null": None}[value.text.lower()])
        raise self.fail(value, "a value (a string, number, true, false or null)")

    def end(self) -> None:
        token = self.peek()
        if token.kind != "end":
            raise self.fail(token, "the end")


def parse_attr_path(text: str) -> AttrPath | None:
    """`[urn:...:]name[.sub]`, or None if `text` is not one."""
    urn = None
    rest = text
    if text[:4].lower() == "urn:":
        urn, _, rest = text.rpartition(":")
    parts = rest.split(".")
    if len(parts) > 2 or not all(_NAME.fullmatch(p) for p in parts):
        return None
    return AttrPath(urn, parts[0], parts[1] if len(parts) == 2 else None)


def parse_filter(text: str) -> Node:
    parser = _Parser(text, invalid_filter)
    if parser.peek().kind == "end":
        raise invalid_filter("the filter is empty")
    node = parser.filter(0, False)
    parser.end()
    return node


def parse_path(text: str, error: Callable[[str], ScimError]) -> PatchPath:
    """A PATCH `path` (RFC 7644 §3.5.2): attrPath, or valuePath with an optional sub-attribute."""
    parser = _Parser(text, error)
    path = parser.attribute_path()
    node = None
    sub = None
    token = parser.peek()
    if token.kind == "punct" and token.text == "[":
        if path.sub is not None:
            raise error(f"a value filter applies to a multi-valued attribute, not to {path}")
        parser.take()
        node = parser.filter(1, True)
        parser.expect("]")
        if parser.peek().kind == "dot":
            parser.take()
            name = parser.take()
            if name.kind != "word" or not _NAME.fullmatch(name.text):
                raise parser.fail(name, "a sub-attribute name")
            sub = name.text
    parser.end()
    return PatchPath(path, node, sub)


def parse_datetime(value: str) -> float | None:
    """Seconds since the epoch of an RFC 3339 date-time (no zone means UTC), or None."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# -- resolving attribute paths against a resource type -----------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    key: str  # canonical: "userName", "name.givenName", "emails.value", "urn:...:emailVerified"
    attr: Attr
    sub: Attr | None


def resolve(path: AttrPath, rtype: ResourceType) -> Resolved | None:
    found = rtype.attr(path.name, path.urn)
    if found is None:
        return None
    schema, attr = found
    sub = None
    if path.sub is not None:
        sub = attr.child(path.sub)
        if sub is None:
            return None
    key = attr.name if schema is rtype.schema else f"{schema.id}:{attr.name}"
    return Resolved(f"{key}.{sub.name}" if sub else key, attr, sub)


# -- SQL --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    column: Any
    kind: str = "string"  # string | boolean | datetime
    # How strings compare: exact (caseExact), ci (lower() on both sides), or against a column that already
    # holds the casefolded / lower-cased value (an index then serves eq and sw).
    mode: str = "ci"


@dataclass(frozen=True)
class Multi:
    source: Any  # the table (or join) holding the values
    link: Any  # correlates a value to its resource
    fields: dict[str, Field]
    default: str = "value"  # `emails co "x"` means `emails.value co "x"`


def _fields(rtype: ResourceType) -> tuple[dict[str, Field], dict[str, Multi]]:
    if rtype is USER:
        scalar = {
            "id": Field(users.c.id, mode="exact"),
            "externalId": Field(users.c.external_id, mode="exact"),
            "userName": Field(users.c.user_name_key, mode="folded"),
            "displayName": Field(users.c.display_name),
            "name.givenName": Field(users.c.given_name),
            "name.familyName": Field(users.c.family_name),
            "active": Field(users.c.active, "boolean"),
            f"{IAM_USER}:emailVerified": Field(users.c.email_verified, "boolean"),
            "meta.created": Field(users.c.created_at, "datetime"),
            "meta.lastModified": Field(users.c.updated_at, "datetime"),
        }
        multi = {
            "emails": Multi(user_emails, user_emails.c.user_id == users.c.id, {
                "value": Field(user_emails.c.value_key, mode="lowered"),
                "type": Field(user_emails.c.type),
                "display": Field(user_emails.c.display),
                "primary": Field(user_emails.c.is_primary, "boolean"),
            }),
            "groups": Multi(memberships.join(groups, groups.c.id == memberships.c.group_id),
                            memberships.c.user_id == users.c.id, {
                "value": Field(memberships.c.group_id, mode="lowered"),
                "display": Field(groups.c.display_name_key, mode="folded"),
            }),
        }
        return scalar, multi
    scalar = {
        "id": Field(groups.c.id, mode="exact"),
        "externalId": Field(groups.c.external_id, mode="exact"),
        "displayName": Field(groups.c.display_name_key, mode="folded"),
        "meta.created": Field(groups.c.created_at, "datetime"),
        "meta.lastModified": Field(groups.c.updated_at, "datetime"),
    }
    multi = {
        "members": Multi(memberships, memberships.c.group_id == groups.c.id, {
            "value": Field(memberships.c.user_id, mode="lowered"),
        }),
    }
    return scalar, multi


_FIELDS = {USER.name: _fields(USER), GROUP.name: _fields(GROUP)}

_SORT: dict[str, dict[str, Any]] = {
    USER.name: {
        "id": users.c.id,
        "externalId": users.c.external_id,
        "userName": users.c.user_name_key,
        "displayName": func.lower(users.c.display_name),
        "name.givenName": func.lower(users.c.given_name),
        "name.familyName": func.lower(users.c.family_name),
        "emails": users.c.email,  # RFC 7644 §3.4.2.3: a multi-valued attribute sorts by its primary value
        "emails.value": users.c.email,
        "active": users.c.active,
        "meta.created": users.c.created_at,
        "meta.lastModified": users.c.updated_at,
    },
    GROUP.name: {
        "id": groups.c.id,
        "externalId": groups.c.external_id,
        "displayName": groups.c.display_name_key,
        "meta.created": groups.c.created_at,
        "meta.lastModified": groups.c.updated_at,
    },
}


def sort_column(text: str, rtype: ResourceType):
    """The column `sortBy` names, or a 400 invalidValue."""
    path = parse_attr_path(text.strip())
    resolved = resolve(path, rtype) if path else None
    column = _SORT[rtype.name].get(resolved.key) if resolved else None
    if column is None:
        raise invalid_value(f"cannot sort by {text!r}")
    return column


def to_sql(node: Node, rtype: ResourceType, dialect: str, *, strict: bool = True):
    """A SQL condition over the resource type's table. Not strict: unknown attributes match nothing."""
    return _Sql(rtype, dialect, strict).compile(node)


class _Sql:
    def __init__(self, rtype: ResourceType, dialect: str, strict: bool) -> None:
        self.rtype = rtype
        self.scalar, self.multi = _FIELDS[rtype.name]
        self.dialect = dialect
        self.strict = strict

    def compile(self, node: Node):
        if isinstance(node, And):
            return and_(*(self.compile(t) for t in node.terms))
        if isinstance(node, Or):
            return or_(*(self.compile(t) for t in node.terms))
        if isinstance(node, Not):
            return not_(self.compile(node.term))
        resolved = resolve(node.path, self.rtype)
        if resolved is None:
            if self.strict:
                raise invalid_filter(f"unknown attribute {node.path} for {self.rtype.name}")
            return false()
        if isinstance(node, ValuePath):
            multi = self.multi.get(resolved.key)
            if multi is None:
                raise invalid_filter(f"{node.path} is not a multi-valued attribute that can be filtered")
            return self._exists(multi, self._inner(node.filter, resolved.attr, multi))
        op = "pr" if isinstance(node, Present) else node.op
        value = None if isinstance(node, Present) else node.value
        field = self.scalar.get(resolved.key)
        if field is not None:
            return self.condition(field, op, value, str(node.path))
        if resolved.attr.multi and resolved.attr.name in self.multi and not (
            resolved.key.startswith("urn:")
        ):
            multi = self.multi[resolved.attr.name]
            field = multi.fields.get(resolved.sub.name if resolved.sub else multi.default)
            if field is not None:
                if op == "ne":  # no value equals it (a resource without values included)
                    return not_(self._exists(multi, self.condition(field, "eq", value, str(node.path))))
                return self._exists(multi, self.condition(field, op, value, str(node.path)))
        raise invalid_filter(f"filtering on {node.path} is not supported")

    def _inner(self, node: Node, attr: Attr, multi: Multi):
        """A value filter's condition over one value's row (attribute names are sub-attributes)."""
        if isinstance(node, And):
            return and_(*(self._inner(t, attr, multi) for t in node.terms))
        if isinstance(node, Or):
            return or_(*(self._inner(t, attr, multi) for t in node.terms))
        if isinstance(node, Not):
            return not_(self._inner(node.term, attr, multi))
        sub = attr.child(node.path.name) if node.path.urn is None and node.path.sub is None else None
        field = multi.fields.get(sub.name) if sub else None
        if field is None or sub is None:
            raise invalid_filter(f"filtering {attr.name} values on {node.path} is not supported")
        if isinstance(node, Present):
            return self.condition(field, "pr", None, f"{attr.name}.{sub.name}")
        assert isinstance(node, Compare)  # a value filter holds no value path (the parser refuses one)
        return self.condition(field, node.op, node.value, f"{attr.name}.{sub.name}")

    @staticmethod
    def _exists(multi: Multi, condition):
        return exists(select(true()).select_from(multi.source).where(multi.link, condition))

    def condition(self, field: Field, op: str, value: Any, name: str):
        column = field.column
        present = and_(column.is_not(None), column != "") if field.kind == "string" else column.is_not(None)
        if op == "pr":
            return present
        if value is None:
            if op == "eq":
                return not_(present)
            if op == "ne":
                return present
            raise invalid_filter(f"{name} {op} null: null compares only with eq and ne")
        if field.kind == "boolean":
            if op not in ("eq", "ne") or not isinstance(value, bool):
                raise invalid_filter(f"{name} is a boolean: compare it with eq or ne and true or false")
            return and_(column.is_not(None), column == value) if op == "eq" else or_(column.is_(None),
                                                                                 column != value)
        if not isinstance(value, str):
            raise invalid_filter(f"{name} is a string attribute: compare it with a string")
        if field.kind == "datetime":
            moment = parse_datetime(value)
            if moment is None or op in ("co", "sw", "ew"):
                raise invalid_filter(f"{name} is a dateTime: compare it with eq, ne, gt, ge, lt or le and an "
                                     "RFC 3339 date-time")
            return _ordered(column, op, moment)
        folded, operand = {
            "exact": (column, value),
            "ci": (func.lower(column), value.lower()),
            "folded": (column, value.casefold()),
            "lowered": (column, value.lower()),
        }[field.mode]
        if op in ("co", "sw", "ew"):
            return and_(column.is_not(None), self._like(folded, op, operand, field.mode == "exact"))
        return _ordered(folded, op, operand, column)

    def _like(self, column, op: str, value: str, case_exact: bool):
        if case_exact and self.dialect == "sqlite":  # SQLite's LIKE ignores ASCII case; GLOB does not
            escaped = re.sub(r"([*?\[])", r"[\1]", value)
            pattern = {"co": f"*{escaped}*", "sw": f"{escaped}*", "ew": f"*{escaped}"}[op]
            return column.op("GLOB")(pattern)
        escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = {"co": f"%{escaped}%", "sw": f"{escaped}%", "ew": f"%{escaped}"}[op]
        return column.like(pattern, escape="\\")


def _ordered(column, op: str, value, null_check=None):
    check = column if null_check is None else null_check
    if op == "ne":
        return or_(check.is_(None), column != value)
    compared = {
        "eq": column == value,
        "gt": column > value,
        "ge": column >= value,
        "lt": column < value,
        "le": column <= value,
    }.get(op)
    if compared is None:
        raise invalid_filter(f"operator {op} does not apply here")
    return and_(check.is_not(None), compared)


# -- in memory: PATCH value filters ------------------------------------------------------------------------
def check_value_filter(node: Node, attr: Attr, error: Callable[[str], ScimError]) -> None:
    """Refuse a value filter that names no sub-attribute of `attr` or compares with the wrong type."""
    if isinstance(node, And | Or):
        for term in node.terms:
            check_value_filter(term, attr, error)
        return
    if isinstance(node, Not):
        check_value_filter(node.term, attr, error)
        return
    sub = attr.child(node.path.name) if node.path.urn is None and node.path.sub is None else None
    if sub is None or isinstance(node, ValuePath):
        raise error(f"{attr.name} has no sub-attribute {node.path}")
    if isinstance(node, Compare) and node.value is not None:
        expected = bool if sub.type == "boolean" else str
        if not isinstance(node.value, expected):
            raise error(f"{attr.name}.{sub.name} compares with a {'boolean' if expected is bool else 'string'}")
        if expected is bool and node.op not in ("eq", "ne"):
            raise error(f"{attr.name}.{sub.name} is a boolean: compare it with eq or ne")
    elif isinstance(node, Compare) and node.op not in ("eq", "ne"):
        raise error("null compares only with eq and ne")


def matches(node: Node, value: dict, attr: Attr) -> bool:
    """Whether one value of the multi-valued `attr` (canonical sub-attribute names) passes the filter."""
    if isinstance(node, And):
        return all(matches(t, value, attr) for t in node.terms)
    if isinstance(node, Or):
        return any(matches(t, value, attr) for t in node.terms)
    if isinstance(node, Not):
        return not matches(node.term, value, attr)
    sub = attr.child(node.path.name)
    assert sub is not None  # checked when the filter was parsed for this attribute
    actual = value.get(sub.name)
    if isinstance(node, Present):
        return actual not in (None, "", [], {})
    assert isinstance(node, Compare)  # a value filter holds no value path (the parser refuses one)
    op, expected = node.op, node.value
    if expected is None:
        return (actual is None) == (op == "eq")
    if actual is None:
        return op == "ne"
    if isinstance(expected, bool) or isinstance(actual, bool):
        same = actual is expected
        return same if op == "eq" else not same if op == "ne" else False
    if not isinstance(actual, str):
        return op == "ne"
    if not sub.case_exact:
        actual, expected = actual.lower(), expected.lower()
    return {
        "eq": actual == expected,
        "ne": actual != expected,
        "co": expected in actual,
        "sw": actual.startswith(expected),
        "ew": actual.endswith(expected),
        "gt": actual > expected,
        "ge": actual >= expected,
        "lt": actual < expected,
        "le": actual <= expected,
    }[op]


def equalities(node: Node) -> dict[str, Any] | None:
    """The sub-attribute values a filter like `type eq "work" and primary eq true` pins, or None."""
    terms = node.terms if isinstance(node, And) else (node,)
    pinned: dict[str, Any] = {}
    for term in terms:
        if not isinstance(term, Compare) or term.op != "eq" or term.value is None:
            return None
        pinned[term.path.name] = term.value
    return pinned
