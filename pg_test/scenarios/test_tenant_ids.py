"""Two tenant ids never name the same rows.

On an integer tenant column '007' and '7' are the same value, and so are the upper- and
lowercase, hyphenated and bare spellings of a UUID on a uuid column. pg_tenancy accepts only
the canonical spelling of an id that reads as an integer or a UUID, wherever an id enters:
create_tenant, the tenants table itself, set_tenant, SET, tokens and grants.
"""
import pytest

from conftest import APP, connect, run, sign, sqlstate_of

UUID = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
ALIASES = ["007", "-0", "0042", UUID.upper(), UUID.replace("-", ""), "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11"]


@pytest.fixture(scope="module")
def numeric(database):
    su = connect()
    for t in ("7", "42", UUID):
        run(su, "SELECT tenancy.create_tenant(%s, %s)", t, t)
        run(su, "SELECT tenancy.grant_tenant(%s, %s, 'read_write')", APP, t)
    run(su, "CREATE TABLE app.by_int (tenant_id int NOT NULL, secret text)")
    run(su, "CREATE TABLE app.by_uuid (tenant_id uuid NOT NULL, secret text)")
    for t in ("by_int", "by_uuid"):
        run(su, f"SELECT count(*) FROM tenancy.protect('app.{t}')")
        run(su, f"GRANT SELECT, INSERT ON app.{t} TO {APP}")
    run(su, "INSERT INTO app.by_int VALUES (7, 'seven'), (42, 'forty-two')")
    run(su, "INSERT INTO app.by_uuid VALUES (%s, 'uuid secret')", UUID)
    yield su
    su.close()


@pytest.mark.parametrize("alias", ALIASES)
def test_an_alias_cannot_be_created(numeric, alias):
    assert sqlstate_of(numeric, "SELECT tenancy.create_tenant(%s, 'alias')", alias) == "22023"
    # nor inserted behind create_tenant's back: the table's CHECK refuses it
    assert sqlstate_of(numeric, "INSERT INTO tenancy.tenants (id, name) VALUES (%s, 'x')", alias) == "23514"
    assert run(numeric, "SELECT tenancy.valid_tenant_id(%s)", alias) == [(False,)]


@pytest.mark.parametrize("alias", ALIASES)
def test_an_alias_cannot_be_entered_or_granted(numeric, alias):
    app = connect(user=APP)
    try:
        assert sqlstate_of(app, "SELECT tenancy.set_tenant(%s, true)", alias) == "22023"
        assert sqlstate_of(app, "SELECT set_config('pg_tenancy.tenant', %s, false)", alias) == "22023"
        token = sign(numeric, f'{{"tenant_id": "{alias}", "exp": {2**31 - 1}}}')
        assert sqlstate_of(app, "SELECT tenancy.set_tenant_token(%s, true)", token) == "28P01"
        # nothing of tenant 7 (or the UUID tenant) through any of it
        assert sqlstate_of(app, "SELECT count(*) FROM app.by_int") == "28000"
    finally:
        app.close()
    assert sqlstate_of(numeric, "SELECT tenancy.grant_tenant(%s, %s)", APP, alias) == "22023"


def test_canonical_ids_work_on_every_column_type(numeric):
    app = connect(user=APP)
    try:
        run(app, "SELECT tenancy.set_tenant('7', true)")
        assert run(app, "SELECT tenant_id, secret FROM app.by_int") == [(7, "seven")]
        # an id that is not a UUID cannot be compared with a uuid column: an error, not rows
        assert sqlstate_of(app, "SELECT count(*) FROM app.by_uuid") == "22P02"
        run(app, "SELECT tenancy.set_tenant(%s, true)", UUID)
        assert run(app, "SELECT secret FROM app.by_uuid") == [("uuid secret",)]
        token = sign(numeric, f'{{"tenant_id": 42, "exp": {2**31 - 1}}}')  # a numeric claim
        run(app, "SELECT tenancy.set_tenant_token(%s, true)", token)
        assert run(app, "SELECT secret FROM app.by_int") == [("forty-two",)]
    finally:
        app.close()
