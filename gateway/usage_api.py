"""`GET /v4/usage`: token totals from the usage ledger, grouped by model or by day. A key sees only the
accounts it may use."""

from __future__ import annotations

import datetime
import time
from typing import Any

from aiohttp import web

from gateway.errors import InvalidRequest, UpstreamUnavailable
from gateway.ledger.databases import GroupBy, UsageQuery
from gateway.settings import ALL_ACCOUNTS
from gateway.state import ACCOUNTING, AUTHENTICATOR, LEDGER_DATABASE

GROUPS: tuple[GroupBy, ...] = ("model", "day")
FLUSH_TIMEOUT_S = 5.0  # the totals include every request answered before the query (read your writes)


def _time(value: str | None, param: str, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = datetime.datetime.fromisoformat(value)
        except ValueError:
            raise InvalidRequest(
                f"{param} must be an ISO 8601 date or time, or Unix seconds; got {value!r}", param=param
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=datetime.UTC)
        seconds = parsed.timestamp()
    try:
        _iso(seconds)  # NaN, infinities and seconds past the calendar's years are not a time
    except (ValueError, OverflowError, OSError):
        raise InvalidRequest(f"{param} is not a representable time; got {value!r}", param=param) from None
    return seconds


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


async def get_usage(request: web.Request) -> web.Response:
    caller = request.app[AUTHENTICATOR].authenticate(request)
    database = request.app[LEDGER_DATABASE]
    ledger = request.app[ACCOUNTING].ledger
    if database is None or ledger is None:
        raise UpstreamUnavailable("the usage ledger is off on this gateway (ledger_enabled = false)")
    params = request.query
    requested_group = params.get("group_by", "model")
    group_by = next((g for g in GROUPS if g == requested_group), None)
    if group_by is None:
        raise InvalidRequest(f"group_by must be one of {', '.join(GROUPS)}; got {requested_group!r}", param="group_by")
    account = params.get("account_id") or None
    if account is not None:
        caller.check_account(account)
    start = _time(params.get("from"), "from", 0.0)
    end = _time(params.get("to"), "to", time.time() + 1)
    if end <= start:
        raise InvalidRequest("to must be later than from", param="to")
    accounts = None if ALL_ACCOUNTS in caller.accounts else caller.accounts
    query = UsageQuery(start, end, group_by, account, accounts)
    if not await ledger.flush(FLUSH_TIMEOUT_S):
        # Totals without the rows still queued would be wrong, and nothing in a 200 would say so.
        raise UpstreamUnavailable("the usage ledger's database is not taking rows; totals would be incomplete")
    try:
        totals = await database.run(lambda: database.usage(query))
    except Exception as error:
        raise UpstreamUnavailable(f"the usage ledger's database is unavailable ({type(error).__name__})") from None
    data: list[dict[str, Any]] = [
        {
            group_by: total.key,
            "requests": total.requests,
            "prompt_tokens": total.prompt_tokens,
            "completion_tokens": total.completion_tokens,
            "total_tokens": total.prompt_tokens + total.completion_tokens,
        }
        for total in totals
    ]
    summary = {
        key: sum(row[key] for row in data) for key in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
    }
    return web.json_response(
        {
            "object": "usage",
            "account_id": account,
            "from": _iso(start),
            "to": _iso(end),
            "group_by": group_by,
            "data": data,
            "totals": summary,
        }
    )
