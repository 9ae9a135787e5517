"""The OpenAPI 3 document of the HTTP front (GET /openapi.json): every route, its body and its answers.

It follows the Open Inference Protocol's own document (kserve/open-inference-protocol,
specification/protocol/open_inference_rest.yaml) for /v2, and OpenAI's shapes for /v1.
Schema-driven fuzzing (tests/gateway/test_fuzz.py, schemathesis) reads it, so it must say
what the gateway really takes: a route added to app.ROUTES without an entry here fails
that test.
"""

from __future__ import annotations

from functools import lru_cache

from isopool import __version__
from isopool.protocol.signature import DATATYPES

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": {}, "code": {}}}}}
PARAMETERS = {"type": "object", "additionalProperties": True}
TENSOR_META = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string", "enum": list(DATATYPES)},
    "shape": {"type": "array", "items": {"type": "integer"}}}}
INPUT = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "datatype": {"type": "string", "enum": list(DATATYPES)}, "parameters": PARAMETERS,
    "data": {"description": "the tensor's elements, nested or flat, in row-major order"}}}
INFER_REQUEST = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"}, "parameters": PARAMETERS, "inputs": {"type": "array", "items": INPUT, "minItems": 1},
    "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "parameters": PARAMETERS}}}}}
INFER_RESPONSE = {"type": "object", "required": ["model_name", "outputs"], "properties": {
    "model_name": {"type": "string"}, "id": {"type": "string"}, "parameters": PARAMETERS,
    "outputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
        "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string"}, "parameters": PARAMETERS, "data": {}}}}}}
EMBEDDINGS_REQUEST = {"type": "object", "required": ["model", "input"], "properties": {
    "model": {"type": "string"}, "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "encoding_format": {"type": "string", "enum": ["float", "base64"]}, "user": {"type": "string"}}}
EMBEDDINGS_RESPONSE = {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
    "object": {"type": "string"}, "model": {"type": "string"}, "usage": {"type": "object"},
    "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"]}}}}
REPOSITORY_REQUEST = {"type": "object", "properties": {"parameters": {"type": "object", "properties": {
    "model": {"type": "string", "description": "MODULE:ATTR to load; leave out to reload a served model"},
    "workers": {"type": "integer", "minimum": 1}}}}}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _answers(ok: dict | None, *codes: int, error: dict = ERROR, ok_text: str = "done") -> dict:
    words = {400: "bad input", 401: "no or an unknown bearer token (with --http-tokens)",
             403: "a client token on an admin route", 404: "no such model", 413: "the body is over --max-message-bytes",
             500: "the model failed or its worker crashed", 503: "overloaded, shutting down or no worker ready; "
             "see Retry-After", 504: "the request's deadline passed"}
    out = {"200": {"description": ok_text, **(_json(ok) if ok else {})}}
    for code in codes:
        out[str(code)] = {"description": words[code], **_json(error)}
    return out


NAME = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
VERSION = [{"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}]
BINARY = [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
           "description": "the binary tensor extension: the JSON part's length; binary tensors follow it",
           "schema": {"type": "integer", "minimum": 0}}]
MODEL_ROUTES = {
    "": {"get": {"summary": "Model metadata: its inputs and outputs when it declares a signature",
                 "responses": _answers({"type": "object", "required": ["name", "platform", "inputs", "outputs"],
                                        "properties": {"name": {"type": "string"}, "versions": {"type": "array"},
                                                       "platform": {"type": "string"},
                                                       "inputs": {"type": "array", "items": TENSOR_META},
                                                       "outputs": {"type": "array", "items": TENSOR_META}}},
                                       401, 404)}},
    "/ready": {"get": {"summary": "200 when the model can serve, else 503",
                       "responses": {**_answers({"type": "object", "required": ["name", "ready"]}, 401, 404),
                                     "503": {"description": "not ready", **_json({"type": "object"})}}}},
    "/infer": {"post": {"summary": "Inference: JSON tensors, or JSON then binary tensors "
                                   "(Inference-Header-Content-Length: the JSON's length)",
                        "requestBody": {"required": True, **_json(INFER_REQUEST)},
                        "responses": _answers(INFER_RESPONSE, 400, 401, 404, 413, 500, 503, 504)}},
}


@lru_cache(maxsize=1)
def document() -> dict:
    paths = {
        "/v2/health/live": {"get": {"summary": "200 while the supervisor answers (no token needed)",
                                    "responses": _answers({"type": "object", "required": ["live"]}, 503)}},
        "/v2/health/ready": {"get": {"summary": "200 when every model can serve, else 503 (no token needed)",
                                     "responses": {**_answers({"type": "object", "required": ["ready"]}),
                                                   "503": {"description": "not ready", **_json({"type": "object"})}}}},
        "/v2": {"get": {"summary": "Server metadata and extensions",
                        "responses": _answers({"type": "object", "required": ["name", "version", "extensions"]}, 401)}},
        "/v2/models/{name}/generate_stream": {"post": {
            "summary": "A streaming model's parts as server-sent events (an error event if it fails mid-stream)",
            "parameters": NAME, "requestBody": {"required": False, **_json({})},
            "responses": {**_answers(None, 400, 401, 404, 413, 500, 503, 504, ok_text="text/event-stream")}}},
        "/v2/repository/index": {"post": {
            "summary": "The models served and their state", "requestBody": {"required": False, **_json(
                {"type": "object", "properties": {"ready": {"type": "boolean"}}})},
            "responses": _answers({"type": "array", "items": {"type": "object", "required": ["name", "state"]}},
                                  400, 401, 413)}},
        "/v1/models": {"get": {"summary": "The embedding models (OpenAI-compatible)",
                               "responses": _answers({"type": "object", "required": ["object", "data"]}, 401,
                                                     error=OPENAI_ERROR)}},
        "/v1/embeddings": {"post": {"summary": "Embeddings (OpenAI-compatible)",
                                    "requestBody": {"required": True, **_json(EMBEDDINGS_REQUEST)},
                                    "responses": _answers(EMBEDDINGS_RESPONSE, 400, 401, 404, 413, 500, 503, 504,
                                                          error=OPENAI_ERROR)}},
    }
    for tail, operations in MODEL_ROUTES.items():
        extra = BINARY if tail == "/infer" else []
        paths[f"/v2/models/{{name}}{tail}"] = {m: {**op, "parameters": NAME + extra} for m, op in operations.items()}
        paths[f"/v2/models/{{name}}/versions/{{version}}{tail}"] = {
            m: {**op, "parameters": NAME + VERSION + extra} for m, op in operations.items()}
    for action in ("load", "unload"):
        paths[f"/v2/repository/models/{{name}}/{action}"] = {"post": {
            "summary": f"{action.capitalize()} a model (admin token; only with --http-tokens)", "parameters": NAME,
            "requestBody": {"required": False, **_json(REPOSITORY_REQUEST if action == "load" else {})},
            "responses": _answers({"type": "object"}, 400, 401, 403, 404, 413, 503)}}
    return {"openapi": "3.0.3", "info": {"title": "isopool", "version": __version__,
                                         "description": "The Open Inference Protocol (v2) REST API, and "
                                                        "OpenAI-compatible embeddings, of an isopool daemon."},
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{}, {"bearer": []}], "paths": paths}
