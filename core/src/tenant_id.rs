//! Tenant ids: their shape, and the rule that keeps two ids from naming the same rows.
//!
//! An id is 1 to 63 characters of ASCII letters, digits, `_`, `-` and `.` (UUID text fits).
//! A protected table's tenant column may be text, varchar, uuid, integer or bigint, and the
//! policies compare it with the id cast to the column's type. Casts alias: `'007'::int = 7`,
//! `'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'::uuid` equals its lowercase form. So an id that reads
//! as an integer or as a UUID must be written exactly as that type prints it (its canonical
//! form): `7`, never `007` or `-0`; a UUID in lowercase, hyphenated 8-4-4-4-12. Then every value
//! of an integer or uuid column has one id at most, whatever the column's type, and the same id
//! works on every table. Enforced wherever an id enters: `create_tenant`, the tenants table's
//! CHECK, `set_tenant`, `SET pg_tenancy.tenant`, token claims and `grant_tenant`.
//!
//! Pure logic, no PostgreSQL: unit-tested with plain `cargo test`.

/// Why an id is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Empty, too long, or a character outside `[A-Za-z0-9_.-]`.
    Shape,
    /// Reads as an integer or UUID but is not written in that type's canonical form.
    NotCanonical,
}

/// The longest id.
pub const MAX_LEN: usize = 63;

/// Check an id; `Ok` when it may name a tenant.
pub fn check(id: &str) -> Result<(), Problem> {
    if !(1..=MAX_LEN).contains(&id.len())
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(Problem::Shape);
    }
    if integer_like(id) && !canonical_integer(id) {
        return Err(Problem::NotCanonical);
    }
    if uuid_like(id) && !canonical_uuid(id) {
        return Err(Problem::NotCanonical);
    }
    Ok(())
}

/// Whether `id` may name a tenant.
pub fn valid(id: &str) -> bool {
    check(id).is_ok()
}

/// Whether `region` is spelt as a region must be (`tenancy.tenants.region`, `pg_tenancy.region`):
/// 1 to 63 characters, lowercase letters, digits, '-' and '_', not starting with '-' or '_'.
pub fn valid_region(region: &[u8]) -> bool {
    (1..=63).contains(&region.len())
        && (region[0].is_ascii_lowercase() || region[0].is_ascii_digit())
        && region.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// An optional minus sign and digits: what integer input would read (after our character rule,
/// which already excludes `+` and white space).
fn integer_like(id: &str) -> bool {
    let digits = id.strip_prefix('-').unwrap_or(id);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// No leading zeros, no negative zero.
fn canonical_integer(id: &str) -> bool {
    let (neg, digits) = match id.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, id),
    };
    if digits == "0" {
        return !neg;
    }
    !digits.starts_with('0')
}

/// 32 hexadecimal digits with hyphens anywhere between them: everything uuid input could read
/// (it accepts a hyphen after any group of four digits, and either case), and a little more.
fn uuid_like(id: &str) -> bool {
    let hex = id.bytes().filter(|b| b.is_ascii_hexdigit()).count();
    hex == 32
        && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}

/// Lowercase, hyphens after digits 8, 12, 16 and 20: what uuid output prints.
fn canonical_uuid(id: &str) -> bool {
    id.len() == 36
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn regions() {
        for ok in ["eu-west", "default", "us_east_1", "1a"] {
            assert!(super::valid_region(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "EU-WEST", "eu-west ", "-eu", "_eu", "eu.west", "é"] {
            assert!(!super::valid_region(bad.as_bytes()), "{bad:?}");
        }
        assert!(!super::valid_region("a".repeat(64).as_bytes()));
    }

    use super::*;

    #[test]
    fn shapes() {
        for ok in ["acme", "a.b_c-1", "42", "7c9e6679-7425-40de-944b-e07fc1f90ae7", &"x".repeat(63), "0", "-7"] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for bad in ["", " ", "a b", "a'b", "a;b", "a/b", "é", &"x".repeat(64), "a\0b", "+7", " 7"] {
            assert_eq!(check(bad), Err(Problem::Shape), "{bad}");
        }
    }

    #[test]
    fn integers_have_one_spelling() {
        for alias in ["007", "00", "-0", "-007", "0042"] {
            assert_eq!(check(alias), Err(Problem::NotCanonical), "{alias}");
        }
        // text that merely contains digits is not an integer
        for ok in ["007x", "x007", "0.7", "07.1", "1e3"] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn uuids_have_one_spelling() {
        let canonical = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        assert_eq!(check(canonical), Ok(()));
        for alias in [
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
            "a0eebc99-9C0B-4ef8-bb6d-6bb9bd380a11",
        ] {
            assert_eq!(check(alias), Err(Problem::NotCanonical), "{alias}");
        }
        // 31 or 33 hex digits, or other letters: not a UUID, just text
        for ok in ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111", "g0eebc999c0b4ef8bb6d6bb9bd380a11"] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn a_32_digit_integer_is_refused_as_a_non_canonical_uuid_only_when_not_canonical() {
        // all digits, 32 of them: integer-like and uuid-like; canonical as an integer, but not a
        // canonical UUID (no hyphens), so a uuid column could read it: refused.
        assert_eq!(check("12345678901234567890123456789012"), Err(Problem::NotCanonical));
    }
}
