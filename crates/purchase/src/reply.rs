//! The JSON replies the WebSocket service sends, one per text frame.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::amount::Amount;
use crate::user::UserId;

/// The error codes of the public contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, or with duplicated or unknown keys.
    MalformedJson,
    InvalidUserId,
    InvalidAmount,
    InvalidPurchaseId,
    /// The purchase_id was already used for a purchase with other content.
    PurchaseIdConflict,
    /// A binary frame.
    UnsupportedFrame,
    /// The connection's token is not allowed to submit for this user_id (nothing was written).
    ForbiddenUser,
    /// More frames per second than the connection's rate limit (nothing was written; the
    /// connection stays open).
    RateLimited,
    /// Storage down or overloaded: nothing was acknowledged; retrying with the same purchase_id is safe.
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedJson => "malformed_json",
            Self::InvalidUserId => "invalid_user_id",
            Self::InvalidAmount => "invalid_amount",
            Self::InvalidPurchaseId => "invalid_purchase_id",
            Self::PurchaseIdConflict => "purchase_id_conflict",
            Self::UnsupportedFrame => "unsupported_frame",
            Self::ForbiddenUser => "forbidden_user",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
        }
    }
}

/// One reply frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Sent only after the purchase is committed in PostgreSQL.
    Ack {
        purchase_id: Uuid,
        user_id: String,
        /// Canonical decimal with two places.
        amount: String,
    },
    Error {
        code: ErrorCode,
        message: String,
        /// On `unavailable`, the id the purchase was given, so that a client that did not send one
        /// can still retry without risk of counting it twice.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        purchase_id: Option<Uuid>,
    },
}

impl Reply {
    pub fn ack(purchase_id: Uuid, user_id: &UserId, amount: Amount) -> Self {
        Self::Ack {
            purchase_id,
            user_id: user_id.to_string(),
            amount: amount.to_string(),
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
            purchase_id: None,
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: no maps with non-string keys, no floats.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"unavailable","message":"internal error"}"#.to_owned()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_ack_exactly() {
        let id = Uuid::parse_str("0191c1a4-7b3e-7c5e-9a0b-2f1c3d4e5f60").expect("uuid");
        let user = UserId::parse("123").expect("user");
        let amount = Amount::from_cents(4999).expect("amount");
        assert_eq!(
            Reply::ack(id, &user, amount).to_json(),
            r#"{"type":"ack","purchase_id":"0191c1a4-7b3e-7c5e-9a0b-2f1c3d4e5f60","user_id":"123","amount":"49.99"}"#
        );
    }

    #[test]
    fn encodes_errors_with_codes() {
        assert_eq!(
            Reply::error(ErrorCode::InvalidAmount, "amount is missing").to_json(),
            r#"{"type":"error","code":"invalid_amount","message":"amount is missing"}"#
        );
        for code in [
            ErrorCode::MalformedJson,
            ErrorCode::InvalidUserId,
            ErrorCode::InvalidAmount,
            ErrorCode::InvalidPurchaseId,
            ErrorCode::PurchaseIdConflict,
            ErrorCode::UnsupportedFrame,
            ErrorCode::ForbiddenUser,
            ErrorCode::RateLimited,
            ErrorCode::Unavailable,
        ] {
            let json = Reply::error(code, "m").to_json();
            assert!(
                json.contains(&format!(r#""code":"{}""#, code.as_str())),
                "{json}"
            );
            let back: Reply = serde_json::from_str(&json).expect("round trip");
            assert_eq!(back, Reply::error(code, "m"));
        }
    }
}
