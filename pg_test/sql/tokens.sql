-- Signed context: HS256 tokens, and signed mode refusing every other way in.
\set VERBOSITY default
\set SHOW_CONTEXT never
\i pg_test/fixtures/setup.sql
SELECT id FROM tenancy.create_tenant('initech', 'Initech');
SELECT tenancy.grant_tenant('regress_app', 'acme'), tenancy.grant_tenant('regress_app', 'globex', 'read_write'),
       tenancy.grant_tenant('regress_app', 'initech', 'read');
-- no secret configured: a clear error, never a default key
SET ROLE regress_app;
SELECT tenancy.set_tenant_token('eyJhbGciOiJIUzI1NiJ9.eyJ0ZW5hbnRfaWQiOiJhY21lIiwiZXhwIjo0MTAyNDQ0ODAwfQ.c2ln');
RESET ROLE;
SET pg_tenancy.jwt_secret = 'short';
SELECT tenancy._sign_token('{"tenant_id": "acme", "exp": 4102444800}');
-- the secret may not be stored where every role can read it
ALTER DATABASE pg_tenancy_regress SET pg_tenancy.jwt_secret = 'regress-secret-regress-secret-regress-secret';
ALTER ROLE regress_app SET pg_tenancy.jwt_secret = 'regress-secret-regress-secret-regress-secret';
CREATE FUNCTION leak() RETURNS int LANGUAGE sql SET pg_tenancy.jwt_secret = 'regress-secret-regress-secret-regress-secret' AS 'SELECT 1';
SET pg_tenancy.jwt_secret = 'regress-secret-regress-secret-regress-secret';
SELECT tenancy._sign_token('{"tenant_id": "acme", "exp": 4102444800}') AS acme \gset
SELECT tenancy._sign_token('{"tenant_id": "initech", "exp": 4102444800}') AS initech \gset
SELECT tenancy._sign_token('{"tenant_id": "acme", "exp": 1000000000}') AS expired \gset
SELECT tenancy._sign_token('{"tenant_id": "acme", "exp": 4102444800, "nbf": 4102444000}') AS early \gset
SELECT tenancy._sign_token('{"tenant_id": "acme"}') AS noexp \gset
SELECT tenancy._sign_token('{"sub": "acme", "exp": 4102444800}') AS noclaim \gset
SELECT tenancy._sign_token('{"org": "globex", "exp": 4102444800}') AS org \gset
SELECT tenancy._sign_token('{"tenant_id": "nosuch", "exp": 4102444800}') AS nosuch \gset
-- the same payload signed with another secret
SET pg_tenancy.jwt_secret = 'another-secret-another-secret-another-secret';
SELECT tenancy._sign_token('{"tenant_id": "acme", "exp": 4102444800}') AS wrongkey \gset
SET pg_tenancy.jwt_secret = 'regress-secret-regress-secret-regress-secret';
-- forged variants of the good token: alg none, HS512 header, tampered payload
SELECT 'eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.' || split_part(:'acme', '.', 2) || '.' AS algnone \gset
SELECT 'eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.' || split_part(:'acme', '.', 2) || '.' || split_part(:'acme', '.', 3) AS algnonesig \gset
SELECT 'eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.' || split_part(:'acme', '.', 2) || '.' || split_part(:'acme', '.', 3) AS hs512 \gset
SELECT split_part(:'acme', '.', 1) || '.' || split_part(:'initech', '.', 2) || '.' || split_part(:'acme', '.', 3) AS tampered \gset

SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant_token(:'acme');
SELECT tenancy.current_tenant(), tenancy.tenant_scope();
COMMIT;
SELECT tenancy.has_tenant();
-- every bad token is refused with 28P01 and a detail that says why, nothing more
SELECT tenancy.set_tenant_token(:'expired');
SELECT tenancy.set_tenant_token(:'early');
SELECT tenancy.set_tenant_token(:'noexp');
SELECT tenancy.set_tenant_token(:'noclaim');
SELECT tenancy.set_tenant_token(:'wrongkey');
SELECT tenancy.set_tenant_token(:'algnone');
SELECT tenancy.set_tenant_token(:'algnonesig');
SELECT tenancy.set_tenant_token(:'hs512');
SELECT tenancy.set_tenant_token(:'tampered');
SELECT tenancy.set_tenant_token('not a token');
SELECT tenancy.set_tenant_token('a.b.c');
SELECT tenancy.set_tenant_token(NULL);
-- a valid token is still subject to the role's grants
SELECT tenancy.set_tenant_token(:'nosuch');
RESET ROLE;
SELECT tenancy.revoke_tenant('regress_app', 'acme');
SET ROLE regress_app;
SELECT tenancy.set_tenant_token(:'acme');
RESET ROLE;
SELECT tenancy.grant_tenant('regress_app', 'acme');
-- a token is not a tenant id
SET ROLE regress_app;
SELECT tenancy.set_tenant(:'acme');
-- the claim name is configurable (superuser only)
SET pg_tenancy.tenant_claim = 'org';
RESET ROLE;
SET pg_tenancy.tenant_claim = 'org';
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant_token(:'org');
ROLLBACK;
RESET ROLE;
RESET pg_tenancy.tenant_claim;

-- signed mode: only a valid token sets the context, however it is sent
SET pg_tenancy.context_mode = 'signed';
SET ROLE regress_app;
SHOW pg_tenancy.context_mode;
BEGIN;
SELECT tenancy.set_tenant('acme');
ROLLBACK;
BEGIN;
SET LOCAL pg_tenancy.tenant = 'acme';
ROLLBACK;
BEGIN;
SELECT set_config('pg_tenancy.tenant', 'acme', true);
ROLLBACK;
SET pg_tenancy.tenant = 'acme';
SELECT tenancy.has_tenant();
-- the settings that govern this are out of the application's reach
SET pg_tenancy.context_mode = 'open';
RESET pg_tenancy.context_mode;
SET pg_tenancy.jwt_secret = 'attacker-chosen-secret-attacker-chosen';
SET pg_tenancy.jwt_secret_file = '/tmp/mine';
SET pg_tenancy.jwt_leeway = 300;
SHOW pg_tenancy.jwt_secret;
SELECT count(*) FROM pg_settings WHERE name = 'pg_tenancy.jwt_secret';
SHOW pg_tenancy.context_mode;
-- a plain SET LOCAL of a valid token is accepted (how Citus propagates it to workers)
BEGIN;
SET LOCAL pg_tenancy.tenant = :'acme';
SELECT tenancy.current_tenant();
COMMIT;
BEGIN;
SET LOCAL pg_tenancy.tenant = :'tampered';
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant_token(:'initech');
SELECT tenancy.tenant_scope();
ROLLBACK;
RESET ROLE;
-- superusers may still set a plain id
BEGIN;
SELECT tenancy.set_tenant('acme');
ROLLBACK;
-- changing the secret invalidates tokens already accepted in this session
SET ROLE regress_app;
SELECT tenancy.set_tenant_token(:'acme', session => true);
RESET ROLE;
SET pg_tenancy.jwt_secret = 'rotated-secret-rotated-secret-rotated-secret';
SET ROLE regress_app;
SELECT tenancy.current_tenant();
RESET ROLE;
RESET pg_tenancy.tenant;
-- a secret file
\! printf '%s\n' 'regress-secret-regress-secret-regress-secret' > /tmp/pg_tenancy_regress_secret && chmod 644 /tmp/pg_tenancy_regress_secret
RESET pg_tenancy.jwt_secret;
SET pg_tenancy.jwt_secret_file = '/tmp/pg_tenancy_regress_secret';
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant_token(:'acme');
ROLLBACK;
RESET ROLE;
SET pg_tenancy.jwt_secret_file = '/nonexistent/secret';
SET ROLE regress_app;
SELECT tenancy.set_tenant_token(:'acme');
RESET ROLE;
RESET pg_tenancy.jwt_secret_file;
RESET pg_tenancy.context_mode;
\! rm -f /tmp/pg_tenancy_regress_secret

\i pg_test/fixtures/teardown.sql
