"""The SCIM schemas this server implements, defined once (RFC 7643 §4, §7, §8.7).

Request validation, filter and PATCH path resolution, `attributes` projection and the discovery documents
(`/Schemas`, `/ResourceTypes`, `/ServiceProviderConfig`) all read these definitions. Attribute names are
case-insensitive (RFC 7643 §2.1): lookups fold case and answer the canonical spelling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
IAM_USER = "urn:ietf:params:scim:schemas:extension:iam:2.0:User"
LIST_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SEARCH_REQUEST = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
SPC_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"
RESOURCE_TYPE_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:ResourceType"
SCHEMA_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Schema"

MAX_PAYLOAD = 64 * 1024  # bytes of a request body (ServiceProviderConfig bulk.maxPayloadSize, 413 above)
MAX_RESULTS = 200  # the most resources one list answer holds (filter.maxResults)
DEFAULT_COUNT = 100


@dataclass(frozen=True)
class Attr:
    name: str
    type: str = "string"  # string | boolean | integer | complex | reference | dateTime
    multi: bool = False
    required: bool = False
    case_exact: bool = False
    mutability: str = "readWrite"  # readOnly | readWrite | immutable | writeOnly
    returned: str = "default"  # always | never | default | request
    uniqueness: str = "none"
    description: str = ""
    sub: tuple[Attr, ...] = ()
    canonical: tuple[str, ...] = ()
    reference_types: tuple[str, ...] = ()
    max_length: int = 255
    # False: the attribute may be omitted (a default applies, or a PUT keeps the value) but never unassigned
    # (null, or PATCH remove: RFC 7643 §2.5, RFC 7644 §3.5.2.2): that is 400 invalidValue, not a silent no-op.
    clearable: bool = True

    def child(self, name: str) -> Attr | None:
        folded = name.casefold()
        return next((a for a in self.sub if a.name.casefold() == folded), None)

    @property
    def read_only(self) -> bool:
        return self.mutability == "readOnly"

    def definition(self) -> dict:
        """The RFC 7643 §7 attribute definition."""
        doc: dict = {
            "name": self.name,
            "type": self.type,
            "multiValued": self.multi,
            "description": self.description,
            "required": self.required,
        }
        if self.type in ("string", "reference"):
            doc["caseExact"] = self.case_exact
        if self.canonical:
            doc["canonicalValues"] = list(self.canonical)
        if self.reference_types:
            doc["referenceTypes"] = list(self.reference_types)
        if self.sub:
            doc["subAttributes"] = [a.definition() for a in self.sub]
        doc.update(mutability=self.mutability, returned=self.returned, uniqueness=self.uniqueness)
        return doc


@dataclass(frozen=True)
class Schema:
    id: str
    name: str
    description: str
    attributes: tuple[Attr, ...]

    def attr(self, name: str) -> Attr | None:
        folded = name.casefold()
        return next((a for a in self.attributes if a.name.casefold() == folded), None)

    def definition(self, base: str) -> dict:
        return {
            "schemas": [SCHEMA_SCHEMA],
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "attributes": [a.definition() for a in self.attributes],
            "meta": {"resourceType": "Schema", "location": f"{base}/Schemas/{self.id}"},
        }


def _s(name: str, **kw) -> Attr:
    return Attr(name, "string", **kw)


def _multi_value(name: str, description: str, types: tuple[str, ...], value_length: int = 255) -> Attr:
    return Attr(name, "complex", multi=True, description=description, sub=(
        _s("value", required=True, description=f"The {description.lower()} value.", max_length=value_length),
        _s("display", description="A human-readable name, primarily used for display purposes."),
        _s("type", description="A label indicating the attribute's function.", canonical=types, max_length=64),
        Attr("primary", "boolean", description="The primary or preferred value; true at most once."),
    ))


# Common attributes (RFC 7643 §3.1): part of every resource, not of a schema's attribute list.
ID = _s("id", case_exact=True, mutability="readOnly", returned="always", uniqueness="server",
        description="Unique identifier of the resource, assigned by the service provider.", max_length=64)
EXTERNAL_ID = _s("externalId", case_exact=True, description="Identifier of the resource in the provisioning client.")
META = Attr("meta", "complex", mutability="readOnly", description="Resource metadata.", sub=(
    _s("resourceType", case_exact=True, mutability="readOnly"),
    Attr("created", "dateTime", mutability="readOnly"),
    Attr("lastModified", "dateTime", mutability="readOnly"),
    Attr("location", "reference", mutability="readOnly", case_exact=True, reference_types=("uri",), max_length=2048),
    _s("version", case_exact=True, mutability="readOnly"),
))
SCHEMAS = Attr("schemas", "reference", multi=True, required=True, case_exact=True, mutability="readOnly",
               returned="always", reference_types=("uri",))
COMMON = (ID, EXTERNAL_ID, META)

USER_SCHEMA = Schema(CORE_USER, "User", "User Account", (
    _s("userName", required=True, uniqueness="server",
       description="Unique identifier for the user, used to sign in. Compared case-insensitively."),
    Attr("name", "complex", description="The components of the user's name.", sub=(
        _s("formatted", description="The full name, formatted for display."),
        _s("familyName", description="The family name (last name)."),
        _s("givenName", description="The given name (first name)."),
        _s("middleName", description="The middle name(s)."),
        _s("honorificPrefix", description="The honorific prefix(es), e.g. 'Ms.'."),
        _s("honorificSuffix", description="The honorific suffix(es), e.g. 'III'."),
    )),
    _s("displayName", description="The name of the user, suitable for display."),
    _s("nickName", description="The casual way to address the user."),
    Attr("profileUrl", "reference", reference_types=("external",), max_length=2048,
         description="A URI of the user's online profile."),
    _s("title", description="The user's title, such as 'Vice President'."),
    _s("userType", description="The relationship between the organization and the user."),
    _s("preferredLanguage", description="The user's preferred language (RFC 7231 Accept-Language)."),
    _s("locale", description="The user's default location (language tag)."),
    _s("timezone", description="The user's time zone (IANA name)."),
    Attr("active", "boolean", clearable=False,
         description="Whether the user may sign in; false stops new logins and refreshes. Cannot be unassigned."),
    _s("password", mutability="writeOnly", returned="never", max_length=1024, clearable=False,
       description="The user's cleartext password; handed to the authentication role, never stored or returned."),
    _multi_value("emails", "Email addresses", ("work", "home", "other"), value_length=320),
    _multi_value("phoneNumbers", "Phone numbers", ("work", "home", "mobile", "fax", "pager", "other")),
    Attr("groups", "complex", multi=True, mutability="readOnly",
         description="The groups the user belongs to; managed through the Group resources.", sub=(
             _s("value", mutability="readOnly", description="The id of the group."),
             Attr("$ref", "reference", mutability="readOnly", reference_types=("Group",), max_length=2048),
             _s("display", mutability="readOnly", description="The group's displayName."),
             _s("type", mutability="readOnly", canonical=("direct", "indirect")),
         )),
))

IAM_USER_SCHEMA = Schema(IAM_USER, "IamUser", "iam's User extension", (
    Attr("emailVerified", "boolean",
         description="Whether the primary email address is verified (the OIDC email_verified claim). "
                     "Reset to false when the primary email changes unless set in the same request; "
                     "unassigned (null, removed) is false."),
    Attr("sendVerification", "boolean", mutability="writeOnly", returned="never",
         description="On create: true mails the user a link that verifies the primary email address "
                     "(when the authentication role has mail configured). Never stored or returned."),
))

GROUP_SCHEMA = Schema(CORE_GROUP, "Group", "Group", (
    _s("displayName", required=True, uniqueness="server",
       description="A human-readable name for the group; unique, compared case-insensitively."),
    Attr("members", "complex", multi=True, description="The members of the group (users).", sub=(
        _s("value", required=True, mutability="immutable", description="The id of the member user.", max_length=64),
        Attr("$ref", "reference", mutability="immutable", reference_types=("User",), max_length=2048),
        _s("display", mutability="readOnly", description="The member's displayName or userName."),
        _s("type", mutability="immutable", canonical=("User",), max_length=64),
    )),
))


@dataclass(frozen=True)
class ResourceType:
    name: str
    endpoint: str
    description: str
    schema: Schema
    extensions: tuple[Schema, ...] = field(default=())

    @property
    def schema_ids(self) -> list[str]:
        return [self.schema.id, *(e.id for e in self.extensions)]

    def extension(self, urn: str) -> Schema | None:
        folded = urn.casefold()
        return next((e for e in self.extensions if e.id.casefold() == folded), None)

    def schema_of(self, urn: str | None) -> Schema | None:
        if urn is None or urn.casefold() == self.schema.id.casefold():
            return self.schema
        return self.extension(urn)

    def attr(self, name: str, urn: str | None = None) -> tuple[Schema, Attr] | None:
        """The attribute `name` of the schema `urn` (core when None), common attributes included."""
        schema = self.schema_of(urn)
        if schema is None:
            return None
        if schema is self.schema:
            folded = name.casefold()
            common = next((a for a in COMMON if a.name.casefold() == folded), None)
            if common is not None:
                return schema, common
        found = schema.attr(name)
        return None if found is None else (schema, found)

    def definition(self, base: str) -> dict:
        return {
            "schemas": [RESOURCE_TYPE_SCHEMA],
            "id": self.name,
            "name": self.name,
            "endpoint": self.endpoint,
            "description": self.description,
            "schema": self.schema.id,
            "schemaExtensions": [{"schema": e.id, "required": False} for e in self.extensions],
            "meta": {"resourceType": "ResourceType", "location": f"{base}/ResourceTypes/{self.name}"},
        }


# The schemas of the discovery resources themselves (RFC 7643 §5-7, as §8.7.2 represents them): clients read
# these to interpret /ServiceProviderConfig, /ResourceTypes and /Schemas. Every attribute is read-only.
def _ro(name: str, type_: str = "string", **kw) -> Attr:
    return Attr(name, type_, mutability="readOnly", **kw)


def _supported(name: str, description: str, *extra: Attr) -> Attr:
    return _ro(name, "complex", required=True, description=description, sub=(
        _ro("supported", "boolean", required=True, description="Whether the operation is supported."), *extra))


SPC_SCHEMA_DEFINITION = Schema(SPC_SCHEMA, "Service Provider Configuration",
                               "Schema for representing the service provider's configuration", (
    _ro("documentationUri", "reference", reference_types=("external",), max_length=2048,
        description="An HTTP-addressable URL pointing to the service provider's human-consumable help documentation."),
    _supported("patch", "A complex type that specifies PATCH configuration options."),
    _supported("bulk", "A complex type that specifies bulk configuration options.",
               _ro("maxOperations", "integer", required=True, description="The maximum number of operations."),
               _ro("maxPayloadSize", "integer", required=True, description="The maximum payload size in bytes.")),
    _supported("filter", "A complex type that specifies FILTER options.",
               _ro("maxResults", "integer", required=True, description="The maximum number of resources returned.")),
    _supported("changePassword", "A complex type that specifies configuration options related to changing a password."),
    _supported("sort", "A complex type that specifies sort result options."),
    _supported("etag", "A complex type that specifies ETag configuration options."),
    _ro("authenticationSchemes", "complex", multi=True, required=True,
        description="A complex type that specifies supported authentication scheme properties.", sub=(
            _ro("type", required=True, canonical=("oauth", "oauth2", "oauthbearertoken", "httpbasic", "httpdigest"),
                description="The authentication scheme."),
            _ro("name", required=True, description="The common authentication scheme name, e.g., HTTP Basic."),
            _ro("description", required=True, description="A description of the authentication scheme."),
            _ro("specUri", "reference", reference_types=("external",), max_length=2048,
                description="An HTTP-addressable URL pointing to the authentication scheme's specification."),
            _ro("documentationUri", "reference", reference_types=("external",), max_length=2048,
                description="An HTTP-addressable URL pointing to the authentication scheme's usage documentation."),
            _ro("primary", "boolean", description="Whether this is the preferred authentication scheme."),
        )),
))

RESOURCE_TYPE_SCHEMA_DEFINITION = Schema(RESOURCE_TYPE_SCHEMA, "ResourceType",
                                         "Specifies the schema that describes a SCIM resource type", (
    _ro("id", description="The resource type's server unique id; the same as the 'name' attribute."),
    _ro("name", required=True, description="The resource type name, e.g. 'User'."),
    _ro("description", description="The resource type's human-readable description."),
    _ro("endpoint", "reference", required=True, reference_types=("uri",), max_length=2048,
        description="The resource type's HTTP-addressable endpoint relative to the Base URL, e.g., '/Users'."),
    _ro("schema", "reference", required=True, case_exact=True, reference_types=("uri",), max_length=2048,
        description="The resource type's primary/base schema URI."),
    _ro("schemaExtensions", "complex", multi=True,
        description="A list of URIs of the resource type's schema extensions.", sub=(
            _ro("schema", "reference", required=True, case_exact=True, reference_types=("uri",), max_length=2048,
                description="The URI of a schema extension."),
            _ro("required", "boolean", required=True,
                description="Whether the extension is required for this resource type."),
        )),
))

_ATTRIBUTE_CHARACTERISTICS = (
    _ro("name", required=True, case_exact=True, description="The attribute's name."),
    _ro("type", required=True, canonical=("string", "complex", "boolean", "decimal", "integer", "dateTime",
                                          "reference", "binary"), description="The attribute's data type."),
    _ro("multiValued", "boolean", required=True, description="Whether the attribute is multi-valued."),
    _ro("description", description="A human-readable description of the attribute."),
    _ro("required", "boolean", required=True, description="Whether the attribute is required."),
    _ro("canonicalValues", multi=True, case_exact=True, description="A collection of suggested canonical values."),
    _ro("caseExact", "boolean", description="Whether string values are case sensitive."),
    _ro("mutability", canonical=("readOnly", "readWrite", "immutable", "writeOnly"),
        description="Whether and how the attribute can be modified."),
    _ro("returned", canonical=("always", "never", "default", "request"),
        description="When the attribute is returned in a response."),
    _ro("uniqueness", canonical=("none", "server", "global"), description="How the attribute's values must be unique."),
    _ro("referenceTypes", multi=True, description="The names of the resource types that may be referenced."),
)

SCHEMA_SCHEMA_DEFINITION = Schema(SCHEMA_SCHEMA, "Schema",
                                  "Specifies the schema attribute definitions of a resource or extension", (
    _ro("id", required=True, description="The unique URI of the schema."),
    _ro("name", description="The schema's human-readable name."),
    _ro("description", description="The schema's human-readable description."),
    _ro("attributes", "complex", multi=True, required=True, description="A complex attribute that includes the "
        "attributes of a schema.", sub=(*_ATTRIBUTE_CHARACTERISTICS, _ro(
            "subAttributes", "complex", multi=True, sub=_ATTRIBUTE_CHARACTERISTICS,
            description="Used to define the sub-attributes of a complex attribute."))),
))

USER = ResourceType("User", "/Users", "User Account", USER_SCHEMA, (IAM_USER_SCHEMA,))
GROUP = ResourceType("Group", "/Groups", "Group", GROUP_SCHEMA)
RESOURCE_TYPES = (USER, GROUP)
# Everything /Schemas describes: the resources' schemas, then those of the discovery documents (RFC 7644 §4).
ALL_SCHEMAS = (USER_SCHEMA, GROUP_SCHEMA, IAM_USER_SCHEMA,
               SPC_SCHEMA_DEFINITION, RESOURCE_TYPE_SCHEMA_DEFINITION, SCHEMA_SCHEMA_DEFINITION)


def service_provider_config(base: str) -> dict:
    return {
        "schemas": [SPC_SCHEMA],
        "documentationUri": "https://datatracker.ietf.org/doc/html/rfc7644",
        "patch": {"supported": True},
        "bulk": {"supported": False, "maxOperations": 0, "maxPayloadSize": MAX_PAYLOAD},
        "filter": {"supported": True, "maxResults": MAX_RESULTS},
        "changePassword": {"supported": True},
        "sort": {"supported": True},
        "etag": {"supported": True},
        "authenticationSchemes": [
            {
                "type": "oauthbearertoken",
                "name": "OAuth Bearer Token",
                "description": "An access token from this server's token endpoint with scope scim:read "
                               "(reads) or scim:write (changes), e.g. by the client_credentials grant.",
                "specUri": "https://www.rfc-editor.org/info/rfc6750",
                "primary": True,
            }
        ],
        "meta": {"resourceType": "ServiceProviderConfig", "location": f"{base}/ServiceProviderConfig"},
    }
