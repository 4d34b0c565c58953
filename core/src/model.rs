//! The extension's vocabulary as types: what a role may do in a tenant, what state a tenant is
//! in, what a key is for and what state it is in. The catalog stores them as text (CHECK
//! constraints list the same spellings); everything else handles these enums.

/// What a role may do inside a tenant, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Read,
    ReadWrite,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::ReadWrite, Scope::Admin];

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::ReadWrite => "read_write",
            Scope::Admin => "admin",
        }
    }

    /// The rank the catalog computes for the strongest of several grants (1, 2, 3).
    pub fn rank(self) -> i32 {
        self as i32 + 1
    }

    pub fn from_rank(rank: i32) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.rank() == rank)
    }
}

/// A tenant's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Reads and writes.
    Active,
    /// Reads work, writes are refused (25006).
    ReadOnly,
    /// Every context for it is refused (55000); reversible.
    Suspended,
    /// Final.
    Offboarded,
}

impl Status {
    pub const ALL: [Status; 4] = [Status::Active, Status::ReadOnly, Status::Suspended, Status::Offboarded];

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::ReadOnly => "read_only",
            Status::Suspended => "suspended",
            Status::Offboarded => "offboarded",
        }
    }
}

/// What a tenant key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// Encrypts values; rotated.
    Data,
    /// Keys `blind_index()`; not rotated with data keys (the index must stay stable).
    Index,
}

impl KeyKind {
    pub fn parse(s: &str) -> Option<KeyKind> {
        match s {
            "data" => Some(KeyKind::Data),
            "index" => Some(KeyKind::Index),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Data => "data",
            KeyKind::Index => "index",
        }
    }
}

/// A key version's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// The version new values are encrypted with (one per tenant and kind).
    Active,
    /// Older versions: they decrypt, never encrypt.
    DecryptOnly,
    /// Crypto-shredded: the wrapped key is gone.
    Destroyed,
}

impl KeyState {
    pub fn parse(s: &str) -> Option<KeyState> {
        match s {
            "active" => Some(KeyState::Active),
            "decrypt_only" => Some(KeyState::DecryptOnly),
            "destroyed" => Some(KeyState::Destroyed),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_and_scopes_are_ordered() {
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
            assert_eq!(Scope::from_rank(s.rank()), Some(s));
        }
        assert!(Scope::Read < Scope::ReadWrite && Scope::ReadWrite < Scope::Admin);
        assert_eq!(Scope::parse("owner"), None);
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        for k in [KeyKind::Data, KeyKind::Index] {
            assert_eq!(KeyKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(KeyState::parse("destroyed"), Some(KeyState::Destroyed));
    }
}
