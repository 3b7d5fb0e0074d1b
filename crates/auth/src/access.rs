//! What a verified request may do ([`Access`]), and why a token is refused ([`AuthError`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{SCOPE_READ_ANY, SCOPE_WRITE_ANY};

/// Why a request's token was refused. The text is safe to return to the client: it names the
/// check that failed, never the token or the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a bearer token is required")]
    Missing,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's algorithm is not accepted")]
    Algorithm,
    #[error("the token's key id is unknown")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's issuer is not accepted")]
    Issuer,
    #[error("the token's audience is not accepted")]
    Audience,
    #[error("the token lacks the {0} claim")]
    MissingClaim(String),
    #[error("the token's typ is not accepted")]
    Type,
}

/// What a verified request may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// `AUTH_MODE=none`: everything.
    Open,
    Token(Principal),
}

/// The verified content of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub scopes: Vec<String>,
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at: u64,
}

impl Access {
    fn allows(&self, user_id: &str, scope: &str) -> bool {
        match self {
            Self::Open => true,
            Self::Token(principal) => {
                principal.subject == user_id || principal.scopes.iter().any(|s| s == scope)
            }
        }
    }

    /// The token's subject (`None` with authentication off).
    pub fn subject(&self) -> Option<&str> {
        match self {
            Self::Open => None,
            Self::Token(principal) => Some(&principal.subject),
        }
    }

    /// Whether purchases for `user_id` may be submitted.
    pub fn may_write_for(&self, user_id: &str) -> bool {
        self.allows(user_id, SCOPE_WRITE_ANY)
    }

    /// Whether `user_id`'s total may be read.
    pub fn may_read(&self, user_id: &str) -> bool {
        self.allows(user_id, SCOPE_READ_ANY)
    }

    /// How long the access lasts from now (None: for ever). Zero once expired; `Duration::MAX`
    /// for an `exp` beyond what the clock can represent (a validly signed token may carry any
    /// u64: it must not panic the connection that holds it).
    pub fn remaining(&self) -> Option<Duration> {
        match self {
            Self::Open => None,
            Self::Token(principal) => Some(
                UNIX_EPOCH
                    .checked_add(Duration::from_secs(principal.expires_at))
                    .map_or(Duration::MAX, |expiry| {
                        expiry
                            .duration_since(SystemTime::now())
                            .unwrap_or(Duration::ZERO)
                    }),
            ),
        }
    }
}
