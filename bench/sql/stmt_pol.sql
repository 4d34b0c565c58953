\set id random(1, 1000)
SELECT payload FROM b.pol WHERE id = :id;
