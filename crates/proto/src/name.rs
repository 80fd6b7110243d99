//! Validated names: node names (`alice`), service names (`web`) and the
//! `node.service` form users type.
//!
//! Character set (PROTOCOL.md §3): lowercase ASCII letters, digits and `-`;
//! 1 to 32 characters; starts with a letter; does not end with `-`. Input is
//! case-folded to lowercase before validation so `Alice` and `alice` are one
//! name. No other normalisation happens, so there is no Unicode confusable.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

pub const MAX_NAME_LEN: usize = 32;

fn validate(what: &'static str, s: &str) -> Result<String> {
    let s = s.to_ascii_lowercase();
    let invalid = |why| Error::Invalid { what, why };
    if s.is_empty() {
        return Err(invalid("empty"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(Error::TooLong {
            what,
            len: s.len(),
            max: MAX_NAME_LEN,
        });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid("only letters, digits and '-' are allowed"));
    }
    if !s.as_bytes().first().is_some_and(u8::is_ascii_lowercase) {
        return Err(invalid("must start with a letter"));
    }
    if s.ends_with('-') {
        return Err(invalid("must not end with '-'"));
    }
    Ok(s)
}

macro_rules! name_type {
    ($(#[$m:meta])* $t:ident, $what:literal) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $t(String);

        impl $t {
            pub fn new(s: &str) -> Result<Self> {
                validate($what, s).map(Self)
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl FromStr for $t {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($t), self.0)
            }
        }
    };
}

name_type!(
    /// A node's human name, claimed in a NameClaim record (`alice`).
    NodeName,
    "node name"
);
name_type!(
    /// A service's name on its node (`web`).
    ServiceName,
    "service name"
);

/// `node.service` as a user types it. The node part is either a name or a
/// node-id prefix (the way to pick one side of a name clash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QualifiedName {
    pub node: String,
    pub service: ServiceName,
}

impl FromStr for QualifiedName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (node, service) = s.split_once('.').ok_or(Error::Invalid {
            what: "service address",
            why: "expected NODE.SERVICE, e.g. alice.web",
        })?;
        let node = node.to_ascii_lowercase();
        let node_ok = NodeName::new(&node).is_ok()
            || (node.len() >= 4
                && node.len() <= crate::id::NODE_ID_TEXT_LEN
                && node
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)));
        if !node_ok {
            return Err(Error::Invalid {
                what: "service address",
                why: "node part is not a name or id prefix",
            });
        }
        Ok(Self {
            node,
            service: ServiceName::new(service)?,
        })
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.node, self.service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(NodeName::new("Alice").unwrap().as_str(), "alice");
        assert!(NodeName::new("a-1").is_ok());
        for bad in ["", "1a", "a-", "a_b", "a.b", "é", &"a".repeat(33)] {
            assert!(NodeName::new(bad).is_err(), "{bad:?}");
        }
        let q: QualifiedName = "alice.web".parse().unwrap();
        assert_eq!(q.node, "alice");
        assert_eq!(q.service.as_str(), "web");
        assert!("alice".parse::<QualifiedName>().is_err());
        assert!("alice.".parse::<QualifiedName>().is_err());
    }
}
