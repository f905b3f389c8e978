-- The node's server-reflexive address (what the edge's STUN saw), "IP:PORT".
ALTER TABLE nodes ADD COLUMN reflexive TEXT;
