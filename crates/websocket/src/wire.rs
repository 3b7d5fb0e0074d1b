//! The one place where outcomes and errors become what clients see: reply frames and close codes.
//!
//! Internal error text (SQL, connection failures) is logged by the caller and never sent.

use purchase::{ErrorCode, Rejection, Reply};

use crate::store::{NewPurchase, Outcome, StoreError};

/// Close code sent when the server shuts down ("going away").
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code sent when a frame or message exceeds the size limit ("message too big").
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code sent to an idle connection (normal closure).
pub const CLOSE_IDLE: u16 = 1000;
/// A text frame that is not valid UTF-8 ("invalid frame payload data").
pub const CLOSE_INVALID_DATA: u16 = 1007;
/// A frame that breaks RFC 6455 (a reserved opcode or bit, an unmasked frame, ...).
pub const CLOSE_PROTOCOL: u16 = 1002;
/// Policy violation: the client did not read its replies within `WS_REPLY_DEADLINE_MS`, or its
/// token expired while the connection was open.
pub const CLOSE_POLICY: u16 = 1008;

pub fn forbidden_user(user_id: &purchase::UserId) -> Reply {
    Reply::error(
        ErrorCode::ForbiddenUser,
        format!(
            "this connection's token may not submit purchases for user_id {user_id}; nothing was saved"
        ),
    )
}

pub fn rate_limited(per_second: u32) -> Reply {
    Reply::error(
        ErrorCode::RateLimited,
        format!(
            "more than {per_second} frames per second on this connection; this one was not processed; slow down and resend it"
        ),
    )
}

pub fn subject_rate_limited(per_second: u32) -> Reply {
    Reply::error(
        ErrorCode::RateLimited,
        format!(
            "more than {per_second} frames per second from this token's subject over all its connections; this one was not processed; slow down and resend it"
        ),
    )
}

pub fn rejected(rejection: Rejection) -> Reply {
    Reply::error(rejection.code, rejection.message)
}

pub fn binary_frame() -> Reply {
    Reply::error(
        ErrorCode::UnsupportedFrame,
        "binary frames are not supported; send each purchase as a JSON text frame",
    )
}

pub fn outcome(new: &NewPurchase, result: &Result<Outcome, StoreError>) -> Reply {
    let purchase = &new.purchase;
    let unavailable = |message: &str| Reply::Error {
        code: ErrorCode::Unavailable,
        message: message.to_owned(),
        purchase_id: Some(purchase.purchase_id),
    };
    match result {
        Ok(Outcome::Committed | Outcome::AlreadyCommitted) => {
            Reply::ack(purchase.purchase_id, &purchase.user_id, purchase.amount)
        }
        Ok(Outcome::Conflict) => Reply::error(
            ErrorCode::PurchaseIdConflict,
            format!(
                "purchase_id {} was already used for a purchase with a different user_id or amount",
                purchase.purchase_id
            ),
        ),
        Err(StoreError::Overloaded) => unavailable(
            "the server is overloaded; the purchase was not saved; retry with the same purchase_id",
        ),
        Err(StoreError::ShuttingDown) => unavailable(
            "the server is shutting down; the purchase was not saved; retry with the same purchase_id",
        ),
        Err(StoreError::Db(_)) => unavailable(
            "storage is unavailable; the purchase was not acknowledged; retry with the same purchase_id",
        ),
    }
}
