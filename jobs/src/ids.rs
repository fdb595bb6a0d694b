//! Newtypes built at the boundary: once a value has one of these types it has been parsed, so
//! the core never re-checks it, and a `TenantId` can never be passed where an `AccountId` is meant.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a raw value was refused at the boundary; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{what} must be a UUID such as 0196f3c1-6b1e-7d2a-9c33-2f4e5a6b7c8d")]
    NotUuid { what: &'static str },
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is too long: at most {max} characters")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} contains characters that are not allowed: {allowed}")]
    BadCharacters {
        what: &'static str,
        allowed: &'static str,
    },
    #[error("`{value}` is not a valid email address")]
    BadEmail { value: String },
    #[error("{what} must look like <local@domain>")]
    BadMessageId { what: &'static str },
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type)]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh, time-ordered id (UUIDv7 keeps b-tree inserts local).
            #[must_use]
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
            #[must_use]
            pub const fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }
            #[must_use]
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s.trim())
                    .map(Self)
                    .map_err(|_| ParseError::NotUuid { what: $what })
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }
    };
}

uuid_id!(
    /// A customer organisation; every help-desk row belongs to exactly one.
    TenantId,
    "tenant id"
);
uuid_id!(
    /// A connected Microsoft 365 mailbox.
    AccountId,
    "account id"
);
uuid_id!(
    /// A stored help-desk message (inbound or outbound).
    MessageId,
    "message id"
);
uuid_id!(
    /// An agent's reply on its way out (a row of helpdesk_outbound_sends).
    SendId,
    "send id"
);

macro_rules! int_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type)]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(i64);

        impl $name {
            #[must_use]
            pub const fn new(id: i64) -> Self {
                Self(id)
            }
            #[must_use]
            pub const fn get(&self) -> i64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

int_id!(
    /// A ticket's number, also the `[#n]` token in reply subjects.
    TicketId
);
int_id!(
    /// A row of the job queue.
    JobId
);

/// Graph's id of a message. With `Prefer: IdType="ImmutableId"` it survives folder moves.
/// Ids are case-sensitive and opaque: never normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(try_from = "String", into = "String")]
#[sqlx(transparent)]
pub struct MicrosoftMessageId(String);

impl MicrosoftMessageId {
    pub const MAX_LEN: usize = 512;
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for MicrosoftMessageId {
    type Error = ParseError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        const WHAT: &str = "Microsoft message id";
        if value.is_empty() {
            return Err(ParseError::Empty { what: WHAT });
        }
        if value.len() > Self::MAX_LEN {
            return Err(ParseError::TooLong {
                what: WHAT,
                max: Self::MAX_LEN,
            });
        }
        if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ParseError::BadCharacters {
                what: WHAT,
                allowed: "no spaces or control characters",
            });
        }
        Ok(Self(value))
    }
}

impl From<MicrosoftMessageId> for String {
    fn from(value: MicrosoftMessageId) -> Self {
        value.0
    }
}

impl fmt::Display for MicrosoftMessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An RFC 5322 Message-ID in its canonical `<local@domain>` form. Ids without `@` are junk
/// (some mailers emit them) and are refused here so threading never matches on them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(try_from = "String", into = "String")]
#[sqlx(transparent)]
pub struct InternetMessageId(String);

impl InternetMessageId {
    pub const MAX_LEN: usize = 998;
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Accepts `<a@b>` or a bare `a@b` and returns the bracketed form.
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        const WHAT: &str = "Internet Message-ID";
        let trimmed = raw.trim();
        let inner = trimmed
            .strip_prefix('<')
            .and_then(|s| s.strip_suffix('>'))
            .unwrap_or(trimmed)
            .trim();
        if inner.is_empty() {
            return Err(ParseError::Empty { what: WHAT });
        }
        if inner.len() > Self::MAX_LEN {
            return Err(ParseError::TooLong {
                what: WHAT,
                max: Self::MAX_LEN,
            });
        }
        let Some((local, domain)) = inner.rsplit_once('@') else {
            return Err(ParseError::BadMessageId { what: WHAT });
        };
        if local.is_empty()
            || domain.is_empty()
            || inner
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
        {
            return Err(ParseError::BadMessageId { what: WHAT });
        }
        Ok(Self(format!("<{inner}>")))
    }
}

impl TryFrom<String> for InternetMessageId {
    type Error = ParseError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<InternetMessageId> for String {
    fn from(value: InternetMessageId) -> Self {
        value.0
    }
}

impl fmt::Display for InternetMessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A syntactically valid address, stored lower-cased in the domain so comparisons are stable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(try_from = "String", into = "String")]
#[sqlx(transparent)]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let trimmed = raw.trim();
        if !email_address::EmailAddress::is_valid(trimmed) || trimmed.len() > 320 {
            return Err(ParseError::BadEmail {
                value: trimmed.chars().take(80).collect(),
            });
        }
        let (local, domain) = trimmed
            .rsplit_once('@')
            .ok_or_else(|| ParseError::BadEmail {
                value: trimmed.chars().take(80).collect(),
            })?;
        Ok(Self(format!("{local}@{}", domain.to_ascii_lowercase())))
    }
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Case-insensitive comparison key (mailbox local parts are case-insensitive in practice
    /// at Microsoft 365).
    #[must_use]
    pub fn key(&self) -> String {
        self.0.to_lowercase()
    }
}

impl TryFrom<String> for EmailAddress {
    type Error = ParseError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<EmailAddress> for String {
    fn from(value: EmailAddress) -> Self {
        value.0
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client-chosen key that makes a POST safe to repeat: 1–128 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 128;
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = ParseError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        const WHAT: &str = "Idempotency-Key";
        if value.is_empty() {
            return Err(ParseError::Empty { what: WHAT });
        }
        if value.len() > Self::MAX_LEN {
            return Err(ParseError::TooLong {
                what: WHAT,
                max: Self::MAX_LEN,
            });
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ParseError::BadCharacters {
                what: WHAT,
                allowed: "visible ASCII characters, no spaces",
            });
        }
        Ok(Self(value))
    }
}

impl From<IdempotencyKey> for String {
    fn from(value: IdempotencyKey) -> Self {
        value.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internet_message_id_is_bracketed_and_junk_is_refused() {
        assert_eq!(
            InternetMessageId::parse("abc@example.com")
                .unwrap()
                .as_str(),
            "<abc@example.com>"
        );
        assert_eq!(
            InternetMessageId::parse(" <abc@example.com> ")
                .unwrap()
                .as_str(),
            "<abc@example.com>"
        );
        assert!(InternetMessageId::parse("<1234567>").is_err());
        assert!(InternetMessageId::parse("<>").is_err());
        assert!(InternetMessageId::parse("<a b@c>").is_err());
    }

    #[test]
    fn email_address_lowercases_the_domain_only() {
        let e = EmailAddress::parse(" Alice@Example.COM ").unwrap();
        assert_eq!(e.as_str(), "Alice@example.com");
        assert_eq!(e.key(), "alice@example.com");
        assert!(EmailAddress::parse("not-an-address").is_err());
    }

    #[test]
    fn idempotency_key_bounds() {
        assert!(IdempotencyKey::try_from("k-1".to_string()).is_ok());
        assert!(IdempotencyKey::try_from(String::new()).is_err());
        assert!(IdempotencyKey::try_from("has space".to_string()).is_err());
        assert!(IdempotencyKey::try_from("x".repeat(129)).is_err());
    }

    #[test]
    fn ids_of_different_entities_parse_with_their_own_message() {
        let err = "nope".parse::<TenantId>().unwrap_err();
        assert!(err.to_string().contains("tenant id"));
        let err = "nope".parse::<AccountId>().unwrap_err();
        assert!(err.to_string().contains("account id"));
    }
}
