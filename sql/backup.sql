------------------------------------------------------------------------------------------------
-- Tenant backups: the registry of archives, archives imported through SQL, the restores and their
-- steps, and the restore procedure (src/backup/ writes and reads the archives).
------------------------------------------------------------------------------------------------
-- The AFTER ROW trigger of change capture (src/protect/capture.rs).
CREATE FUNCTION tenancy._capture() RETURNS trigger
LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'tenancy_capture';

CREATE TABLE tenancy.backups (
    id            uuid        PRIMARY KEY,
    tenant        text        NOT NULL REFERENCES tenancy.tenants (id),
    kind          text        NOT NULL CONSTRAINT backups_kind_check CHECK (kind IN ('full', 'incremental')),
    parent        uuid        REFERENCES tenancy.backups (id),
    -- where the archive is: a file under pg_tenancy.backup_dir, 'exported' (streamed to a
    -- client, not kept here) or 'imported' (its lines in tenancy.backup_archives)
    location      text        NOT NULL,
    snapshot      text        NOT NULL,
    lsn           pg_lsn      NOT NULL,
    first_change  timestamptz,
    last_change   timestamptz,
    tables        integer     NOT NULL,
    row_count     bigint      NOT NULL,
    data_bytes    bigint      NOT NULL,
    archive_bytes bigint      NOT NULL,
    key_version   integer,
    manifest_sha256 text      NOT NULL,
    created_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL
);
CREATE INDEX backups_tenant_idx ON tenancy.backups (tenant, created_at);
COMMENT ON TABLE tenancy.backups IS
    'Tenant backups (tenancy.backup, tenancy.export, tenancy.import): one row per archive.';

CREATE TABLE tenancy.backup_archives (
    backup uuid    NOT NULL REFERENCES tenancy.backups (id) ON DELETE CASCADE,
    n      integer NOT NULL,
    line   text    NOT NULL,
    PRIMARY KEY (backup, n)
);
COMMENT ON TABLE tenancy.backup_archives IS
    'Archives registered with tenancy.import(), line by line, as the client sent them.';

CREATE TABLE tenancy.restores (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant          text        NOT NULL REFERENCES tenancy.tenants (id),
    backup          uuid        REFERENCES tenancy.backups (id) ON DELETE SET NULL,
    mode            text        NOT NULL,
    previous_status text        NOT NULL,
    pid             integer     NOT NULL DEFAULT pg_catalog.pg_backend_pid(),
    state           text        NOT NULL DEFAULT 'running'
                                CONSTRAINT restores_state_check CHECK (state IN ('running', 'done', 'failed', 'abandoned')),
    started_at      timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    finished_at     timestamptz,
    report          jsonb
);
CREATE UNIQUE INDEX restores_one_running ON tenancy.restores (tenant) WHERE state = 'running';
COMMENT ON TABLE tenancy.restores IS
    'Selective restores: the status each tenant had before (tenancy.resume_tenant puts it back after a crash).';

-- After a restore that did not finish (its backend killed, the server restarted): the tenant's
-- status back to what it was, the restore marked abandoned. Live data was never changed by an
-- unfinished restore (its swap is one transaction).
CREATE FUNCTION tenancy.resume_tenant(tenant text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM tenancy.restores AS x WHERE x.tenant OPERATOR(pg_catalog.=) resume_tenant.tenant
       AND x.state OPERATOR(pg_catalog.=) 'running' FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no restore of this tenant is under way' USING ERRCODE = '55000',
            HINT = 'tenancy.restores lists the restores; tenancy.set_status() changes a status.';
    END IF;
    -- the restoring backend still runs it: it will put the status back itself
    IF EXISTS (SELECT FROM pg_catalog.pg_stat_activity a
                WHERE a.pid OPERATOR(pg_catalog.=) r.pid AND a.backend_start OPERATOR(pg_catalog.<=) r.started_at) THEN
        RAISE EXCEPTION 'the restore of this tenant is still running' USING ERRCODE = '55006',
            HINT = 'Wait for it, or cancel it with pg_cancel_backend(pid) (tenancy.restores has its pid): it then puts the status back.';
    END IF;
    UPDATE tenancy.restores SET state = 'abandoned', finished_at = pg_catalog.clock_timestamp()
     WHERE id OPERATOR(pg_catalog.=) r.id;
    PERFORM tenancy.set_status(r.tenant, r.previous_status);
    RETURN r.previous_status;
END
$$;

-- tenancy.restore(): a procedure, because its steps commit one by one (the pause must be seen by
-- other sessions before the swap; the swap is one transaction; the resume is another). CALL it
-- outside BEGIN ... COMMIT. No SET clause (a procedure with one cannot commit): the search_path
-- is pinned for each transaction by its first statement, and every name is qualified.
CREATE PROCEDURE tenancy.restore(
    tenant text,
    backup uuid,
    mode text DEFAULT 'replace',
    "at" timestamptz DEFAULT NULL,
    into_schema name DEFAULT NULL,
    INOUT report jsonb DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    restore_id bigint;
    previous text;
    staging name;
    t0 timestamptz;
    steps jsonb := '{}';
    tables jsonb;
    swapped jsonb;
    at_us bigint := (pg_catalog.date_part('epoch', restore."at") OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8;
    failed boolean := false;
    err_state text;
    err_message text;
    err_detail text;
    err_hint text;
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    -- checks (superuser, tenant, backup of that tenant, mode, no transaction block)
    PERFORM tenancy._restore_check(restore.tenant, restore.backup, restore.mode, restore.into_schema);
    IF restore.mode OPERATOR(pg_catalog.=) 'sandbox' THEN
        t0 := pg_catalog.clock_timestamp();
        BEGIN
            tables := tenancy._restore_stage(restore.tenant, restore.backup, restore.into_schema, false, at_us);
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT,
                                    err_detail = PG_EXCEPTION_DETAIL, err_hint = PG_EXCEPTION_HINT;
            IF tenancy._restore_error_is_ours(err_message) THEN
                RAISE EXCEPTION USING ERRCODE = err_state, MESSAGE = err_message,
                    DETAIL = COALESCE(err_detail, ''), HINT = COALESCE(err_hint, '');
            END IF;
            RAISE EXCEPTION 'the restore failed on a row of the tenant' USING ERRCODE = err_state,
                DETAIL = 'Its message is not shown: it could hold row values.';
        END;
        report := pg_catalog.jsonb_build_object('tenant', restore.tenant, 'backup', restore.backup,
            'mode', 'sandbox', 'at', restore."at", 'schema', restore.into_schema,
            'chain', tables OPERATOR(pg_catalog.->) 'chain', 'tables', tables OPERATOR(pg_catalog.->) 'tables',
            'seconds', pg_catalog.jsonb_build_object('stage_and_verify',
                pg_catalog.round(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) t0)::numeric, 3)));
        RETURN;
    END IF;

    -- 1. pause the tenant's writes (committed: every session sees it at its next statement)
    t0 := pg_catalog.clock_timestamp();
    SELECT status INTO previous FROM tenancy.tenants WHERE id OPERATOR(pg_catalog.=) restore.tenant FOR UPDATE;
    INSERT INTO tenancy.restores (tenant, backup, mode, previous_status)
         VALUES (restore.tenant, restore.backup, restore.mode, previous) RETURNING id INTO restore_id;
    IF previous OPERATOR(pg_catalog.=) 'active' THEN
        PERFORM tenancy.set_status(restore.tenant, 'read_only');
    END IF;
    COMMIT;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    steps := steps OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('pause', tenancy._seconds_since(t0));

    BEGIN
        -- 2. wait for the tenant's transactions that were already writing
        t0 := pg_catalog.clock_timestamp();
        PERFORM tenancy._wait_for_writers();
        steps := steps OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('wait_for_writers', tenancy._seconds_since(t0));
        -- 3. restore into an isolated staging schema, verified against the manifest
        t0 := pg_catalog.clock_timestamp();
        staging := pg_catalog.format('tenancy_restore_%s_%s', restore_id,
                                     pg_catalog.substr(pg_catalog.md5(pg_catalog.gen_random_uuid()::pg_catalog.text), 1, 12));
        tables := tenancy._restore_stage(restore.tenant, restore.backup, staging, true, at_us);
        steps := steps OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('stage_and_verify', tenancy._seconds_since(t0));
        -- 4. swap the tenant's rows in the live tables, in this one transaction
        t0 := pg_catalog.clock_timestamp();
        swapped := tenancy._restore_swap(restore.tenant, restore.backup, staging);
        PERFORM pg_catalog.set_config('client_min_messages', 'warning', true);
        EXECUTE pg_catalog.format('DROP SCHEMA %I CASCADE', staging);
        steps := steps OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('swap', tenancy._seconds_since(t0));
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT,
                                err_detail = PG_EXCEPTION_DETAIL, err_hint = PG_EXCEPTION_HINT;
        failed := true;
    END;
    IF failed THEN
        -- nothing live changed (the block's work was rolled back): put the status back
        UPDATE tenancy.restores SET state = 'failed', finished_at = pg_catalog.clock_timestamp(),
               report = pg_catalog.jsonb_build_object('sqlstate', err_state, 'steps', steps)
         WHERE id OPERATOR(pg_catalog.=) restore_id;
        IF previous OPERATOR(pg_catalog.=) 'active' THEN
            PERFORM tenancy.set_status(restore.tenant, previous);
        END IF;
        COMMIT;
        IF tenancy._restore_error_is_ours(err_message) THEN
            RAISE EXCEPTION USING ERRCODE = err_state, MESSAGE = err_message,
                DETAIL = COALESCE(err_detail, ''), HINT = COALESCE(err_hint, '');
        END IF;
        -- a constraint's or a type's error may quote row values: only its SQLSTATE goes out
        RAISE EXCEPTION 'the restore failed on a row of the tenant; nothing live was changed' USING ERRCODE = err_state,
            DETAIL = 'Its message is not shown: it could hold row values.',
            HINT = 'Restore into a sandbox (mode => ''sandbox'', into_schema => ...) to inspect the rows.';
    END IF;
    -- 5. writes back on, the restore recorded (restores table and audit log)
    t0 := pg_catalog.clock_timestamp();
    IF previous OPERATOR(pg_catalog.=) 'active' THEN
        PERFORM tenancy.set_status(restore.tenant, previous);
    END IF;
    steps := steps OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('resume', tenancy._seconds_since(t0));
    report := pg_catalog.jsonb_build_object('tenant', restore.tenant, 'backup', restore.backup,
        'mode', 'replace', 'at', restore."at", 'chain', tables OPERATOR(pg_catalog.->) 'chain',
        'tables', swapped, 'seconds', steps);
    UPDATE tenancy.restores SET state = 'done', finished_at = pg_catalog.clock_timestamp(), report = restore.report
     WHERE id OPERATOR(pg_catalog.=) restore_id AND state OPERATOR(pg_catalog.=) 'running';
    PERFORM tenancy._record_restore(restore.tenant, restore.backup);
    COMMIT;
END
$$;

CREATE FUNCTION tenancy._seconds_since(t0 timestamptz) RETURNS numeric
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
RETURN pg_catalog.round(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) t0)::pg_catalog.numeric, 3);

-- Restore drills: the latest backup chain of a tenant restored into a throwaway sandbox and
-- verified, the outcome recorded (the pre-go-live checklist's "restore tested" is a query on it).
CREATE TABLE tenancy.drills (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant    text        NOT NULL REFERENCES tenancy.tenants (id),
    backup    uuid        REFERENCES tenancy.backups (id) ON DELETE SET NULL,
    at        timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    ok        boolean     NOT NULL,
    row_count bigint,
    seconds   numeric,
    sqlstate  text
);
CREATE INDEX drills_tenant_idx ON tenancy.drills (tenant, at);
COMMENT ON TABLE tenancy.drills IS 'Restore drills (tenancy.drill): which backup, when, whether it restored and verified.';

CREATE FUNCTION tenancy.drill(tenant text) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    b uuid;
    s name := pg_catalog.format('tenancy_drill_%s', pg_catalog.substr(pg_catalog.md5(pg_catalog.gen_random_uuid()::pg_catalog.text), 1, 12));
    t0 timestamptz := pg_catalog.clock_timestamp();
    staged jsonb;
    n bigint;
    err text;
BEGIN
    SELECT x.id INTO b FROM tenancy.backups x
     WHERE x.tenant OPERATOR(pg_catalog.=) drill.tenant AND x.location OPERATOR(pg_catalog.<>) 'exported'
     ORDER BY x.created_at DESC LIMIT 1;
    IF b IS NULL THEN
        RAISE EXCEPTION 'the tenant has no backup kept here to drill' USING ERRCODE = '42704',
            HINT = 'Take one with tenancy.backup(tenant), or register one with tenancy.import().';
    END IF;
    PERFORM tenancy._restore_check(drill.tenant, b, 'sandbox', s);
    BEGIN
        staged := tenancy._restore_stage(drill.tenant, b, s, false, NULL);
        SELECT pg_catalog.sum((x OPERATOR(pg_catalog.->>) 'rows')::pg_catalog.int8) INTO n
          FROM pg_catalog.jsonb_array_elements(staged OPERATOR(pg_catalog.->) 'tables') x;
        PERFORM pg_catalog.set_config('client_min_messages', 'warning', true);
        EXECUTE pg_catalog.format('DROP SCHEMA %I CASCADE', s);
    EXCEPTION WHEN OTHERS THEN
        err := SQLSTATE;
    END;
    INSERT INTO tenancy.drills (tenant, backup, ok, row_count, seconds, sqlstate)
         VALUES (drill.tenant, b, err IS NULL, n, tenancy._seconds_since(t0), err);
    RETURN pg_catalog.jsonb_build_object('tenant', drill.tenant, 'backup', b, 'ok', err IS NULL,
                                         'rows', n, 'sqlstate', err, 'seconds', tenancy._seconds_since(t0));
END
$$;
