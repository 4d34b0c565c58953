\set t random(0, 999)
\set id random(1, 1000)
BEGIN;
SELECT set_config('app.tenant', 't' || lpad(:t::text, 4, '0'), true);
SELECT payload FROM b.pol WHERE id = :id;
END;
