-- A disabled node stays enrolled (same key, name and IP) but no other node
-- accepts its packets and it gets no peers, until an admin enables it again.
ALTER TABLE nodes ADD COLUMN disabled_at INTEGER;
