"""Data residency (issue 12, regions): a cluster declares its region (pg_tenancy.region); entering
a tenant of another region is refused (55000) for every role, audited, at once for sessions
already in it; tenants without a region ('default') are served anywhere; tenancy.check() reports
rows of another region's tenant found here and a cluster that declares no region while tenants
do. Tenant statements run as the application role."""
import time

import pytest

from conftest import APP, connect, run, sqlstate_of, unique


def set_region(su, region):
    if region is None:
        run(su, "ALTER SYSTEM RESET pg_tenancy.region")
    else:
        run(su, "ALTER SYSTEM SET pg_tenancy.region = %s", region)
    run(su, "SELECT pg_reload_conf()")
    # (each backend rereads the file at its next command)
    deadline = time.time() + 10
    want = region or ""
    while time.time() < deadline:
        probe = connect()
        got = run(probe, "SHOW pg_tenancy.region")[0][0]
        probe.close()
        if got == want:
            return
        time.sleep(0.1)
    raise AssertionError("the region setting was not reloaded")


@pytest.fixture
def regions(database):
    su = connect()
    eu, us, anywhere = unique("eu"), unique("us"), unique("any")
    for t, r in ((eu, "eu-west"), (us, "us-east"), (anywhere, "default")):
        run(su, "SELECT tenancy.create_tenant(%s, region => %s)", t, r)
        run(su, "SELECT tenancy.grant_tenant(%s, %s, 'read_write')", APP, t)
    yield su, eu, us, anywhere
    set_region(su, None)
    su.close()


def test_a_tenant_of_another_region_is_refused_and_audited(regions):
    su, eu, us, anywhere = regions
    # no region declared: every tenant is served, and check() says residency is not enforced
    app = connect(user=APP)
    run(app, "SELECT tenancy.set_tenant(%s, true)", us)
    run(app, "SELECT 1")
    findings = run(su, "SELECT severity, problem FROM tenancy.check() WHERE object = 'setting pg_tenancy.region'")
    assert findings and findings[0][0] == "WARNING" and "not enforced" in findings[0][1]
    set_region(su, "eu-west")
    assert run(su, "SELECT count(*) FROM tenancy.check() WHERE object = 'setting pg_tenancy.region'") == [(0,)]
    # the session already in the us tenant is refused at its next use of the context
    assert sqlstate_of(app, "SELECT tenancy.current_tenant()") == "55000"
    app.close()
    before = run(su, "SELECT count(*) FROM tenancy.audit_log WHERE event = 'forbidden_tenant' AND attempted_tenant = %s", us)[0][0]
    app = connect(user=APP)
    with pytest.raises(Exception) as e:
        run(app, "SELECT tenancy.set_tenant(%s)", us)
    assert e.value.pgcode == "55000"
    assert "region" in e.value.diag.message_primary
    assert "us-east" in e.value.diag.message_detail and "eu-west" in e.value.diag.message_detail
    assert "RUNBOOK" in e.value.diag.message_hint
    # the refusal is recorded
    deadline = time.time() + 10
    while time.time() < deadline:
        after = run(su, "SELECT count(*) FROM tenancy.audit_log WHERE event = 'forbidden_tenant' AND attempted_tenant = %s", us)[0][0]
        if after > before:
            break
        time.sleep(0.2)
    assert after > before
    # the region's own tenants and tenants without a region are served
    for t in (eu, anywhere):
        run(app, "SELECT tenancy.set_tenant(%s, true)", t)
        assert run(app, "SELECT tenancy.current_tenant()") == [(t,)]
    # superusers are refused the context too (they still read the table directly, as always:
    # audited as bypass_read)
    assert sqlstate_of(su, "SELECT tenancy.set_tenant(%s)", us) == "55000"
    app.close()


def test_regions_are_spelt_one_way(regions):
    su, eu, us, anywhere = regions
    for bad in ("EU-WEST", "eu-west ", "", "eu.west", "x" * 64):
        assert sqlstate_of(su, "SELECT tenancy.create_tenant(%s, region => %s)", unique("r"), bad) == "22023", bad
        assert sqlstate_of(su, "SELECT tenancy.alter_tenant(%s, region => %s)", eu, bad) == "22023", bad
        assert sqlstate_of(su, "UPDATE tenancy.tenants SET region = %s WHERE id = %s", bad, eu) == "23514", bad
    for bad in ("EU-WEST", "default", "eu west"):
        assert sqlstate_of(su, "ALTER SYSTEM SET pg_tenancy.region = %s", bad) == "22023", bad


def test_check_reports_rows_of_another_regions_tenant(regions):
    su, eu, us, anywhere = regions
    run(su, "CREATE TABLE IF NOT EXISTS public.rg_docs (tenant_id text NOT NULL, body text)")
    run(su, "SELECT count(*) FROM tenancy.protect('public.rg_docs') "
            "WHERE NOT EXISTS (SELECT 1 FROM tenancy.protected_tables WHERE rel = 'public.rg_docs'::regclass)")
    run(su, "INSERT INTO public.rg_docs VALUES (%s, 'a'), (%s, 'b'), (%s, 'c')", us, us, eu)
    run(su, "SELECT count(*) FROM tenancy.measure_storage()")
    set_region(su, "eu-west")
    rows = run(su, "SELECT severity, problem FROM tenancy.check() WHERE object = %s", "tenant " + us)
    assert [r for r in rows if "region us-east has 2 rows" in r[1] and r[0] == "ERROR"], rows
    assert not [r for r in run(su, "SELECT problem FROM tenancy.check() WHERE object = %s", "tenant " + eu) if "region" in r[0]]
    run(su, "DELETE FROM public.rg_docs WHERE tenant_id IN (%s, %s)", us, eu)


@pytest.fixture(scope="module")
def two_regions():
    """Two throwaway clusters: one serving us-east, one eu-west (the same master key file)."""
    import os
    import subprocess
    from conftest import PORT, ROOT
    here = os.path.dirname(os.path.abspath(__file__))
    cluster = os.path.join(here, "..", "..", "scripts", "cluster.sh")
    envs = {}
    for name, offset, region in (("us", 8, "us-east"), ("eu", 9, "eu-west")):
        env = dict(os.environ, PGT_ROOT=f"{ROOT}-{name}", PGT_PORT=str(PORT - offset),
                   PGT_EXTRA_CONF=f"pg_tenancy.region = '{region}'")
        subprocess.run(["bash", cluster, "destroy"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["bash", cluster, "start"], env=env, check=True, stdout=subprocess.DEVNULL)
        envs[name] = env
    yield lambda name, **kw: connect(dbname="postgres", host=f"{ROOT}-{name}/sock", port=PORT - (8 if name == "us" else 9), **kw)
    for env in envs.values():
        subprocess.run(["bash", cluster, "destroy"], env=env, check=True, stdout=subprocess.DEVNULL)


SCHEMA = """CREATE TABLE public.docs (tenant_id text NOT NULL, id int NOT NULL, body text, PRIMARY KEY (tenant_id, id));
            CREATE TABLE public.notes (tenant_id text NOT NULL, doc int NOT NULL, note text,
                                       FOREIGN KEY (tenant_id, doc) REFERENCES public.docs);"""


def test_a_tenant_moves_to_another_region_by_the_runbook(two_regions):
    """docs/RUNBOOK.md, "Move a tenant to another region", step by step between two clusters."""
    us, eu = two_regions("us"), two_regions("eu")
    for c in (us, eu):
        run(c, "CREATE EXTENSION pg_tenancy")
        run(c, SCHEMA)
        run(c, "SELECT count(*) FROM tenancy.protect('public.docs')")
        run(c, "SELECT count(*) FROM tenancy.protect('public.notes')")
    run(us, "SELECT tenancy.create_tenant('mover', region => 'us-east')")
    run(us, "SELECT tenancy.create_tenant('stayer', region => 'us-east')")
    for t, n in (("mover", 300), ("stayer", 50)):
        run(us, f"INSERT INTO public.docs SELECT %s, g, md5(g::text) FROM generate_series(1, {n}) g", t)
        run(us, f"INSERT INTO public.notes SELECT %s, g, 'n' || g FROM generate_series(1, {n}, 3) g", t)
    fingerprint = """SELECT (SELECT count(*) FROM public.docs WHERE tenant_id = 'mover'),
                            (SELECT md5(string_agg(d::text, ',' ORDER BY id)) FROM public.docs d WHERE tenant_id = 'mover'),
                            (SELECT md5(string_agg(n::text, ',' ORDER BY doc)) FROM public.notes n WHERE tenant_id = 'mover')"""
    before = run(us, fingerprint)
    # 1. pause the tenant's writes on the source
    run(us, "SELECT tenancy.set_status('mover', 'read_only')")
    # 2. export it (unencrypted: the tenant's key stays in the source's key store; the archive
    #    travels over a protected channel)
    archive = [r[0] for r in run(us, "SELECT * FROM tenancy.export('mover', 'full', false)")]
    # 3. the destination: the tenant in its region, the archive imported and restored
    run(eu, "SELECT tenancy.create_tenant('mover', region => 'eu-west')")
    backup = run(eu, "SELECT tenancy.import(%s::text[], true)", archive)[0][0]
    run(eu, "CALL tenancy.restore('mover', %s, report => NULL)", backup)
    assert run(eu, fingerprint) == before
    # 4. switch: the tenant's region is now eu-west; the source refuses it from now on
    run(us, "SELECT tenancy.alter_tenant('mover', region => 'eu-west')")
    assert sqlstate_of(us, "SELECT tenancy.set_tenant('mover')") == "55000"
    assert sqlstate_of(eu, "SELECT tenancy.set_tenant('mover')") is None
    # nor can its archive come back here (residency holds for imports and restores too)
    assert sqlstate_of(us, "SELECT tenancy.import(%s::text[], true)", archive) == "55000"
    # 5. the source copy goes: offboarded, keys shredded, rows purged (children first)
    assert sqlstate_of(us, "SELECT tenancy.purge_tenant('mover')") == "55000"  # not offboarded yet
    assert sqlstate_of(us, "SELECT tenancy.purge_tenant(NULL)") == "22023"
    assert sqlstate_of(us, "SELECT tenancy.purge_tenant('nobody')") == "42704"
    run(us, "SELECT tenancy.set_status('mover', 'offboarded')")
    run(us, "SELECT tenancy.shred('mover', 'mover')")
    # a table that is not protected with a foreign key into a protected one (made with the guard
    # off, as in a restore of a dump): refused, nothing deleted
    run(us, "SET pg_tenancy.guard = off")
    run(us, "CREATE TABLE public.loose (tenant_id text, doc int, FOREIGN KEY (tenant_id, doc) REFERENCES public.docs ON DELETE CASCADE)")
    run(us, "RESET pg_tenancy.guard")
    assert run(us, "SELECT count(*) FROM tenancy.protected_tables WHERE rel = 'public.loose'::regclass") == [(0,)]
    run(us, "INSERT INTO public.loose VALUES ('mover', 1)")
    assert sqlstate_of(us, "SELECT tenancy.purge_tenant('mover')") == "55000"
    assert run(us, "SELECT count(*) FROM public.docs WHERE tenant_id = 'mover'") == [(300,)]
    run(us, "DROP TABLE public.loose")
    # code nobody approved running over a protected table's rows would run as the superuser: refused
    run(us, "CREATE FUNCTION public.on_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN OLD; END $$")
    run(us, "CREATE TRIGGER d BEFORE DELETE ON public.notes FOR EACH ROW EXECUTE FUNCTION public.on_delete()")
    assert sqlstate_of(us, "SELECT tenancy.purge_tenant('mover')") == "55000"
    assert run(us, "SELECT count(*) FROM public.notes WHERE tenant_id = 'mover'") == [(100,)]
    run(us, "DROP TRIGGER d ON public.notes")
    purged = run(us, "SELECT tenancy.purge_tenant('mover')")[0][0]
    assert purged == {"public.docs": 300, "public.notes": 100}, purged
    assert run(us, "SELECT count(*) FROM public.docs WHERE tenant_id = 'mover'") == [(0,)]
    assert run(us, "SELECT count(*) FROM public.docs WHERE tenant_id = 'stayer'") == [(50,)]
    # the purge is in the denial log (written by the audit worker, shortly)
    deadline = time.time() + 10
    audited = "SELECT count(*) FROM tenancy.audit_log WHERE event = 'tenant_purged' AND attempted_tenant = 'mover' " \
              "AND detail = '400 rows of the tenant deleted from 2 protected tables'"
    while time.time() < deadline and run(us, audited) != [(1,)]:
        time.sleep(0.2)
    assert run(us, audited) == [(1,)]
    # the destination serves it; check() on each side has nothing to say about residency
    run(us, "SELECT count(*) FROM tenancy.measure_storage()")
    assert not [r for r in run(us, "SELECT problem FROM tenancy.check()") if "region" in r[0]]
    us.close()
    eu.close()


def test_partitions_live_in_their_regions_tablespace(regions):
    """Within one cluster, a region maps to a tablespace (tenancy.region_tablespaces): check()
    reports a tenant's partition of a table list-partitioned by tenant that lives elsewhere, and
    a partition holding tenants of two regions."""
    import os
    import shutil
    su, eu, us, anywhere = regions
    dirs = {}
    for name in ("rg_eu", "rg_us"):
        d = f"/tmp/pgt_ts_{name}"
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        shutil.chown(d, "postgres", "postgres")
        dirs[name] = d
        run(su, f"DROP TABLESPACE IF EXISTS {name}")
        run(su, f"CREATE TABLESPACE {name} LOCATION '{d}'")
    try:
        run(su, "CREATE TABLE public.rg_parts (tenant_id text NOT NULL, body text) PARTITION BY LIST (tenant_id)")
        run(su, f"CREATE TABLE public.rg_parts_eu PARTITION OF public.rg_parts FOR VALUES IN ('{eu}') TABLESPACE rg_eu")
        run(su, f"CREATE TABLE public.rg_parts_us PARTITION OF public.rg_parts FOR VALUES IN ('{us}')")  # default tablespace
        run(su, f"CREATE TABLE public.rg_parts_mixed PARTITION OF public.rg_parts FOR VALUES IN ('{anywhere}')")
        run(su, "SELECT count(*) FROM tenancy.protect('public.rg_parts')")
        placement = "SELECT severity, object, problem, fix FROM tenancy.check() WHERE problem LIKE '%%tablespace%%'"
        # no mapping: nothing to say
        assert run(su, placement) == []
        run(su, "INSERT INTO tenancy.region_tablespaces VALUES ('eu-west', 'rg_eu'), ('us-east', 'rg_us')")
        found = run(su, placement)
        # the us tenant's partition is in the default tablespace; the eu one is where it belongs;
        # the tenant without a region may be anywhere
        assert [(f[0], f[1]) for f in found] == [("WARNING", "public.rg_parts_us")], found
        assert "region us-east" in found[0][2] and found[0][3] == "ALTER TABLE public.rg_parts_us SET TABLESPACE rg_us;"
        run(su, found[0][3])
        assert run(su, placement) == []
        # its indexes too: ALTER TABLE ... SET TABLESPACE does not move them
        run(su, "CREATE INDEX rg_parts_us_body ON public.rg_parts_us (body)")
        found = run(su, placement)
        assert [(f[0], f[1], f[3]) for f in found] == \
            [("WARNING", "public.rg_parts_us_body", "ALTER INDEX public.rg_parts_us_body SET TABLESPACE rg_us;")], found
        run(su, found[0][3])
        assert run(su, placement) == []
        # a partition holding tenants of two regions cannot be placed ('default' ones go anywhere)
        e2, u2 = unique("eu"), unique("us")
        run(su, "SELECT tenancy.create_tenant(%s, region => 'eu-west'), tenancy.create_tenant(%s, region => 'us-east')", e2, u2)
        run(su, f"CREATE TABLE public.rg_parts_both PARTITION OF public.rg_parts FOR VALUES IN ('{e2}', '{u2}', '{unique('x')}') TABLESPACE rg_us")
        found = run(su, placement)
        assert [(f[0], f[1]) for f in found] == [("ERROR", "public.rg_parts_both")], found
        assert "2 regions with different tablespaces" in found[0][2]
    finally:
        run(su, "DROP TABLE IF EXISTS public.rg_parts")
        run(su, "DELETE FROM tenancy.region_tablespaces")
        for name, d in dirs.items():
            run(su, f"DROP TABLESPACE IF EXISTS {name}")
            shutil.rmtree(d, ignore_errors=True)
