"""API keys and accounts: who is calling, and on behalf of which account.

Keys are configured as SHA-256 digests (`python -m gateway hash-key`), never in clear; a presented key is
hashed and compared against every configured digest in constant time. With no keys configured the gateway
runs in open mode (local development: `make serve`), which it says in its start-up log.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from aiohttp import web

from gateway.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from gateway.settings import ALL_ACCOUNTS, ApiKey

API_KEY_HEADER = "x-api-key"
ACCOUNT_HEADER = "x-selected-account-id"
MAX_ACCOUNT_ID_CHARS = 256  # ids are stored, indexed and shown in usage reports


def hash_key(key: str) -> str:
    return _key_digest(key).hex()


def _key_digest(key: str) -> bytes:
    # A header that was not UTF-8 reaches us with surrogates in place of its bytes: it hashes (and fails to
    # match) like any other wrong key instead of failing to encode.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def is_text(value: str) -> bool:
    """Whether a string is valid Unicode text (no unpaired surrogates): what UTF-8 encoders and databases take."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the key's id (None in open mode) and the accounts it may act for."""

    key_id: str | None
    accounts: frozenset[str]  # {ALL_ACCOUNTS} for every account

    def may_use(self, account: str) -> bool:
        return ALL_ACCOUNTS in self.accounts or account in self.accounts

    def check_account(self, account: str) -> None:
        if not self.may_use(account):
            raise PermissionDenied(f"this API key may not use account '{account}'", param="account_id")


OPEN_MODE = Caller(key_id=None, accounts=frozenset({ALL_ACCOUNTS}))


class Authenticator:
    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = [(bytes.fromhex(k.sha256), k) for k in keys]

    @property
    def open_mode(self) -> bool:
        return not self._keys

    def authenticate(self, request: web.Request) -> Caller:
        if self.open_mode:
            return OPEN_MODE
        presented = request.headers.get(API_KEY_HEADER)
        if not presented:
            raise AuthenticationFailed(f"missing API key: send it in the {API_KEY_HEADER} header")
        digest = _key_digest(presented)
        found: ApiKey | None = None
        for stored, key in self._keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(stored, digest):
                found = key
        if found is None:
            raise AuthenticationFailed("invalid API key")
        return Caller(key_id=found.id, accounts=frozenset(found.accounts))


def resolve_account(
    request: web.Request, body_account: str | None, require_account: bool, caller: Caller
) -> str | None:
    """The account of a request, from the body's `account_id` or the `x-selected-account-id` header; a key
    restricted to one account uses it when the request names none."""
    header = request.headers.get(ACCOUNT_HEADER) or None
    body_account = body_account or None  # an empty account is no account, in the body as in the header
    if header is not None and not is_text(header):
        raise InvalidRequest(f"the {ACCOUNT_HEADER} header is not valid UTF-8 text", param=ACCOUNT_HEADER)
    if header is not None and body_account is not None and header != body_account:
        raise InvalidRequest(
            f"account_id in the body ('{body_account}') and the {ACCOUNT_HEADER} header ('{header}') differ",
            param="account_id",
        )
    account = body_account if body_account is not None else header
    if account is not None:
        param = "account_id" if body_account is not None else ACCOUNT_HEADER
        if len(account) > MAX_ACCOUNT_ID_CHARS or not account.isprintable():
            raise InvalidRequest(f"an account id is at most {MAX_ACCOUNT_ID_CHARS} printable characters", param=param)
        caller.check_account(account)
        return account
    if ALL_ACCOUNTS not in caller.accounts:
        # A restricted key's usage belongs to its accounts (limits, usage reports): never to no account.
        if len(caller.accounts) == 1:
            return next(iter(caller.accounts))
        raise InvalidRequest(
            f"this API key acts for several accounts ({', '.join(sorted(caller.accounts))}): name one in account_id "
            f"or the {ACCOUNT_HEADER} header",
            param="account_id",
        )
    if require_account:
        raise InvalidRequest(
            f"an account is required: send account_id in the body or the {ACCOUNT_HEADER} header", param="account_id"
        )
    return None
