"""HTTP headers the gateway reads or writes beyond the standard ones (the request id lives with its
middleware, the key and account headers with auth)."""

from __future__ import annotations

REQUEST_TIMEOUT_HEADER = "x-request-timeout"  # the client's deadline in seconds, capped by request_timeout_s
MIN_REQUEST_TIMEOUT_S = 0.1  # below it no completion can succeed: a client error (400), not a 504
PROMPT_TOKENS_HEADER = "x-usage-prompt-tokens"
COMPLETION_TOKENS_HEADER = "x-usage-completion-tokens"
TTFT_HEADER = "x-time-to-first-token-ms"
ADMIN_KEY_HEADER = "x-admin-key"  # the admin API's key (its sha256 is the admin_key_sha256 setting)
