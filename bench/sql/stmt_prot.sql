\set id random(1, 1000)
SELECT payload FROM b.prot WHERE id = :id;
