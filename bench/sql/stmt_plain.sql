\set id random(1, 1000)
SELECT payload FROM b.plain WHERE tenant_id = 't0042' AND id = :id;
