-- One row per completion request. The same SQL runs on SQLite and PostgreSQL (portable types only).
CREATE TABLE IF NOT EXISTS usage_records (
    record_id TEXT PRIMARY KEY,          -- unique per request (a retried batch inserts nothing twice)
    created_at DOUBLE PRECISION NOT NULL, -- Unix time, seconds
    day TEXT NOT NULL,                    -- UTC date, YYYY-MM-DD (group_by=day without dialect functions)
    request_id TEXT NOT NULL,
    account_id TEXT,
    api_key_id TEXT,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason TEXT,
    status INTEGER NOT NULL,              -- the HTTP status the client got (or the SSE error's)
    time_to_first_token_ms DOUBLE PRECISION,
    duration_ms DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_records_account_time ON usage_records (account_id, created_at);
CREATE INDEX IF NOT EXISTS usage_records_time ON usage_records (created_at);
