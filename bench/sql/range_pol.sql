\set t random(0, 999)
BEGIN;
SELECT set_config('app.tenant', 't' || lpad(:t::text, 4, '0'), true);
SELECT count(*), max(payload) FROM b.pol WHERE id BETWEEN 1 AND 1000;
END;
