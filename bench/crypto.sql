-- Encryption benchmark (issue #3): pg_tenancy's AES-256-GCM (integrity + tenant/context binding)
-- against pgcrypto's raw encrypt(data, key, 'aes') (no integrity), pgcrypto's
-- pgp_sym_encrypt/pgp_sym_decrypt, and the floor of the same scan computing only length().
-- Run as a superuser on the bench database with pg_tenancy.master_key_file set (bench/run.sh).
\set ON_ERROR_STOP 1
\if :{?rows4k}
\else
\set rows4k 1000000
\endif
\if :{?rows1m}
\else
\set rows1m 256
\endif
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pgcrypto;
SELECT tenancy.set_tenant('t0001', true) IS NOT NULL AS entered;

CREATE OR REPLACE FUNCTION pg_temp.ms(q text) RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; best float8 := 'infinity';
BEGIN
    FOR i IN 1..3 LOOP   -- best of three: the machine is noisy
        t0 := clock_timestamp();
        EXECUTE q;
        best := least(best, extract(epoch FROM clock_timestamp() - t0) * 1000);
    END LOOP;
    RETURN best;
END $$;

DROP TABLE IF EXISTS pg_temp.p100, pg_temp.p4k, pg_temp.p1m;
CREATE TEMP TABLE p100 AS SELECT i, substr(repeat(md5(i::text), 4), 1, 100)::bytea AS v FROM generate_series(1, 1000000) i;
CREATE TEMP TABLE p4k AS SELECT i, convert_to(repeat(md5(i::text), 128), 'UTF8') AS v FROM generate_series(1, :rows4k) i;
CREATE TEMP TABLE p1m (i int, v bytea);
ALTER TABLE p1m ALTER COLUMN v SET STORAGE EXTERNAL;   -- out of line and uncompressed, like a ciphertext
INSERT INTO p1m SELECT i, convert_to(repeat(md5(i::text), 32768), 'UTF8') FROM generate_series(1, :rows1m) i;
-- ciphertexts to decrypt. The floors of out-of-line values read the whole value (get_byte detoasts
-- it; length() would only look at its header): fetching from TOAST is part of the scan.
CREATE TEMP TABLE c100 AS SELECT tenancy.encrypt(v, 'bench') AS t, encrypt(v, '0123456789abcdef0123456789abcdef', 'aes') AS r FROM p100;
CREATE TEMP TABLE c4k AS SELECT tenancy.encrypt(v, 'bench') AS t, encrypt(v, '0123456789abcdef0123456789abcdef', 'aes') AS r FROM p4k;
CREATE TEMP TABLE cpgp AS SELECT pgp_sym_encrypt_bytea(v, 'bench-password') AS g FROM p100 WHERE i <= 10000;
CREATE TEMP TABLE c1m AS SELECT tenancy.encrypt(v) AS t FROM p1m;
-- one 4 KiB ciphertext of each kind, decrypted over and over from memory: the cipher and the call
-- without the TOAST fetch. The value is an initPlan's result (fetched once, detoasted by the
-- concatenation; a parameter, not a constant, so the immutable pgcrypto call is not folded).
CREATE TEMP TABLE one4k AS SELECT t, r FROM c4k LIMIT 1;
ANALYZE;

CREATE TEMP TABLE r (what text, rows int, ms float8);
INSERT INTO r VALUES
 ('100 B floor length()',            1000000, pg_temp.ms('SELECT sum(length(v)) FROM p100')),
 ('100 B tenancy.encrypt',           1000000, pg_temp.ms('SELECT sum(length(tenancy.encrypt(v, ''bench''))) FROM p100')),
 ('100 B pgcrypto encrypt aes',      1000000, pg_temp.ms('SELECT sum(length(encrypt(v, ''0123456789abcdef0123456789abcdef'', ''aes''))) FROM p100')),
 ('100 B pgp_sym_encrypt',             10000, pg_temp.ms('SELECT sum(length(pgp_sym_encrypt_bytea(v, ''bench-password''))) FROM p100 WHERE i <= 10000')),
 ('100 B tenancy.decrypt',           1000000, pg_temp.ms('SELECT sum(length(tenancy.decrypt(t, ''bench''))) FROM c100')),
 ('100 B pgcrypto decrypt aes',      1000000, pg_temp.ms('SELECT sum(length(decrypt(r, ''0123456789abcdef0123456789abcdef'', ''aes''))) FROM c100')),
 ('100 B pgp_sym_decrypt',             10000, pg_temp.ms('SELECT sum(length(pgp_sym_decrypt_bytea(g, ''bench-password''))) FROM cpgp')),
 ('4 KiB floor length()',             :rows4k, pg_temp.ms('SELECT sum(length(v)) FROM p4k')),
 ('4 KiB tenancy.encrypt',            :rows4k, pg_temp.ms('SELECT sum(length(tenancy.encrypt(v, ''bench''))) FROM p4k')),
 ('4 KiB pgcrypto encrypt aes',       :rows4k, pg_temp.ms('SELECT sum(length(encrypt(v, ''0123456789abcdef0123456789abcdef'', ''aes''))) FROM p4k')),
 ('4 KiB ciphertext floor (detoast)', :rows4k, pg_temp.ms('SELECT sum(get_byte(t, 0)) FROM c4k')),
 ('4 KiB tenancy.decrypt',            :rows4k, pg_temp.ms('SELECT sum(length(tenancy.decrypt(t, ''bench''))) FROM c4k')),
 ('4 KiB pgcrypto decrypt aes',       :rows4k, pg_temp.ms('SELECT sum(length(decrypt(r, ''0123456789abcdef0123456789abcdef'', ''aes''))) FROM c4k')),
 ('4 KiB in memory floor',             200000, pg_temp.ms('SELECT sum(length((SELECT t || ''''::bytea FROM one4k))) FROM generate_series(1, 200000)')),
 ('4 KiB in memory tenancy.decrypt',   200000, pg_temp.ms('SELECT sum(length(tenancy.decrypt((SELECT t || ''''::bytea FROM one4k), ''bench''))) FROM generate_series(1, 200000)')),
 ('4 KiB in memory pgcrypto decrypt',  200000, pg_temp.ms('SELECT sum(length(decrypt((SELECT r || ''''::bytea FROM one4k), ''0123456789abcdef0123456789abcdef'', ''aes''))) FROM generate_series(1, 200000)')),
 ('1 MiB floor (detoast)',           :rows1m, pg_temp.ms('SELECT sum(get_byte(v, 0)) FROM p1m')),
 ('1 MiB ciphertext floor (detoast)', :rows1m, pg_temp.ms('SELECT sum(get_byte(t, 0)) FROM c1m')),
 ('1 MiB tenancy.encrypt',           :rows1m, pg_temp.ms('SELECT sum(length(tenancy.encrypt(v))) FROM p1m')),
 ('1 MiB tenancy.decrypt',           :rows1m, pg_temp.ms('SELECT sum(length(tenancy.decrypt(t))) FROM c1m'));

SELECT what, rows, round(ms::numeric, 1) AS ms, round((1000 * ms / rows)::numeric, 3) AS us_per_row FROM r;

WITH x AS (SELECT what, ms / rows AS per_row FROM r)
SELECT 'encrypt 100 B: pg_tenancy speed / pgcrypto aes' AS ratio,
       round(((SELECT per_row FROM x WHERE what = '100 B pgcrypto encrypt aes') / (SELECT per_row FROM x WHERE what = '100 B tenancy.encrypt'))::numeric, 2) AS value
UNION ALL SELECT 'decrypt 100 B: pg_tenancy speed / pgcrypto aes',
       round(((SELECT per_row FROM x WHERE what = '100 B pgcrypto decrypt aes') / (SELECT per_row FROM x WHERE what = '100 B tenancy.decrypt'))::numeric, 2)
UNION ALL SELECT 'encrypt 4 KiB: pg_tenancy speed / pgcrypto aes',
       round(((SELECT per_row FROM x WHERE what = '4 KiB pgcrypto encrypt aes') / (SELECT per_row FROM x WHERE what = '4 KiB tenancy.encrypt'))::numeric, 2)
UNION ALL SELECT 'decrypt 4 KiB: pg_tenancy speed / pgcrypto aes',
       round(((SELECT per_row FROM x WHERE what = '4 KiB pgcrypto decrypt aes') / (SELECT per_row FROM x WHERE what = '4 KiB tenancy.decrypt'))::numeric, 2)
UNION ALL SELECT 'decrypt 4 KiB minus the scan floor (crypto only): pg_tenancy speed / pgcrypto aes',
       round((((SELECT per_row FROM x WHERE what = '4 KiB pgcrypto decrypt aes') - (SELECT per_row FROM x WHERE what = '4 KiB ciphertext floor (detoast)'))
            / ((SELECT per_row FROM x WHERE what = '4 KiB tenancy.decrypt') - (SELECT per_row FROM x WHERE what = '4 KiB ciphertext floor (detoast)')))::numeric, 2)
UNION ALL SELECT 'decrypt 4 KiB in memory minus its floor: pg_tenancy speed / pgcrypto aes',
       round((((SELECT per_row FROM x WHERE what = '4 KiB in memory pgcrypto decrypt') - (SELECT per_row FROM x WHERE what = '4 KiB in memory floor'))
            / ((SELECT per_row FROM x WHERE what = '4 KiB in memory tenancy.decrypt') - (SELECT per_row FROM x WHERE what = '4 KiB in memory floor')))::numeric, 2)
UNION ALL SELECT 'encrypt 100 B: pg_tenancy speed / pgp_sym_encrypt',
       round(((SELECT per_row FROM x WHERE what = '100 B pgp_sym_encrypt') / (SELECT per_row FROM x WHERE what = '100 B tenancy.encrypt'))::numeric, 1)
UNION ALL SELECT 'decrypt 100 B: pg_tenancy speed / pgp_sym_decrypt',
       round(((SELECT per_row FROM x WHERE what = '100 B pgp_sym_decrypt') / (SELECT per_row FROM x WHERE what = '100 B tenancy.decrypt'))::numeric, 1)
UNION ALL SELECT '1 MiB encrypt GiB/s (minus the floor)',
       round(((SELECT rows FROM r WHERE what = '1 MiB tenancy.encrypt') / 1024.0 / (((SELECT ms FROM r WHERE what = '1 MiB tenancy.encrypt') - (SELECT ms FROM r WHERE what = '1 MiB floor (detoast)')) / 1000))::numeric, 2)
UNION ALL SELECT '1 MiB decrypt GiB/s (minus the floor)',
       round(((SELECT rows FROM r WHERE what = '1 MiB tenancy.decrypt') / 1024.0 / (((SELECT ms FROM r WHERE what = '1 MiB tenancy.decrypt') - (SELECT ms FROM r WHERE what = '1 MiB ciphertext floor (detoast)')) / 1000))::numeric, 2);
