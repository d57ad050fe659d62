-- Per-channel time limits (`timeouts:` in sluice.yaml): connect_secs, first_token_secs,
-- idle_secs, total_secs. An absent field takes the workers' default.
ALTER TABLE channels ADD COLUMN timeouts jsonb NOT NULL DEFAULT '{}'::jsonb;
