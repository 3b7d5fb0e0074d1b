//! Parsing of one inbound WebSocket text frame into a purchase request.
//!
//! The frame is read field by field from the raw JSON text so that the amount is never rounded
//! through a float, duplicated or unknown keys are refused (a misspelt `purchase_id` must not
//! silently drop the idempotency key), and every rejection carries a specific [`ErrorCode`].

use std::fmt;

use serde::Deserializer;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::amount::{Amount, AmountError};
use crate::reply::ErrorCode;
use crate::user::UserId;

/// A valid purchase as the client asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurchaseRequest {
    pub user_id: UserId,
    pub amount: Amount,
    /// The client's idempotency key, if it sent one.
    pub purchase_id: Option<Uuid>,
}

/// A frame that was refused, with the code and the human text of the error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

const FIELDS: [&str; 3] = ["user_id", "amount", "purchase_id"];

/// Parses one text frame. Validation order: JSON shape, then `user_id`, `amount`, `purchase_id`.
pub fn parse_frame(text: &str) -> Result<PurchaseRequest, Rejection> {
    let fields = parse_object(text)?;
    let field = |name: &str| fields.iter().find(|(key, _)| key == name).map(|(_, v)| *v);

    let user_id = match field("user_id") {
        None => {
            return Err(Rejection::new(
                ErrorCode::InvalidUserId,
                "user_id is missing",
            ));
        }
        Some(raw) => match serde_json::from_str::<String>(raw.get()) {
            Ok(text) => UserId::parse(&text)
                .map_err(|e| Rejection::new(ErrorCode::InvalidUserId, e.to_string()))?,
            Err(_) => {
                return Err(Rejection::new(
                    ErrorCode::InvalidUserId,
                    "user_id must be a JSON string",
                ));
            }
        },
    };

    let amount = match field("amount") {
        None => {
            return Err(Rejection::new(
                ErrorCode::InvalidAmount,
                "amount is missing",
            ));
        }
        Some(raw) => parse_amount(raw)
            .map_err(|e| Rejection::new(ErrorCode::InvalidAmount, e.to_string()))?,
    };

    let purchase_id = match field("purchase_id") {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => Some(parse_purchase_id(raw)?),
    };

    Ok(PurchaseRequest {
        user_id,
        amount,
        purchase_id,
    })
}

/// Parses the raw JSON of the `amount` field: a number literal or a string holding a decimal.
pub fn parse_amount(raw: &RawValue) -> Result<Amount, AmountError> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => {
            let inner: String = serde_json::from_str(text).map_err(|_| AmountError::Syntax)?;
            Amount::parse_decimal(&inner)
        }
        Some(b'-' | b'0'..=b'9') => Amount::parse_decimal(text),
        _ => Err(AmountError::WrongType),
    }
}

fn parse_purchase_id(raw: &RawValue) -> Result<Uuid, Rejection> {
    let bad = |why: &str| Rejection::new(ErrorCode::InvalidPurchaseId, why.to_owned());
    let text: String = serde_json::from_str(raw.get())
        .map_err(|_| bad("purchase_id must be a JSON string holding a UUID"))?;
    let id = Uuid::try_parse(&text).map_err(|_| {
        bad("purchase_id must be a UUID such as 0191c1a4-7b3e-7c5e-9a0b-2f1c3d4e5f60")
    })?;
    if id.is_nil() {
        return Err(bad("purchase_id must not be the nil UUID"));
    }
    Ok(id)
}

/// Reads a JSON object into its (key, raw value) pairs, refusing duplicates and unknown keys.
fn parse_object(text: &str) -> Result<Vec<(String, &RawValue)>, Rejection> {
    let malformed = |message: String| Rejection::new(ErrorCode::MalformedJson, message);
    if !text.trim_start().starts_with('{') {
        // Tell apart "not JSON at all" from "JSON, but not an object".
        return Err(match serde_json::from_str::<&RawValue>(text) {
            Ok(_) => malformed("message must be a JSON object".into()),
            Err(e) => malformed(format!("message is not valid JSON: {e}")),
        });
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let fields = deserializer
        .deserialize_map(FieldsVisitor)
        .and_then(|fields| deserializer.end().map(|()| fields))
        .map_err(|e| malformed(format!("message is not valid JSON: {e}")))?;
    let mut seen: Vec<&str> = Vec::with_capacity(fields.len());
    for (key, _) in &fields {
        if !FIELDS.contains(&key.as_str()) {
            return Err(malformed(format!(
                "unknown field {key:?}; expected user_id, amount and optionally purchase_id"
            )));
        }
        if seen.contains(&key.as_str()) {
            return Err(malformed(format!("field {key:?} appears more than once")));
        }
        seen.push(key);
    }
    Ok(fields)
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Vec<(String, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
            // A hostile frame may hold thousands of keys; each is rejected later anyway.
            if fields.len() > FIELDS.len() * 2 {
                return Err(serde::de::Error::custom("too many fields"));
            }
            fields.push((key, value));
        }
        Ok(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        match parse_frame(text) {
            Ok(request) => panic!("{text:?} was accepted as {request:?}"),
            Err(rejection) => rejection.code,
        }
    }

    #[test]
    fn accepts_numbers_and_strings_exactly() {
        let request = parse_frame(r#"{"user_id": "123", "amount": 49.99}"#).expect("valid");
        assert_eq!(request.user_id.as_str(), "123");
        assert_eq!(request.amount.cents(), 4999);
        assert_eq!(request.purchase_id, None);

        let request = parse_frame(r#"{"amount":"12.30","user_id":"u"}"#).expect("valid");
        assert_eq!(request.amount.cents(), 1230);
        let request = parse_frame(r#"{"amount":0.1,"user_id":"u"}"#).expect("valid");
        assert_eq!(request.amount.cents(), 10);
        let request =
            parse_frame(r#"{"amount":7,"user_id":"u","purchase_id":null}"#).expect("valid");
        assert_eq!(request.amount.cents(), 700);

        let id = "0191c1a4-7b3e-7c5e-9a0b-2f1c3d4e5f60";
        let request = parse_frame(&format!(
            r#"{{"user_id":"u","amount":"1.00","purchase_id":"{id}"}}"#
        ))
        .expect("valid");
        assert_eq!(
            request.purchase_id.map(|p| p.to_string()),
            Some(id.to_owned())
        );
    }

    #[test]
    fn malformed_json() {
        for text in [
            "",
            "not json",
            "{",
            r#"{"user_id": "1", "amount": 1"#,
            "[1,2]",
            "42",
            "\"text\"",
            "null",
            r#"{"user_id":"1","amount":1} trailing"#,
            r#"{"user_id":"1","user_id":"2","amount":1}"#,
            r#"{"user_id":"1","amount":1,"ammount":2}"#,
            r#"{"user_id":"1","amount":1,"purchaseId":"x"}"#,
            &format!("{}{}", "{\"a\":".repeat(8000), "}".repeat(8000)),
        ] {
            assert_eq!(code(text), ErrorCode::MalformedJson, "{text:?}");
        }
    }

    #[test]
    fn invalid_user_id() {
        for text in [
            r#"{"amount":1}"#,
            r#"{"user_id":123,"amount":1}"#,
            r#"{"user_id":null,"amount":1}"#,
            r#"{"user_id":["a"],"amount":1}"#,
            r#"{"user_id":"","amount":1}"#,
            r#"{"user_id":"a b","amount":1}"#,
            r#"{"user_id":"\u0000","amount":1}"#,
            r#"{"user_id":"ünï","amount":1}"#,
            &format!(r#"{{"user_id":"{}","amount":1}}"#, "a".repeat(65)),
        ] {
            assert_eq!(code(text), ErrorCode::InvalidUserId, "{text:?}");
        }
    }

    #[test]
    fn invalid_amount() {
        for text in [
            r#"{"user_id":"1"}"#,
            r#"{"user_id":"1","amount":null}"#,
            r#"{"user_id":"1","amount":true}"#,
            r#"{"user_id":"1","amount":{}}"#,
            r#"{"user_id":"1","amount":[1]}"#,
            r#"{"user_id":"1","amount":0}"#,
            r#"{"user_id":"1","amount":-1}"#,
            r#"{"user_id":"1","amount":"NaN"}"#,
            r#"{"user_id":"1","amount":"Infinity"}"#,
            r#"{"user_id":"1","amount":1e2}"#,
            r#"{"user_id":"1","amount":1.005}"#,
            r#"{"user_id":"1","amount":1000000.01}"#,
            r#"{"user_id":"1","amount":"1,5"}"#,
            r#"{"user_id":"1","amount":""}"#,
            &format!(r#"{{"user_id":"1","amount":{}}}"#, "9".repeat(400)),
            // Deeply nested, but valid JSON: the amount has the wrong type.
            &format!(
                r#"{{"user_id":"1","amount":{}1{}}}"#,
                "[".repeat(8000),
                "]".repeat(8000)
            ),
        ] {
            assert_eq!(code(text), ErrorCode::InvalidAmount, "{text:?}");
        }
    }

    #[test]
    fn invalid_purchase_id() {
        for text in [
            r#"{"user_id":"1","amount":1,"purchase_id":"abc"}"#,
            r#"{"user_id":"1","amount":1,"purchase_id":42}"#,
            r#"{"user_id":"1","amount":1,"purchase_id":"00000000-0000-0000-0000-000000000000"}"#,
        ] {
            assert_eq!(code(text), ErrorCode::InvalidPurchaseId, "{text:?}");
        }
    }

    #[test]
    fn user_id_is_checked_before_amount() {
        assert_eq!(
            code(r#"{"user_id":"","amount":-1}"#),
            ErrorCode::InvalidUserId
        );
    }
}
