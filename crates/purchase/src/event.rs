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
    /// Set by the sequence-numbered relay (issue 19); absent on events relayed from the outbox.
    pub sequence: Option<Sequence>,
}

/// Where an event stands in its stream: the partition the relay computed for it and that
/// partition's sequence number. A replay stamps the same purchase with the same numbers; the
/// aggregator counts an event only when its number is the next one expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequence {
    pub stream: Uuid,
    pub partition: u32,
    pub seq: u64,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sequence: Option<Sequence>,
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
            sequence: None,
        }
    }

    /// The event stamped with its place in a stream.
    #[must_use]
    pub fn with_sequence(mut self, sequence: Sequence) -> Self {
        self.sequence = Some(sequence);
        self
    }

    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let wire = Wire {
            purchase_id: self.purchase.purchase_id,
            user_id: self.purchase.user_id.clone(),
            amount_cents: self.purchase.amount.cents(),
            amount: self.purchase.amount.to_string(),
            created_at: self.created_at,
            sequence: self.sequence,
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
        let event = Self::new(
            Purchase::new(wire.purchase_id, wire.user_id, amount),
            wire.created_at,
        );
        Ok(match wire.sequence {
            Some(sequence) => event.with_sequence(sequence),
            None => event,
        })
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
    fn a_stamped_event_carries_its_stream_partition_and_number_and_round_trips() {
        let at = DateTime::parse_from_rfc3339("2026-11-26T12:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let stream = Uuid::from_u128(7);
        let event = PurchaseEvent::new(
            Purchase::new(
                Uuid::from_u128(1),
                UserId::parse("u-1").expect("user"),
                Amount::from_cents(100).expect("amount"),
            ),
            at,
        )
        .with_sequence(Sequence {
            stream,
            partition: 3,
            seq: 41,
        });
        let json = String::from_utf8(event.encode().expect("encode")).expect("utf8");
        assert!(
            json.ends_with(r#","sequence":{"stream":"00000000-0000-0000-0000-000000000007","partition":3,"seq":41}}"#),
            "{json}"
        );
        assert_eq!(
            PurchaseEvent::decode(json.as_bytes()).expect("decode"),
            event
        );
        for bad in [r#""partition":-1,"seq":1"#, r#""partition":1,"seq":-1"#] {
            let broken = json.replace(r#""partition":3,"seq":41"#, bad);
            assert!(
                PurchaseEvent::decode(broken.as_bytes()).is_err(),
                "{broken}"
            );
        }
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
