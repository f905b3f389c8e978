-- The mesh node a flow went through, when one of its ends is a host on that
-- node's subnet (empty otherwise).
ALTER TABLE flows ADD COLUMN via TEXT NOT NULL DEFAULT '';
