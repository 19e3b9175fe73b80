"""SCIM 2.0 (RFC 7643 / RFC 7644) for the user-management role: `routes` is the HTTP edge, the rest is pure.

`schemas` defines the attributes once (validation, filters, PATCH paths and the discovery documents all
read it), `resources` maps SCIM JSON to and from the directory's records, `filter` parses filters and PATCH
paths, `patch` applies PATCH operations, `errors` is the SCIM error response.
"""
