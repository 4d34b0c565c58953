\set t random(0, 999)
\set id random(1, 1000)
BEGIN;
SELECT tenancy.set_tenant('t' || lpad(:t::text, 4, '0'));
SELECT payload FROM b.prot WHERE id = :id;
END;
