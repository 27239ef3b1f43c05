"""An OpenAPI 3 description of the supported OpenAPI (RPC) actions, built from the action
table so it cannot drift from what the server does."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kms_proxy.api.actions import Action

__all__ = ["openapi_document"]


def openapi_document(actions: Mapping[str, Action]) -> dict[str, Any]:
    """One path per action (``/?Action=<name>``), its parameters, and the error envelope."""
    error = {"type": "object", "properties": {
        "RequestId": {"type": "string"}, "HttpStatus": {"type": "integer"},
        "Code": {"type": "string"}, "Message": {"type": "string"}}}
    paths: dict[str, Any] = {}
    for name, action in sorted(actions.items()):
        parameters = [{"name": p, "in": "query", "required": True, "schema": {"type": "string"}}
                      for p in action.required]
        parameters += [{"name": p, "in": "query", "required": False,
                        "schema": {"type": "string"}} for p in action.optional]
        paths[f"/?Action={name}"] = {"post": {
            "operationId": name,
            "summary": action.summary or name,
            "parameters": parameters,
            "security": [{"acs3": []}, {"rpcSignature": []}],
            "responses": {
                "200": {"description": "Success; the body carries RequestId",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                "default": {"description": "Alibaba error envelope",
                            "content": {"application/json": {"schema": error}}},
            },
        }}
    return {
        "openapi": "3.0.3",
        "info": {"title": "KMS front: Alibaba Cloud KMS OpenAPI 2016-01-20 (supported subset)",
                 "version": "2016-01-20"},
        "paths": paths,
        "components": {"securitySchemes": {
            "acs3": {"type": "apiKey", "in": "header", "name": "Authorization",
                     "description": "ACS3-HMAC-SHA256 request signature"},
            "rpcSignature": {"type": "apiKey", "in": "query", "name": "Signature",
                             "description": "Legacy RPC HMAC-SHA1 signature"},
        }},
    }
