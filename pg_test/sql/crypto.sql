-- Per-tenant encryption: keys wrapped by an outside master key, ciphertexts bound to tenant and
-- context, rotation, master-key rotation, blind indexes, crypto-shredding.
\set VERBOSITY default
\set SHOW_CONTEXT never
\i pg_test/fixtures/setup.sql
SELECT id FROM tenancy.create_tenant('initech', 'Initech');
SELECT tenancy.grant_tenant('regress_app', 'acme'), tenancy.grant_tenant('regress_app', 'globex', 'read_write');
\! head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > /tmp/pg_tenancy_regress_mk1 && head -c 32 /dev/urandom | base64 > /tmp/pg_tenancy_regress_mk2 && printf 'too short' > /tmp/pg_tenancy_regress_mk3 && chmod 644 /tmp/pg_tenancy_regress_mk*
-- no master key: a clear error, never a default key
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant('acme') IS NOT NULL AS entered;
SELECT tenancy.encrypt('secret');
ROLLBACK;
RESET ROLE;
SET pg_tenancy.master_key_file = '/tmp/pg_tenancy_regress_mk3';
SELECT tenancy.master_key_id();
SET pg_tenancy.master_key_file = '/nonexistent';
SELECT tenancy.master_key_id();
SET pg_tenancy.master_key_command = 'exit 3';
SELECT tenancy.master_key_id();
RESET pg_tenancy.master_key_command;
SET pg_tenancy.master_key_file = '/tmp/pg_tenancy_regress_mk1';
SELECT tenancy.master_key_id() ~ '^sha256:[0-9a-f]{16}$' AS key_id_is_a_hash;
-- the same key from a command (e.g. a Vault CLI call) has the same identity
SELECT tenancy.master_key_id() AS mk1 \gset
SET pg_tenancy.master_key_command = 'cat /tmp/pg_tenancy_regress_mk1';
SELECT tenancy.master_key_id() = :'mk1' AS same_key;
RESET pg_tenancy.master_key_command;
-- applications use the functions, never the keys or the settings
SET ROLE regress_app;
SET pg_tenancy.master_key_file = '/tmp/mine';
SELECT count(*) FROM tenancy.keys;
SELECT tenancy.rotate_key('acme');
SELECT tenancy.shred('acme', 'acme');
SELECT tenancy.rotate_master_key();
SELECT tenancy.master_key_id();

-- which AES-256-GCM code AWS-LC runs on this CPU (the ciphertexts are the same whichever)
SELECT tenancy.cipher_implementation() IN ('aws-lc (AES-NI, VAES/VPCLMULQDQ)', 'aws-lc (AES-NI, PCLMULQDQ)',
       'aws-lc (portable)') AS known_implementation;
-- round trips: text, bytea, empty, NULL, 1 MiB
BEGIN;
SELECT tenancy.set_tenant('acme') IS NOT NULL AS entered;
SELECT tenancy.decrypt_text(tenancy.encrypt('4111 1111 1111 1111', 'orders.card:1'), 'orders.card:1');
SELECT tenancy.decrypt(tenancy.encrypt('\x00ff10'::bytea, 'blob'), 'blob');
SELECT tenancy.decrypt_text(tenancy.encrypt('')) = '' AS empty_ok, length(tenancy.encrypt('')) AS overhead;
SELECT tenancy.encrypt(NULL::text) IS NULL AS null_in, tenancy.decrypt(NULL) IS NULL AS null_out;
SELECT md5(tenancy.decrypt(tenancy.encrypt(convert_to(repeat('x', 1048576), 'UTF8')))) = md5(repeat('x', 1048576)) AS mib_ok;
-- random nonces: the same plaintext never encrypts the same way twice
SELECT tenancy.encrypt('same') <> tenancy.encrypt('same') AS nonces_differ;
SELECT tenancy.encrypt('4111 1111 1111 1111', 'orders.card:1') AS c1 \gset
SELECT tenancy.encrypt('4000 0000 0000 0002', 'orders.card:2') AS c2 \gset
COMMIT;

-- bound to the context: another column or row does not decrypt it
BEGIN;
SELECT tenancy.set_tenant('acme') IS NOT NULL AS entered;
SELECT tenancy.decrypt_text(:'c1', 'orders.card:2');
ROLLBACK;
-- bound to the tenant: globex cannot decrypt acme's ciphertext
BEGIN;
SELECT tenancy.set_tenant('globex') IS NOT NULL AS entered;
SELECT tenancy.decrypt_text(:'c1', 'orders.card:1');
ROLLBACK;
-- tampering at every byte position, truncation and extension are all refused: a short value
-- and a 600-byte one (through the 256-byte pipeline, the 8-block one and a partial block)
BEGIN;
SELECT tenancy.set_tenant('acme') IS NOT NULL AS entered;
CREATE TEMP TABLE tamper AS
    SELECT 1 AS n, :'c1'::bytea AS c, 'orders.card:1' AS ctx
    UNION ALL
    SELECT 2, tenancy.encrypt(convert_to(repeat('0123456789', 60), 'UTF8'), 'orders.doc:1'), 'orders.doc:1';
DO $$
DECLARE
    r record;
    c bytea;
    refused int;
    variant bytea;
BEGIN
  FOR r IN SELECT * FROM tamper ORDER BY n LOOP
    c := r.c;
    refused := 0;
    IF tenancy.decrypt(c, r.ctx) IS NULL THEN
        RAISE EXCEPTION 'the unaltered ciphertext did not decrypt';
    END IF;
    FOR i IN 0 .. length(c) - 1 LOOP
        variant := set_byte(c, i, get_byte(c, i) # 1);
        BEGIN
            PERFORM tenancy.decrypt(variant, r.ctx);
        EXCEPTION WHEN sqlstate '22000' OR sqlstate '22P03' OR sqlstate '55000' THEN
            refused := refused + 1;
        END;
    END LOOP;
    FOR i IN 0 .. length(c) - 1 LOOP
        BEGIN
            PERFORM tenancy.decrypt(substring(c FROM 1 FOR i), r.ctx);
        EXCEPTION WHEN sqlstate '22000' OR sqlstate '22P03' THEN
            refused := refused + 1;
        END;
    END LOOP;
    BEGIN
        PERFORM tenancy.decrypt(c || '\x00'::bytea, r.ctx);
    EXCEPTION WHEN sqlstate '22000' THEN
        refused := refused + 1;
    END;
    RAISE NOTICE 'refused % of % altered ciphertexts of % bytes', refused, 2 * length(c) + 1, length(c);
  END LOOP;
END $$;
-- random bytes never crash it
DO $$
DECLARE
    refused int := 0;
BEGIN
    FOR i IN 1 .. 2000 LOOP
        BEGIN
            PERFORM tenancy.decrypt(decode(md5(i::text) || md5((i * 7)::text), 'hex')
                                    || CASE WHEN i % 2 = 0 THEN '\x0101'::bytea ELSE '' END);
        EXCEPTION WHEN sqlstate '22000' OR sqlstate '22P03' OR sqlstate '55000' THEN
            refused := refused + 1;
        END;
    END LOOP;
    RAISE NOTICE 'refused % of 2000 random inputs', refused;
END $$;
ROLLBACK;
-- too short, unknown format version: malformed (22P03)
BEGIN;
SELECT tenancy.set_tenant('acme') IS NOT NULL AS entered;
SELECT tenancy.decrypt('\x0101'::bytea);
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('acme') IS NOT NULL AS entered;
SELECT tenancy.decrypt('\x02010000000100000000000000000000000000000000000000000000000000000000'::bytea);
ROLLBACK;

-- blind index: deterministic per tenant and context, different across tenants
BEGIN;
SELECT tenancy.set_tenant('acme') IS NOT NULL AS entered;
SELECT tenancy.blind_index('ann@example.com', 'email') = tenancy.blind_index('ann@example.com', 'email') AS stable,
       tenancy.blind_index('ann@example.com', 'email') <> tenancy.blind_index('ann@example.com', 'name') AS per_context,
       length(tenancy.blind_index('x')) AS bytes;
SELECT tenancy.blind_index('ann@example.com', 'email') AS bi_acme \gset
COMMIT;
BEGIN;
SELECT tenancy.set_tenant('globex') IS NOT NULL AS entered;
SELECT tenancy.blind_index('ann@example.com', 'email') <> :'bi_acme' AS per_tenant;
COMMIT;
RESET ROLE;

-- rotation: a new active version; old ciphertexts still decrypt; rewrap moves them forward
SELECT tenancy.rotate_key('acme');
SELECT tenancy.rotate_key('nosuch');
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant('acme') IS NOT NULL AS entered;
SELECT tenancy.key_version(:'c1') AS old_version, tenancy.decrypt_text(:'c1', 'orders.card:1');
SELECT tenancy.key_version(tenancy.encrypt('new')) AS new_version;
SELECT tenancy.key_version(tenancy.rewrap(:'c1', 'orders.card:1')) AS rewrapped_version,
       tenancy.decrypt_text(tenancy.rewrap(:'c1', 'orders.card:1'), 'orders.card:1');
SELECT tenancy.blind_index('ann@example.com', 'email') = :'bi_acme' AS index_survives_rotation;
COMMIT;
RESET ROLE;
SELECT tenant, kind, version, state, wrapped IS NOT NULL AS wrapped FROM tenancy.keys ORDER BY 1, 2, 3;
-- keys due for rotation (pg_tenancy.key_rotation_interval, six months by default)
SHOW pg_tenancy.key_rotation_interval;
SELECT tenant, version FROM tenancy.keys_due;
UPDATE tenancy.keys SET created_at = now() - interval '200 days' WHERE tenant = 'acme' AND kind = 'data' AND state = 'active';
SELECT tenant, version FROM tenancy.keys_due;

-- master-key rotation: rewrap every tenant key, no data row touched
SELECT count(DISTINCT kek_id) AS master_keys_in_use FROM tenancy.keys WHERE wrapped IS NOT NULL;
SET pg_tenancy.master_key_file = '/tmp/pg_tenancy_regress_mk2';
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant('acme') IS NOT NULL AS entered;
SELECT tenancy.decrypt_text(:'c1', 'orders.card:1');
ROLLBACK;
RESET ROLE;
SET pg_tenancy.previous_master_key_file = '/tmp/pg_tenancy_regress_mk1';
SELECT tenancy.rotate_master_key() AS rewrapped;
RESET pg_tenancy.previous_master_key_file;
SELECT count(DISTINCT kek_id) AS master_keys_in_use, bool_and(kek_id = tenancy.master_key_id()) AS all_under_new
  FROM tenancy.keys WHERE wrapped IS NOT NULL;
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant('acme') IS NOT NULL AS entered;
SELECT tenancy.decrypt_text(:'c1', 'orders.card:1'), tenancy.decrypt_text(:'c2', 'orders.card:2');
COMMIT;
RESET ROLE;

-- crypto-shredding: explicit confirmation, irreversible
SELECT tenancy.shred('acme', 'acme-typo');
SELECT tenancy.shred('acme', NULL);
SELECT tenancy.shred('acme', 'acme') AS keys_destroyed;
SELECT tenant, kind, version, state, wrapped IS NULL AS gone FROM tenancy.keys WHERE tenant = 'acme' ORDER BY 2, 3;
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant('acme') IS NOT NULL AS entered;
SELECT tenancy.decrypt_text(:'c1', 'orders.card:1');
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('acme') IS NOT NULL AS entered;
SELECT tenancy.encrypt('more');
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('acme') IS NOT NULL AS entered;
SELECT tenancy.blind_index('ann@example.com', 'email');
ROLLBACK;
RESET ROLE;
SELECT tenancy.rotate_key('acme');
-- a tenant shredded before it ever had a key never gets one
SELECT tenancy.shred('initech', 'initech') AS keys_destroyed;
SELECT tenancy.rotate_key('initech');
-- automatic rotation before a key has been used too often (2^31 by default; 40 here)
SET ROLE regress_app;
SET pg_tenancy.max_encryptions_per_key = 40;
RESET ROLE;
SET pg_tenancy.max_encryptions_per_key = 40;
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant('globex') IS NOT NULL AS entered;
CREATE TEMP TABLE many AS SELECT i, tenancy.encrypt('secret ' || i, 'many:' || i) AS c FROM generate_series(1, 100) i;
SELECT count(DISTINCT tenancy.key_version(c)) > 1 AS rotated,
       bool_and(tenancy.decrypt_text(c, 'many:' || i) = 'secret ' || i) AS all_decrypt
  FROM many;
COMMIT;
RESET ROLE;
SELECT bool_and(encryptions <= 40 + 10) AS counted_within_limit, count(*) > 2 AS versions
  FROM tenancy.keys WHERE tenant = 'globex' AND kind = 'data';
RESET pg_tenancy.max_encryptions_per_key;
RESET pg_tenancy.master_key_file;
\! rm -f /tmp/pg_tenancy_regress_mk1 /tmp/pg_tenancy_regress_mk2 /tmp/pg_tenancy_regress_mk3

\i pg_test/fixtures/teardown.sql
