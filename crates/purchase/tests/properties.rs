//! Property tests of the frame parser: it never panics, and every accepted amount round-trips to
//! the exact cents, whatever form it was written in. Bounded (proptest's default case count), so
//! they run in every CI run.

use proptest::prelude::*;
use purchase::amount::MAX_CENTS;
use purchase::{Amount, ErrorCode, parse_frame};

/// The written forms of an amount of `cents`: numbers and strings, with 0, 1 or 2 decimals where
/// exact, and leading zeros.
fn forms(cents: i64) -> Vec<String> {
    let (whole, fraction) = (cents / 100, cents % 100);
    let mut texts = vec![format!("{whole}.{fraction:02}")];
    if fraction % 10 == 0 {
        texts.push(format!("{whole}.{}", fraction / 10));
    }
    if fraction == 0 {
        texts.push(whole.to_string());
    }
    let mut forms = texts.clone();
    forms.extend(texts.iter().map(|t| format!("\"{t}\"")));
    forms
}

proptest! {
    #[test]
    fn never_panics_on_any_text(text in any::<String>()) {
        let _ = parse_frame(&text);
    }

    #[test]
    fn never_panics_on_json_like_text(text in r#"[{}\[\]":,0-9a-z.eE+\- ]{0,80}"#) {
        let _ = parse_frame(&text);
    }

    #[test]
    fn every_accepted_amount_round_trips_to_the_exact_cents(cents in 1..=MAX_CENTS, user in "[A-Za-z0-9_.:@-]{1,64}") {
        for amount in forms(cents) {
            let frame = format!(r#"{{"user_id":"{user}","amount":{amount}}}"#);
            let request = parse_frame(&frame).map_err(|r| TestCaseError::fail(format!("{frame}: {r:?}")))?;
            prop_assert_eq!(request.amount.cents(), cents, "{}", frame);
            prop_assert_eq!(request.user_id.as_str(), user.as_str());
            // The canonical text parses back to the same amount.
            prop_assert_eq!(Amount::parse_decimal(&request.amount.to_string()), Ok(request.amount));
        }
    }

    #[test]
    fn leading_zeros_are_always_refused(cents in 1..=MAX_CENTS, zeros in 1..20_000usize) {
        // A JSON-like single leading zero only: `0.75` is fine, `00.75` and `0007.50` are not,
        // and a long run of zeros costs no more than a short one.
        let text = format!("{}{}.{:02}", "0".repeat(zeros), cents / 100, cents % 100);
        let frame = format!(r#"{{"user_id":"u","amount":"{text}"}}"#);
        prop_assert_eq!(parse_frame(&frame).map_err(|r| r.code), Err(ErrorCode::InvalidAmount));
    }

    #[test]
    fn a_third_decimal_digit_is_always_refused(cents in 0..=MAX_CENTS, digit in 1..=9u8) {
        let frame = format!(r#"{{"user_id":"u","amount":"{}.{:02}{digit}"}}"#, cents / 100, cents % 100);
        prop_assert_eq!(parse_frame(&frame).map_err(|r| r.code), Err(ErrorCode::InvalidAmount));
    }

    #[test]
    fn amounts_over_the_maximum_are_refused(cents in (MAX_CENTS + 1)..i64::MAX / 100) {
        let frame = format!(r#"{{"user_id":"u","amount":{}.{:02}}}"#, cents / 100, cents % 100);
        prop_assert_eq!(parse_frame(&frame).map_err(|r| r.code), Err(ErrorCode::InvalidAmount));
    }
}
