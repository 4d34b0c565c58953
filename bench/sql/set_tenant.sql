\set t random(0, 999)
SELECT tenancy.set_tenant('t' || lpad(:t::text, 4, '0'), true);
