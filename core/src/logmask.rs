//! What pg_tenancy takes out of server log lines: tenant tokens wherever they appear, the value
//! of any assignment to `pg_tenancy.tenant`, and the literal values in statement text (replaced
//! by numbered placeholders, as `pg_stat_statements` shows statements), bound parameter values,
//! and the row values PostgreSQL quotes in the details of constraint violations.
//!
//! The statement masker is a lexer, not a parser: it knows SQL's quoting (standard, escape,
//! Unicode, bit and hex strings, dollar quotes, quoted identifiers, both kinds of comments), so
//! it never mistakes an identifier or a keyword for a value, and what it cannot tell it masks.

/// Whether `b` can continue a JWT segment (base64url).
fn b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Replace every substring shaped like a JWT (`eyJ` + base64url, two dots) by `<token>`.
pub fn mask_tokens(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut copied = 0;
    while i + 3 <= b.len() {
        if &b[i..i + 3] == b"eyJ" && (i == 0 || !b64url(b[i - 1])) {
            // three segments: header.payload.signature (the signature may be empty)
            let mut j = i;
            let mut dots = 0;
            while j < b.len() && (b64url(b[j]) || (b[j] == b'.' && dots < 2)) {
                if b[j] == b'.' {
                    dots += 1;
                }
                j += 1;
            }
            if dots == 2 {
                out.push_str(&s[copied..i]);
                out.push_str("<token>");
                copied = j;
                i = j;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&s[copied..]);
    out
}

/// Whether `s` holds something that looks like a token.
pub fn has_token(s: &str) -> bool {
    s.contains("eyJ") && mask_tokens(s) != s
}

/// Mask the literal values of a statement's text: string and numeric constants become `$n`
/// (numbered after the highest parameter the text already uses), and the value assigned to
/// `pg_tenancy.tenant` by `SET` becomes one too. Tokens anywhere (in comments, identifiers)
/// become `<token>`.
pub fn mask_statement(sql: &str) -> String {
    mask_statement_with(sql, false)
}

/// [`mask_statement`], where `backslash_escapes` says that a backslash escapes the next
/// character in every string constant (`standard_conforming_strings = off`). Comments keep
/// their markers, not their text (a value can hide there too).
pub fn mask_statement_with(sql: &str, backslash_escapes: bool) -> String {
    let b = sql.as_bytes();
    let mut next = highest_param(b) + 1;
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let mut placeholder = |out: &mut String| {
        out.push('$');
        out.push_str(&next.to_string());
        next += 1;
    };
    while i < b.len() {
        let c = b[i];
        // comments: their markers only
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            let end = sql[i..].find('\n').map(|k| i + k).unwrap_or(b.len());
            out.push_str("-- ...");
            i = end;
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let end = block_comment_end(b, i);
            out.push_str("/* ... */");
            i = end;
            continue;
        }
        // quoted identifier
        if c == b'"' {
            let end = quoted_end(b, i + 1, b'"', false);
            out.push_str(&sql[i..end]);
            i = end;
            continue;
        }
        // string constants: '...', E'...', U&'...', B'...', X'...', N'...'
        let prefix = string_prefix(b, i);
        if let Some(p) = prefix {
            let escapes = (matches!(b[i], b'e' | b'E') && p == 1) || (backslash_escapes && p != 2);
            let end = quoted_end(b, i + p + 1, b'\'', escapes);
            // (adjacent constants separated by a newline are one: mask as one)
            placeholder(&mut out);
            i = end;
            continue;
        }
        // dollar-quoted constant
        if c == b'$' {
            if let Some(end) = dollar_quoted_end(b, i) {
                placeholder(&mut out);
                i = end;
                continue;
            }
            // a parameter: $ and digits
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            out.push_str(&sql[i..j]);
            i = j;
            continue;
        }
        // identifiers and keywords (letters, digits, _, $, non-ASCII)
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            let mut j = i + 1;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'$' || b[j] >= 0x80) {
                j += 1;
            }
            out.push_str(&sql[i..j]);
            i = j;
            continue;
        }
        // numeric constants: 42, 3.5, .5, 1e10, 0x1F (PostgreSQL 16 forms harmlessly too)
        if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let mut j = i + 1;
            while j < b.len() {
                let d = b[j];
                let exp_sign = (d == b'+' || d == b'-') && matches!(b[j - 1], b'e' | b'E');
                if d.is_ascii_alphanumeric() || d == b'.' || d == b'_' || exp_sign {
                    j += 1;
                } else {
                    break;
                }
            }
            placeholder(&mut out);
            i = j;
            continue;
        }
        out.push(c as char);
        i += 1;
    }
    mask_tokens(&out)
}

fn highest_param(b: &[u8]) -> u32 {
    let mut max = 0u32;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) {
            let mut j = i + 1;
            let mut n: u32 = 0;
            while j < b.len() && b[j].is_ascii_digit() {
                n = n.saturating_mul(10).saturating_add((b[j] - b'0') as u32);
                j += 1;
            }
            if j > i + 1 {
                max = max.max(n.min(60_000));
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    max
}

/// The length of a string constant's prefix before its opening quote, if a string starts at `i`.
fn string_prefix(b: &[u8], i: usize) -> Option<usize> {
    // (not when the letter ends an identifier: `abc'` is not E'...')
    let starts_word = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b'$' || b[i - 1] >= 0x80);
    match b[i] {
        b'\'' => Some(0),
        b'e' | b'E' | b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if starts_word && b.get(i + 1) == Some(&b'\'') => Some(1),
        b'u' | b'U' if starts_word && b.get(i + 1) == Some(&b'&') && b.get(i + 2) == Some(&b'\'') => Some(2),
        _ => None,
    }
    // (a prefix of 0 means the quote is at i; the caller skips `p + 1` bytes)
}

/// The end (exclusive) of a quoted run whose body starts at `from`: the closing quote, where a
/// doubled quote is part of the body (and, with `escapes`, a backslash escapes the next byte).
/// Unterminated: the end of the text.
fn quoted_end(b: &[u8], from: usize, quote: u8, escapes: bool) -> usize {
    let mut i = from;
    while i < b.len() {
        if escapes && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

fn block_comment_end(b: &[u8], from: usize) -> usize {
    let mut depth = 0;
    let mut i = from;
    while i + 1 < b.len() {
        if b[i] == b'/' && b[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b[i + 1] == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// `$tag$ ... $tag$` starting at `i`: its end, or None when `i` does not open one.
fn dollar_quoted_end(b: &[u8], i: usize) -> Option<usize> {
    if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') {
        return None;
    }
    let mut j = i + 1;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
        if j == i + 1 && b[j].is_ascii_digit() {
            return None;
        }
        j += 1;
    }
    if b.get(j) != Some(&b'$') {
        return None;
    }
    let tag = &b[i..=j];
    let body = j + 1;
    let mut k = body;
    while k + tag.len() <= b.len() {
        if &b[k..k + tag.len()] == tag {
            return Some(k + tag.len());
        }
        k += 1;
    }
    Some(b.len())
}

/// Mask a CONTEXT: the SQL quoted in each line (`SQL statement "..."`, `PL/pgSQL assignment
/// "..."`, `SQL function "f" statement 1`...) loses its literals, parameter lists their values.
pub fn mask_context(s: &str, backslash_escapes: bool) -> String {
    let lines: Vec<String> = s
        .split('\n')
        .map(|line| {
            if line.contains("parameter $") || line.contains("parameters: $") {
                return mask_parameters(line);
            }
            // a value being parsed (`JSON data, line 1: {...`): its text goes
            if let Some(rest) = line.strip_prefix("JSON data, line ") {
                if let Some(k) = rest.find(": ") {
                    return format!("JSON data, line {}: ...", &rest[..k]);
                }
            }
            match (line.find('"'), line.rfind('"')) {
                (Some(a), Some(z)) if z > a => {
                    format!("{}\"{}\"{}", &line[..a], mask_statement_with(&line[a + 1..z], backslash_escapes), &line[z + 1..])
                }
                _ => mask_tokens(line),
            }
        })
        .collect();
    lines.join("\n")
}

/// Mask the values of a `parameters: $1 = '...', $2 = NULL` detail line (log_statement of the
/// extended protocol, and errors' parameter lines): every quoted value becomes `'...'`.
pub fn mask_parameters(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\'' {
            let end = quoted_end(b, i + 1, b'\'', false);
            out.push_str("'...'");
            i = end;
        } else {
            let next = s[i..].find('\'').map(|k| i + k).unwrap_or(b.len());
            out.push_str(&s[i..next]);
            i = next;
        }
    }
    mask_tokens(&out)
}

/// Mask the row values PostgreSQL quotes in the details of errors: `Key (a, b)=(1, x)` (unique
/// and foreign-key violations, exclusion constraints), `Failing row contains (...)` (check and
/// not-null violations, row security), `Array value ... (...)`. The column names stay.
pub fn mask_detail(s: &str) -> String {
    let mut out = mask_tokens(s);
    for marker in [")=(", "Failing row contains (", "conflicts with existing key ("] {
        let mut from = 0;
        while let Some(k) = out[from..].find(marker) {
            let start = from + k + marker.len();
            // the value list runs to the matching parenthesis
            let bytes = out.as_bytes();
            let mut depth = 1;
            let mut j = start;
            while j < bytes.len() && depth > 0 {
                match bytes[j] {
                    b'(' => depth += 1,
                    b')' => depth -= 1,
                    _ => {}
                }
                j += 1;
            }
            let end = if depth == 0 { j - 1 } else { bytes.len() };
            out.replace_range(start..end, "...");
            from = start + 3;
        }
    }
    out
}

/// Where the statement text starts in a line PostgreSQL logs for `log_statement` or
/// `log_min_duration_statement` (`statement: ...`, `duration: 1.2 ms  statement: ...`,
/// `execute <name>: ...`, `parse <name>: ...`, `bind <name> to <portal>: ...`, each also after a
/// duration), or None for any other line. (English messages: `lc_messages` other than C or
/// English leaves such lines unrecognised, and then they are masked whole when they carry a token.)
pub fn statement_start(msg: &str) -> Option<usize> {
    let mut rest_at = 0;
    if let Some(after) = msg.strip_prefix("duration: ") {
        let k = after.find("  ")?;
        rest_at = "duration: ".len() + k + 2;
    }
    let rest = &msg[rest_at..];
    if rest.starts_with("statement: ") {
        return Some(rest_at + "statement: ".len());
    }
    for kind in ["execute ", "parse ", "bind "] {
        if rest.starts_with(kind) {
            return rest.find(": ").map(|k| rest_at + k + 2);
        }
    }
    None
}

#[cfg(test)]
mod line_tests {
    #[test]
    fn statement_lines() {
        fn at(m: &str) -> Option<&str> {
            super::statement_start(m).map(|i| &m[i..])
        }
        assert_eq!(at("statement: SELECT 1"), Some("SELECT 1"));
        assert_eq!(at("duration: 0.123 ms  statement: SELECT 1"), Some("SELECT 1"));
        assert_eq!(at("execute <unnamed>: SELECT $1"), Some("SELECT $1"));
        assert_eq!(at("duration: 1.000 ms  execute S_1: SELECT 2"), Some("SELECT 2"));
        assert_eq!(at("bind S_1 to C_2: SELECT 3"), Some("SELECT 3"));
        assert_eq!(at("duration: 0.5 ms"), None);
        assert_eq!(at("checkpoint starting: time"), None);
    }

    use super::*;

    const TOKEN: &str = "eyJhbGciOiJIUzI1NiJ9.eyJ0ZW5hbnRfaWQiOiJhY21lIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ";

    #[test]
    fn tokens_are_masked_wherever_they_are() {
        assert_eq!(mask_tokens(&format!("x {TOKEN} y")), "x <token> y");
        assert_eq!(mask_tokens(&format!("'{TOKEN}'")), "'<token>'");
        assert_eq!(mask_tokens("eyJhbGc only one part"), "eyJhbGc only one part");
        assert_eq!(mask_tokens("keyJx.y.z"), "keyJx.y.z");
        assert!(has_token(&format!("SET LOCAL pg_tenancy.tenant = '{TOKEN}'")));
        assert!(!has_token("SELECT 1"));
    }

    #[test]
    fn statements_lose_their_literals_not_their_shape() {
        assert_eq!(
            mask_statement("SELECT * FROM t1 WHERE email = 'bob@example.com' AND n > 42 AND x = 3.5e-3"),
            "SELECT * FROM t1 WHERE email = $1 AND n > $2 AND x = $3"
        );
        assert_eq!(mask_statement("UPDATE t SET v = $1 WHERE id = 7"), "UPDATE t SET v = $1 WHERE id = $2");
        assert_eq!(mask_statement("SELECT E'it\\'s', U&'d\\0061t', X'1F', B'101', 'a''b'"), "SELECT $1, $2, $3, $4, $5");
        assert_eq!(mask_statement("SELECT $$secret$$, $tag$a $$ b$tag$"), "SELECT $1, $2");
        assert_eq!(mask_statement("SELECT \"col'x\" FROM \"T\" -- it's 5\n"), "SELECT \"col'x\" FROM \"T\" -- ...\n");
        assert_eq!(mask_statement("SELECT 1 /* /* n */ 'secret' */, 2"), "SELECT $1 /* ... */, $2");
        // standard_conforming_strings = off: a backslash escapes in every string
        assert_eq!(mask_statement_with("VALUES ('x\\' secret ')", true), "VALUES ($1)");
        assert_eq!(mask_statement_with("VALUES ('x\\', 'y')", false), "VALUES ($1, $2)");
        assert_eq!(mask_statement("SELECT a1, b_2, c$3 FROM x9"), "SELECT a1, b_2, c$3 FROM x9");
        assert_eq!(mask_statement("SELECT '1'::int, -5, .5"), "SELECT $1::int, -$2, $3");
        assert_eq!(
            mask_statement(&format!("SET LOCAL pg_tenancy.tenant = '{TOKEN}'")),
            "SET LOCAL pg_tenancy.tenant = $1"
        );
        assert_eq!(mask_statement(&format!("SELECT 1 /* {TOKEN} */")), "SELECT $1 /* ... */");
        assert_eq!(
            mask_context("SQL statement \"SELECT 1 FROM t WHERE v <> 'secret'\"\nPL/pgSQL function f() line 3 at EXECUTE", false),
            "SQL statement \"SELECT $1 FROM t WHERE v <> $2\"\nPL/pgSQL function f() line 3 at EXECUTE"
        );
        assert_eq!(mask_context("unnamed portal with parameters: $1 = 'secret'", false), "unnamed portal with parameters: $1 = '...'");
        assert_eq!(mask_context("JSON data, line 1: {\"a\":\"secret\", bad...", false), "JSON data, line 1: ...");
        assert_eq!(mask_statement("SELECT 'unterminated"), "SELECT $1");
        assert_eq!(mask_statement("INSERT INTO t VALUES (1, 'x'), (2, 'y')"), "INSERT INTO t VALUES ($1, $2), ($3, $4)");
        assert_eq!(mask_statement("SELECT 'é', 'ü' || café FROM t"), "SELECT $1, $2 || café FROM t");
    }

    #[test]
    fn parameters_and_details() {
        assert_eq!(mask_parameters("parameters: $1 = 'bob', $2 = NULL, $3 = 'it''s'"), "parameters: $1 = '...', $2 = NULL, $3 = '...'");
        assert_eq!(
            mask_detail("Key (email)=(bob@example.com) already exists."),
            "Key (email)=(...) already exists."
        );
        assert_eq!(
            mask_detail("Key (tenant_id, id)=(acme, 7) is not present in table \"orders\"."),
            "Key (tenant_id, id)=(...) is not present in table \"orders\"."
        );
        assert_eq!(mask_detail("Failing row contains (acme, 1, (nested), x)."), "Failing row contains (...).");
        assert_eq!(mask_detail("nothing here"), "nothing here");
    }
}
