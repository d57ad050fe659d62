-- Personal channels (bring your own key): a channel with an owner serves only that user's
-- requests, ahead of the shared channels; NULL = shared. Deleting the user deletes them.
ALTER TABLE channels ADD COLUMN owner_user_id uuid REFERENCES users (id) ON DELETE CASCADE;

-- Names are unique among shared channels (what `sluice.yaml` upserts by) and within one
-- user's channels, so a user's name never collides with, or reveals, anyone else's.
ALTER TABLE channels DROP CONSTRAINT channels_name_key;
CREATE UNIQUE INDEX channels_shared_name_key ON channels (name) WHERE owner_user_id IS NULL;
CREATE UNIQUE INDEX channels_owner_name_key ON channels (owner_user_id, name)
    WHERE owner_user_id IS NOT NULL;
