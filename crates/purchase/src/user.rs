//! The validated user identifier.

use std::fmt;

/// Longest accepted user id, in characters (all ASCII, so also bytes).
pub const MAX_LEN: usize = 64;

/// 1 to 64 characters from ASCII letters, digits and `_ - . : @`.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

/// Why a text is not a user id; the `Display` text is sent to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserIdError {
    #[error("user_id must not be empty")]
    Empty,
    #[error("user_id must be at most 64 characters")]
    TooLong,
    #[error("user_id may only contain ASCII letters, digits and _ - . : @")]
    BadCharacter,
}

impl UserId {
    pub fn parse(text: &str) -> Result<Self, UserIdError> {
        if text.is_empty() {
            return Err(UserIdError::Empty);
        }
        if text.chars().count() > MAX_LEN {
            return Err(UserIdError::TooLong);
        }
        if !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:@".contains(&b))
        {
            return Err(UserIdError::BadCharacter);
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for UserId {
    type Error = UserIdError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::parse(&text)
    }
}

impl From<UserId> for String {
    fn from(user: UserId) -> Self {
        user.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        for ok in ["123", "a", "User_1-x.y:z@example.com", &"a".repeat(64)] {
            assert_eq!(UserId::parse(ok).map(|u| u.to_string()), Ok(ok.to_owned()));
        }
    }

    #[test]
    fn rejects_with_reason() {
        assert_eq!(UserId::parse(""), Err(UserIdError::Empty));
        assert_eq!(UserId::parse(&"a".repeat(65)), Err(UserIdError::TooLong));
        for bad in ["a b", "é", "a\u{0}", "a\n", "a/b", "a\"", "🙂", "a%20"] {
            assert_eq!(
                UserId::parse(bad),
                Err(UserIdError::BadCharacter),
                "{bad:?}"
            );
        }
        assert_eq!(UserId::parse(&"é".repeat(65)), Err(UserIdError::TooLong));
    }
}
