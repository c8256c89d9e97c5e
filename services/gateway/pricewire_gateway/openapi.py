"""`GET /api/v1/openapi.json`: the REST API as an OpenAPI 3.1 document, built once at start.

The body schemas are generated from the msgspec Structs the handlers encode and decode, so they cannot
drift from the code; only paths, parameters and status codes are written here. Decimals leave the
gateway as JSON numbers (messages.py) and are accepted as numbers or decimal strings, so their
generated `{"type": "string", "format": "decimal"}` is rewritten to say so.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from aiohttp import web

from pricewire_cache_writer.candles import INTERVALS
from pricewire_gateway import user_messages
from pricewire_gateway.admin_api import SourceSwitched
from pricewire_gateway.alerts_api import MAX_HISTORY
from pricewire_gateway.history import CandleList, TickList
from pricewire_gateway.messages import Error, Health, PriceData, PriceList, Readiness
from pricewire_gateway.params import DEFAULT_LIMIT, MAX_LIMIT
from pricewire_gateway.quality import AssetQuality, QualityList
from pricewire_gateway.rest import json_response
from pricewire_gateway.sources_api import SourceList
from pricewire_gateway.status_view import StatusBody
from pricewire_gateway.symbols import MAX_SYMBOLS

PATH: Final = "/api/v1/openapi.json"
REF: Final = "#/components/schemas/{name}"

RESPONSE_TYPES: Final = (
    PriceData,
    PriceList,
    AssetQuality,
    QualityList,
    CandleList,
    TickList,
    StatusBody,
    SourceList,
    SourceSwitched,
    user_messages.AlertView,
    user_messages.AlertList,
    user_messages.AlertHistory,
    user_messages.Valuation,
    Health,
    Readiness,
    Error,
)
REQUEST_TYPES: Final = (user_messages.AlertCreate, user_messages.PortfolioPut)

_DECIMAL_OUT: Final = {"type": "number"}
_DECIMAL_IN: Final = {
    "anyOf": [{"type": "number"}, {"type": "string", "pattern": r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$"}]
}


def _rewrite(node: Any, decimal: dict[str, Any]) -> Any:
    """`node` with every msgspec Decimal schema replaced by `decimal` (a text `default` dropped, the rest kept)."""
    if isinstance(node, dict) and node.get("type") == "string" and node.get("format") == "decimal":
        return {**{k: v for k, v in node.items() if k not in ("type", "format", "default")}, **decimal}
    if isinstance(node, dict):
        return {key: _rewrite(value, decimal) for key, value in node.items()}
    if isinstance(node, list):
        return [_rewrite(value, decimal) for value in node]
    return node


def _components() -> dict[str, Any]:
    _, responses = msgspec.json.schema_components(RESPONSE_TYPES, ref_template=REF)
    _, requests = msgspec.json.schema_components(REQUEST_TYPES, ref_template=REF)
    clash = set(responses) & set(requests)
    assert not clash, f"a Struct is both request and response: {clash}"
    return {**_rewrite(responses, _DECIMAL_OUT), **_rewrite(requests, _DECIMAL_IN)}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "a bad parameter or body (`bad_parameter`), or too many subscriptions",
        401: "no bearer token, or one that does not verify (`unauthorized`)",
        403: "a valid token without the needed role (`forbidden`)",
        404: "unknown asset, no price yet, or no such resource (`unknown_asset`, `no_price`, `not_found`)",
        500: "a cached entry that does not decode (`bad_cache_entry`)",
        503: "a store or collector did not answer (`store_unavailable`, `collector_unavailable`)",
    }
    return {str(status): _json("Error", meaning[status]) for status in statuses}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema or {"type": "string"},
        "description": description,
    }


_ASSET = {
    **_path("asset", "a configured asset (any case) or its USD pair: `BTC`, `btcusdt`, `BTC-USD`"),
    "examples": {"asset": {"value": "BTC"}, "pair": {"value": "btcusdt"}},
}
_TIME = {"type": "string", "description": "ISO 8601 with a zone"}
_LIMIT = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}
_USER: Final[list[dict[str, list[str]]]] = [{"bearer": []}]


def _paths() -> dict[str, Any]:
    window = [_query("start", _TIME, "window start (inclusive)"), _query("end", _TIME, "window end (exclusive)")]
    return {
        "/api/v1/prices": {
            "get": {
                "summary": "The latest consensus price of every asset that has one",
                "responses": {"200": _json("PriceList", "prices in configured order"), **_errors(503)},
            }
        },
        "/api/v1/prices/{asset}": {
            "get": {
                "summary": "One asset's latest consensus price",
                "parameters": [_ASSET],
                "responses": {"200": _json("PriceData", "the price"), **_errors(404, 500, 503)},
            }
        },
        "/api/v1/quality": {
            "get": {
                "summary": "The data-quality view of every asset",
                "responses": {"200": _json("QualityList", "per asset, each source's evidence"), **_errors(503)},
            }
        },
        "/api/v1/quality/{asset}": {
            "get": {
                "summary": "One asset's data-quality view",
                "parameters": [_ASSET],
                "responses": {"200": _json("AssetQuality", "each source's evidence"), **_errors(404, 500, 503)},
            }
        },
        "/api/v1/history/{asset}": {
            "get": {
                "summary": "OHLCV candles of the consensus price",
                "parameters": [
                    _ASSET,
                    _query("interval", {"enum": list(INTERVALS), "default": "1m"}, "candle width"),
                    *window,
                    _query("limit", _LIMIT, "most candles"),
                ],
                "responses": {"200": _json("CandleList", "candles, oldest first"), **_errors(400, 404, 503)},
            }
        },
        "/api/v1/ticks/{asset}": {
            "get": {
                "summary": "Raw venue ticks of an asset, newest first",
                "parameters": [
                    _ASSET,
                    _query("source", {"type": "string"}, "one venue"),
                    *window,
                    _query("limit", _LIMIT, "most ticks"),
                ],
                "responses": {"200": _json("TickList", "ticks, newest first"), **_errors(400, 404, 503)},
            }
        },
        "/api/v1/status": {
            "get": {
                "summary": "Projections' offsets and lag, streams, and which stores answer",
                "responses": {"200": _json("StatusBody", "always 200")},
            }
        },
        "/api/v1/sources": {
            "get": {
                "summary": "The latest state of every source",
                "responses": {"200": _json("SourceList", "sources by name")},
            }
        },
        "/api/v1/sources/{source}/pause": _admin("Pause a source (admin)"),
        "/api/v1/sources/{source}/resume": _admin("Resume a paused source (admin)"),
        "/api/v1/alerts": {
            "get": {
                "summary": "The caller's alerts, oldest first",
                "security": _USER,
                "responses": {"200": _json("AlertList", "alerts"), **_errors(401, 503)},
            },
            "post": {
                "summary": "Create an alert (seed 004 fields)",
                "security": _USER,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": _ref("AlertCreate"),
                            "examples": {
                                "above": {"value": {"symbol": "BTC", "alert_type": "above", "target_price": 70000}},
                                "change": {
                                    "value": {"symbol": "ETH", "alert_type": "change_pct", "pct": -5, "window_s": 3600}
                                },
                            },
                        }
                    },
                },
                "responses": {"201": _json("AlertView", "the alert"), **_errors(400, 401, 503)},
            },
        },
        "/api/v1/alerts/history": {
            "get": {
                "summary": "The caller's alert firings, newest first",
                "security": _USER,
                "parameters": [
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY, "default": 100}, "most")
                ],
                "responses": {"200": _json("AlertHistory", "firings"), **_errors(400, 401, 503)},
            }
        },
        "/api/v1/alerts/{id}": {
            "delete": {
                "summary": "Delete one of the caller's alerts",
                "security": _USER,
                "parameters": [_path("id", "the alert's id", {"type": "integer", "minimum": 1})],
                "responses": {"204": {"description": "deleted"}, **_errors(400, 401, 404, 503)},
            }
        },
        "/api/v1/portfolio": {
            "get": {
                "summary": "The caller's holdings valued at the latest consensus",
                "security": _USER,
                "responses": {"200": _json("Valuation", "the valuation"), **_errors(401, 503)},
            },
            "put": {
                "summary": "Replace the caller's holdings (seed 002 body)",
                "security": _USER,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": _ref("PortfolioPut"),
                            "examples": {"seed": {"value": {"holdings": [{"symbol": "BTC", "amount": "2.0"}]}}},
                        }
                    },
                },
                "responses": {"200": _json("Valuation", "the new valuation"), **_errors(400, 401, 503)},
            },
        },
        "/api/v1/stream": {
            "get": {
                "summary": "Live prices as Server-Sent Events (`event: price_update`, `id: ASSET-seq`, `data:` frame)",
                "parameters": [
                    _query("symbols", {"type": "string"}, f"comma-separated assets (1 to {MAX_SYMBOLS}); all without")
                ],
                "responses": {
                    "200": {"description": "an endless event stream", "content": {"text/event-stream": {}}},
                    **_errors(400),
                },
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json("Health", "the process serves")}}},
        "/readyz": {
            "get": {
                "summary": "Readiness: NATS and at least one store answer",
                "responses": {
                    "200": _json("Readiness", "ready or degraded"),
                    "503": _json("Readiness", "unavailable"),
                },
            }
        },
    }


def _admin(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": _USER,
            "parameters": [{**_path("source", "a source name, e.g. `sim-a`"), "examples": {"sim": {"value": "sim-a"}}}],
            "responses": {
                "200": _json("SourceSwitched", "the collector applied it"),
                **_errors(400, 401, 403, 404, 503),
            },
        }
    }


PRICE_PATHS: Final = (
    "/api/v1/prices",
    "/api/v1/prices/{asset}",
    "/api/v1/quality",
    "/api/v1/quality/{asset}",
    "/api/v1/history/{asset}",
    "/api/v1/ticks/{asset}",
)
"""The price reads, which need a token when the gateway does not serve prices publicly."""


def document(*, version: str, public_prices: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway's REST API."""
    paths = _paths()
    if not public_prices:
        for path in PRICE_PATHS:
            operation = paths[path]["get"]
            operation["security"] = _USER
            operation["responses"].update(_errors(401))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Pricewire gateway",
            "version": version,
            "description": "Consensus crypto prices, their evidence and history; per-user alerts and portfolios. "
            "The WebSocket protocol at `/ws` is described in the README.",
        },
        "paths": paths,
        "components": {
            "schemas": _components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


OPENAPI = web.AppKey("openapi", bytes)


async def get_openapi(request: web.Request) -> web.Response:
    """`GET /api/v1/openapi.json`."""
    return json_response(request.app[OPENAPI])


def install(app: web.Application, *, version: str, public_prices: bool = True) -> None:
    """Serve the document, encoded once."""
    app[OPENAPI] = msgspec.json.encode(document(version=version, public_prices=public_prices))
    app.router.add_get(PATH, get_openapi)
