-- API keys get a name and can be revoked; a revoked key is refused on the
-- next request.
ALTER TABLE api_keys ADD COLUMN name TEXT NOT NULL DEFAULT '';
ALTER TABLE api_keys ADD COLUMN revoked_at INTEGER;
