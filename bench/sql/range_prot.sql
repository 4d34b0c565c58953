\set t random(0, 999)
BEGIN;
SELECT tenancy.set_tenant('t' || lpad(:t::text, 4, '0'));
SELECT count(*), max(payload) FROM b.prot WHERE id BETWEEN 1 AND 1000;
END;
