//! The protection of one table as structured steps, rendered once to SQL.
//!
//! The statements live in `sql/protect_table.sql` and `sql/unprotect_table.sql` (one per step,
//! under a `-- step <name> [if <policy> exists]` line); this module parses them and renders them
//! for one table. The caller passes identifiers already quoted (by PostgreSQL's
//! `quote_identifier`); rendering substitutes `{table}`, `{column}` and `{cast}` in a single pass,
//! so an identifier that itself contains `{column}` is never substituted again.

/// The names of the policies `protect()` generates (and the guard keeps).
pub const ISOLATION_POLICY: &str = "tenancy_isolation";
pub const WRITE_GUARD_POLICY: &str = "tenancy_write_guard";
pub const TRUNCATE_TRIGGER: &str = "tenancy_truncate_guard";

/// Tenant column types protect() supports, with the cast the policies use.
pub const COLUMN_TYPES: [(&str, &str); 5] = [
    ("text", "pg_catalog.text"),
    ("varchar", "pg_catalog.varchar"),
    ("uuid", "pg_catalog.uuid"),
    ("int4", "pg_catalog.int4"),
    ("int8", "pg_catalog.int8"),
];

const PROTECT: &str = include_str!("../../sql/protect_table.sql");
const UNPROTECT: &str = include_str!("../../sql/unprotect_table.sql");

/// One statement of a protection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    /// Run only when this policy exists on the table.
    pub if_policy_exists: Option<&'static str>,
    pub sql: String,
}

/// The identifiers a protection is rendered for, each already quoted.
pub struct Table<'a> {
    pub table: &'a str,
    pub column: &'a str,
    pub cast: &'a str,
}

fn parse(template: &'static str) -> Vec<(&'static str, Option<&'static str>, String)> {
    let mut steps: Vec<(&'static str, Option<&'static str>, String)> = Vec::new();
    for line in template.lines() {
        if let Some(head) = line.strip_prefix("-- step ") {
            let mut words = head.split_whitespace();
            let name = words.next().expect("a step has a name");
            let cond = match (words.next(), words.next(), words.next()) {
                (Some("if"), Some(policy), Some("exists")) => Some(policy),
                (None, _, _) => None,
                _ => panic!("malformed step line: {line}"),
            };
            steps.push((name, cond, String::new()));
        } else if line.starts_with("--") || line.trim().is_empty() {
            continue;
        } else if let Some(last) = steps.last_mut() {
            if !last.2.is_empty() {
                last.2.push(' ');
            }
            last.2.push_str(line.trim());
        }
    }
    steps
}

/// Substitute `{table}`, `{column}`, `{cast}` in one pass.
fn render(sql: &str, t: &Table) -> String {
    let mut out = String::with_capacity(sql.len() + 64);
    let mut rest = sql;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open..];
        let (value, len) = if after.starts_with("{table}") {
            (t.table, "{table}".len())
        } else if after.starts_with("{column}") {
            (t.column, "{column}".len())
        } else if after.starts_with("{cast}") {
            (t.cast, "{cast}".len())
        } else {
            ("{", 1)
        };
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

fn steps(template: &'static str, t: &Table) -> Vec<Step> {
    parse(template)
        .into_iter()
        .map(|(name, if_policy_exists, sql)| Step { name, if_policy_exists, sql: render(&sql, t) })
        .collect()
}

/// What `protect()` runs.
pub fn protect(t: &Table) -> Vec<Step> {
    steps(PROTECT, t)
}

/// What `unprotect()` runs.
pub fn unprotect(t: &Table) -> Vec<Step> {
    steps(UNPROTECT, t)
}

/// The index `protect(..., create_index => true)` creates, and its warning suggests.
pub fn index(t: &Table) -> String {
    format!("CREATE INDEX ON {} ({})", t.table, t.column)
}

/// The cast for a column type name (`text`, `int4`, ...).
pub fn cast_for(type_name: &str) -> Option<&'static str> {
    COLUMN_TYPES.iter().find(|(n, _)| *n == type_name).map(|(_, c)| *c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Table<'static> {
        Table { table: "app.orders", column: "tenant_id", cast: "pg_catalog.text" }
    }

    #[test]
    fn protect_renders_every_step_in_order() {
        let s = protect(&t());
        let names: Vec<_> = s.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["enable", "force", "drop_isolation", "isolation", "drop_write_guard", "write_guard", "default", "truncate_guard"]
        );
        assert_eq!(s[0].sql, "ALTER TABLE app.orders ENABLE ROW LEVEL SECURITY");
        assert_eq!(s[2].if_policy_exists, Some(ISOLATION_POLICY));
        assert_eq!(
            s[3].sql,
            "CREATE POLICY tenancy_isolation ON app.orders AS PERMISSIVE FOR ALL TO PUBLIC USING (tenant_id \
             OPERATOR(pg_catalog.=) tenancy.current_tenant(NULL::pg_catalog.text)) WITH CHECK (tenant_id \
             OPERATOR(pg_catalog.=) (SELECT tenancy.writable_tenant()::pg_catalog.text) OR \
             tenancy._write_denied(tenant_id::pg_catalog.text))"
        );
        assert!(s.iter().all(|s| !s.sql.contains('{')));
        assert_eq!(unprotect(&t()).len(), 6);
    }

    #[test]
    fn identifiers_are_substituted_once() {
        let hostile = Table { table: r#"public."{column}; DROP TABLE x; --""#, column: r#""{table}""#, cast: "pg_catalog.int8" };
        let s = protect(&hostile);
        assert_eq!(s[0].sql, r#"ALTER TABLE public."{column}; DROP TABLE x; --" ENABLE ROW LEVEL SECURITY"#);
        assert!(s[6].sql.contains(r#"ALTER COLUMN "{table}" SET DEFAULT tenancy.current_tenant(NULL::pg_catalog.int8)"#));
    }

    #[test]
    fn column_types() {
        assert_eq!(cast_for("uuid"), Some("pg_catalog.uuid"));
        assert_eq!(cast_for("numeric"), None);
    }
}
