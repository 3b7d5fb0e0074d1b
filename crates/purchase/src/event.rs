//! The purchase event on the Kafka topic: key = user_id, value = this JSON.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::amount::Amount;
use crate::model::Purchase;
use crate::user::UserId;

/// One committed purchase, as published by the outbox relay and counted by the aggregator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurchaseEvent {
    pub purchase: Purchase,
    /// When the purchase was committed.
    pub created_at: DateTime<Utc>,
}

/// The event's JSON on the topic: the amount in cents and, for people reading the topic, the
/// same amount as canonical decimal text; `created_at` in RFC 3339.
#[derive(Serialize, Deserialize)]
struct Wire {
    purchase_id: Uuid,
    /// Validated when decoded: an event never holds an invalid user id.
    user_id: UserId,
    amount_cents: i64,
    amount: String,
    created_at: DateTime<Utc>,
}

/// Why a record on the topic is not a valid purchase event.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("event has an invalid amount: {0}")]
    Amount(#[from] crate::amount::AmountError),
    #[error("event amount {amount:?} does not match amount_cents {amount_cents}")]
    Mismatch { amount: String, amount_cents: i64 },
}

/// The event could not be written as JSON: the relay must keep its outbox row, never publish an
/// empty payload in its place.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode purchase event {purchase_id}: {source}")]
pub struct EncodeError {
    pub purchase_id: Uuid,
    #[source]
    pub source: serde_json::Error,
}

impl PurchaseEvent {
    pub fn new(purchase: Purchase, created_at: DateTime<Utc>) -> Self {
        Self {
            purchase,
            created_at,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let wire = Wire {
            purchase_id: self.purchase.purchase_id,
            user_id: self.purchase.user_id.clone(),
            amount_cents: self.purchase.amount.cents(),
            amount: self.purchase.amount.to_string(),
            created_at: self.created_at,
        };
        serde_json::to_vec(&wire).map_err(|source| EncodeError {
            purchase_id: self.purchase.purchase_id,
            source,
        })
    }

    /// Decodes and validates a record value: a malformed event must never reach a total.
    pub fn decode(bytes: &[u8]) -> Result<Self, EventError> {
        let wire: Wire = serde_json::from_slice(bytes)?;
        let amount = Amount::from_cents(wire.amount_cents)?;
        if amount.to_string() != wire.amount {
            return Err(EventError::Mismatch {
                amount: wire.amount,
                amount_cents: wire.amount_cents,
            });
        }
        Ok(Self::new(
            Purchase::new(wire.purchase_id, wire.user_id, amount),
            wire.created_at,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_exact_fields() {
        let id = Uuid::parse_str("0191c1a4-7b3e-7c5e-9a0b-2f1c3d4e5f60").expect("uuid");
        let at = DateTime::parse_from_rfc3339("2026-11-26T12:00:00.123456Z")
            .expect("time")
            .with_timezone(&Utc);
        let event = PurchaseEvent::new(
            Purchase::new(
                id,
                UserId::parse("123").expect("user"),
                Amount::from_cents(4999).expect("amount"),
            ),
            at,
        );
        let json = String::from_utf8(event.encode().expect("encode")).expect("utf8");
        assert_eq!(
            json,
            r#"{"purchase_id":"0191c1a4-7b3e-7c5e-9a0b-2f1c3d4e5f60","user_id":"123","amount_cents":4999,"amount":"49.99","created_at":"2026-11-26T12:00:00.123456Z"}"#
        );
        assert_eq!(
            PurchaseEvent::decode(json.as_bytes()).expect("decode"),
            event
        );
    }

    #[test]
    fn refuses_invalid_events() {
        let base = r#""purchase_id":"0191c1a4-7b3e-7c5e-9a0b-2f1c3d4e5f60","created_at":"2026-11-26T12:00:00Z""#;
        for bad in [
            "garbage".to_owned(),
            format!(r#"{{{base},"user_id":"","amount_cents":1,"amount":"0.01"}}"#),
            format!(r#"{{{base},"user_id":"u","amount_cents":0,"amount":"0.00"}}"#),
            format!(r#"{{{base},"user_id":"u","amount_cents":5,"amount":"0.06"}}"#),
            format!(r#"{{{base},"user_id":"u","amount_cents":1.5,"amount":"0.01"}}"#),
        ] {
            assert!(PurchaseEvent::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
