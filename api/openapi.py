"""The app's OpenAPI document, exact for the server that serves it.

FastAPI writes most of it from the routes (api/routes/, their `responses=` from api/errors.py);
`install(app, auth_on)` adds what it cannot know:

- the body of `POST /v1/jobs`, which the route reads raw (JSON or YAML): `JobSpec`, the engine's own
  config model (parallel.config.Config) plus `priority`, with every section as a component;
- `links` from a submitted job's `id` to the routes about that job (a client, or a fuzzer's stateful
  phase, follows them);
- the stream's other way in: a ticket in `?ticket=` (an apiKey scheme) instead of the bearer header;
- authentication as this server has it right now: with tokens (in the environment or the store) each
  route that takes one declares the bearer scheme and its 401; without any, neither (every caller is
  the local admin). `auth_on` is asked on each request for /openapi.json, since making the first
  token in the store turns authentication on.

    install(app, auth_on=lambda: settings.auth_enabled)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import Field
from pydantic.json_schema import models_json_schema

from api.errors import AUTH_ONLY
from parallel.auto import AUTO, AUTO_FIELDS
from parallel.config import Config

COMPONENTS = "#/components/schemas/{model}"
JOB_SPEC_FIELD = "x-fourfold-job-spec"
"""json_schema_extra key of a model field that holds a job spec: its schema becomes JobSpec's."""
JOB_ID = "$response.body#/id"
YAML = "application/yaml"
TICKET = "StreamTicket"


class JobSpec(Config):
    """A job spec, as JSON or YAML: the engine's configuration (every section optional, defaults filled
    in) and the job's priority. The server checks more than a schema says: fields that depend on each
    other (tp must divide the heads, the batch must split over dp, ...), where paths may point, and the
    service's limits; a spec failing those is a 422 naming the field."""

    priority: int = Field(0, ge=-1000, le=1000)
    """Higher starts first; equal priorities start oldest first."""


def job_spec_components() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The `$ref` of JobSpec and the components it needs (JobSpec and each section of the config)."""
    refs, defs = models_json_schema([(JobSpec, "validation")], ref_template=COMPONENTS)
    return refs[(JobSpec, "validation")], with_auto(defs["$defs"])


def _about(prop: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in prop.items() if k in ("title", "description", "default")}


def with_auto(defs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The components with `auto` as a value of each layout field the planner may choose
    (`parallel.auto.AUTO_FIELDS`) and of `parallel` itself: the config's validator takes it before the
    fields' types see it, so the models' own schemas cannot say so."""
    auto = {"const": AUTO, "description": "chosen by the layout planner when the job is admitted"}
    models = {"parallel": "ParallelConfig", "train": "TrainConfig"}
    for section, fields in AUTO_FIELDS.items():
        props = defs[models[section]]["properties"]
        for name in fields:
            value = {k: v for k, v in props[name].items() if k not in _about(props[name])}
            props[name] = {"anyOf": [value, auto], **_about(props[name])}
    spec = defs["JobSpec"]["properties"]
    spec["parallel"] = {"anyOf": [{"$ref": COMPONENTS.format(model="ParallelConfig")}, auto]}
    return defs


def job_spec_body() -> dict[str, Any]:
    """`openapi_extra` of `POST /v1/jobs`: its request body, read raw by the route."""
    ref = {"$ref": COMPONENTS.format(model="JobSpec")}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}, YAML: {"schema": ref}}}}


def job_links() -> dict[str, dict[str, Any]]:
    """`links` of a response holding a job (`id`): the routes about that job."""
    targets = {
        "GetJob": "get_job",
        "CancelJob": "cancel_job",
        "JobEvents": "job_events",
        "JobLogs": "job_logs",
        "JobMetrics": "job_metrics",
        "JobAttempts": "job_attempts",
        "JobStreamTicket": "job_stream_ticket",
    }
    return {name: {"operationId": op, "parameters": {"job_id": JOB_ID}} for name, op in targets.items()}


def ticket_security() -> dict[str, Any]:
    """`openapi_extra` of the stream: a ticket in `?ticket=` authenticates instead of the bearer header
    (FastAPI adds this alternative to the header's requirement). No link hands a ticket on to the
    stream: a fuzzer takes any value of a security parameter it did not set itself for a made-up
    credential, and expects a 401 where the valid ticket opens the stream."""
    return {"security": [{TICKET: []}]}


def stream_events() -> dict[str, Any]:
    """The `text/event-stream` of `GET /v1/jobs/{id}/stream`, one event at a time (OpenAPI 3.2's
    `itemSchema`; before 3.2, `schema` described each event): the event's name, and its `data` as JSON
    of the record it carries."""

    def event(name: str, data: dict[str, Any]) -> dict[str, Any]:
        payload = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
        return {
            "type": "object",
            "required": ["event", "data"],
            "properties": {"event": {"const": name}, "data": payload},
        }

    ref = COMPONENTS.format
    end = {
        "type": "object",
        "required": ["state"],
        "properties": {"state": {"anyOf": [{"$ref": ref(model="JobState")}, {"type": "null"}]}},
    }
    item = {
        "oneOf": [
            event("metrics", {"$ref": ref(model="MetricRecord")}),
            event("event", {"$ref": ref(model="EventRecord")}),
            event("log", {"$ref": ref(model="LogRecord")}),
            event("end", end),
        ]
    }
    return {"text/event-stream": {"schema": item}}


def build(app: FastAPI, auth: bool) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
        servers=app.servers,
    )
    components = schema.setdefault("components", {})
    _, defs = job_spec_components()
    schemas = components.setdefault("schemas", {})
    schemas.update(defs)
    for model in schemas.values():  # a field marked as holding a job spec (POST /v1/plan's spec) refers to it
        for name, prop in model.get("properties", {}).items():
            if prop.pop(JOB_SPEC_FIELD, False):
                model["properties"][name] = {"$ref": COMPONENTS.format(model="JobSpec"), **_about(prop)}
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            responses = operation.get("responses", {})
            for code, response in list(responses.items()):
                if response.pop(AUTH_ONLY, False) and not auth:
                    del responses[code]
            if not auth:
                operation.pop("security", None)
    if auth:
        components.setdefault("securitySchemes", {})[TICKET] = {
            "type": "apiKey",
            "in": "query",
            "name": "ticket",
            "description": "A stream ticket (POST /v1/jobs/{job_id}/stream-ticket): opens that job's stream once.",
        }
    else:
        components.pop("securitySchemes", None)
    return schema


def install(app: FastAPI, auth_on: Callable[[], bool]) -> None:
    built: dict[bool, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        auth = auth_on()
        if auth not in built:
            built[auth] = build(app, auth)
        return built[auth]

    app.openapi = openapi  # type: ignore[method-assign]
