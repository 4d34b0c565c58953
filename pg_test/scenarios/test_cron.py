"""The seed's backup schedule with pg_cron (Debian's postgresql-15-cron, 1.4: minute resolution):
a cluster of its own preloading pg_tenancy and pg_cron, the jobs of docs/BACKUPS.md scheduled
for a database, and the jobs seen running (a backup registered, a drill recorded)."""
import os
import shutil
import subprocess
import time

import psycopg2
import pytest

from conftest import ROOT, PORT, connect, new_key_file, run

CRON_ROOT = ROOT + "-cron"
CRON_PORT = PORT - 5
HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER = os.path.join(HERE, "..", "..", "scripts", "cluster.sh")


def cluster(cmd):
    env = dict(os.environ, PGT_ROOT=CRON_ROOT, PGT_PORT=str(CRON_PORT), PGT_EXTRA_PRELOAD="pg_cron")
    subprocess.run(["bash", CLUSTER, cmd], env=env, check=True, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cron_cluster():
    cluster("destroy")
    cluster("start")
    yield
    cluster("destroy")


def test_scheduled_backups_and_drills_run(cron_cluster):
    pg = lambda db="postgres": connect(dbname=db, host=f"{CRON_ROOT}/sock", port=CRON_PORT)
    admin = pg()
    run(admin, "CREATE EXTENSION pg_cron")
    run(admin, "CREATE DATABASE cronapp")
    backups = f"{CRON_ROOT}/backups"
    os.makedirs(backups, exist_ok=True)
    shutil.chown(backups, "postgres", "postgres")
    key = new_key_file(f"{CRON_ROOT}/master-key")
    run(admin, f"ALTER DATABASE cronapp SET pg_tenancy.master_key_file = '{key}'")
    run(admin, f"ALTER DATABASE cronapp SET pg_tenancy.backup_dir = '{backups}'")
    app = pg("cronapp")
    run(app, "CREATE EXTENSION pg_tenancy")
    run(app, "SELECT tenancy.create_tenant('cron-a', 'Cron A')")
    run(app, "CREATE TABLE t (tenant_id text NOT NULL, v int)")
    run(app, "SELECT count(*) FROM tenancy.protect('t', create_index => true)")
    run(app, "INSERT INTO t VALUES ('cron-a', 1), ('cron-a', 2)")
    # the jobs, as docs/BACKUPS.md gives them (here every minute instead of nightly)
    run(admin, """SELECT cron.schedule_in_database('tenancy-full', '* * * * *',
                  $$SELECT tenancy.backup(id) FROM tenancy.tenants WHERE status <> 'offboarded'$$, 'cronapp')""")
    run(admin, """SELECT cron.schedule_in_database('tenancy-drill', '* * * * *',
                  $$SELECT pg_sleep(5), tenancy.drill(id) FROM tenancy.tenants WHERE status <> 'offboarded'$$, 'cronapp')""")
    deadline = time.time() + 150
    while time.time() < deadline:
        done = run(app, "SELECT (SELECT count(*) FROM tenancy.backups), (SELECT count(*) FROM tenancy.drills WHERE ok)")[0]
        if done[0] >= 1 and done[1] >= 1:
            break
        time.sleep(2)
    runs = run(admin, "SELECT j.jobname, d.status FROM cron.job_run_details d JOIN cron.job j USING (jobid) ORDER BY d.runid")
    assert done[0] >= 1 and done[1] >= 1, runs
    assert ("tenancy-full", "succeeded") in runs
    assert run(app, "SELECT tenant, kind FROM tenancy.backups LIMIT 1") == [("cron-a", "full")]
    run(admin, "SELECT cron.unschedule('tenancy-full'), cron.unschedule('tenancy-drill')")
    app.close()
    admin.close()
