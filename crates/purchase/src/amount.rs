//! Money as an exact number of cents.
//!
//! Amounts arrive as JSON text (a number literal or a decimal string) and are parsed from that text
//! digit by digit: `0.1` is exactly 10 cents. This module must never convert through `f64`.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

/// The largest accepted amount, in cents (1,000,000.00).
pub const MAX_CENTS: i64 = 100_000_000;

/// A positive amount of money of at most [`MAX_CENTS`] cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(i64);

/// Why a text is not an acceptable amount; the `Display` text is sent to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount is empty")]
    Empty,
    #[error("amount must be greater than zero")]
    NotPositive,
    #[error("amount must be a finite decimal number, not {0:?}")]
    NotFinite(String),
    #[error("amount must be written without exponent notation (use 100.00, not 1e2)")]
    Exponent,
    #[error("amount must have at most 2 decimal places")]
    TooManyDecimals,
    #[error("amount must not exceed 1000000.00")]
    TooLarge,
    #[error("amount must be a plain decimal such as 49.99")]
    Syntax,
    #[error("amount must not have leading zeros (write 7.50 or 0.75, not 007.50)")]
    LeadingZero,
    #[error("amount must be a JSON number or a decimal string")]
    WrongType,
}

impl Amount {
    /// Builds an amount from cents, checking the range.
    pub fn from_cents(cents: i64) -> Result<Self, AmountError> {
        if cents <= 0 {
            return Err(AmountError::NotPositive);
        }
        if cents > MAX_CENTS {
            return Err(AmountError::TooLarge);
        }
        Ok(Self(cents))
    }

    /// Parses the decimal text of an amount: digits, optionally a dot and one or two digits.
    pub fn parse_decimal(text: &str) -> Result<Self, AmountError> {
        if text.is_empty() {
            return Err(AmountError::Empty);
        }
        let lower = text.to_ascii_lowercase();
        let unsigned = lower.trim_start_matches(['-', '+']);
        if ["nan", "inf", "infinity"].contains(&unsigned) {
            return Err(AmountError::NotFinite(text.to_owned()));
        }
        if text.starts_with('-') {
            // A negative amount is refused for its sign, whatever follows it.
            return Err(AmountError::NotPositive);
        }
        if lower.contains('e')
            && lower
                .bytes()
                .all(|b| b.is_ascii_digit() || b"e.+-".contains(&b))
        {
            return Err(AmountError::Exponent);
        }
        let (whole, fraction) = match text.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (text, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(whole) || fraction.is_some_and(|f| !all_digits(f)) {
            return Err(AmountError::Syntax);
        }
        // As in JSON numbers: the integer part is `0` or starts with 1-9. A run of leading zeros
        // is refused at once, whatever its length, instead of being parsed away.
        if whole.len() > 1 && whole.starts_with('0') {
            return Err(AmountError::LeadingZero);
        }
        if fraction.is_some_and(|f| f.len() > 2) {
            return Err(AmountError::TooManyDecimals);
        }
        // Hundreds of digits would overflow any integer: they are over the maximum anyway.
        if whole.len() > 7 {
            return Err(AmountError::TooLarge);
        }
        let value = Decimal::from_str(text).map_err(|_| AmountError::Syntax)?;
        let cents = (value * Decimal::ONE_HUNDRED)
            .to_i64()
            .ok_or(AmountError::TooLarge)?;
        Self::from_cents(cents)
    }

    /// The amount in cents.
    pub fn cents(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Amount {
    /// The canonical form: at least one integer digit and exactly two decimals (`49.99`, `0.10`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        format_cents(self.0, f)
    }
}

/// Formats any number of cents (also totals, which can exceed one amount) as a canonical decimal.
pub fn cents_to_decimal(cents: i64) -> String {
    struct Cents(i64);
    impl fmt::Display for Cents {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            format_cents(self.0, f)
        }
    }
    Cents(cents).to_string()
}

fn format_cents(cents: i64, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cents(text: &str) -> Result<i64, AmountError> {
        Amount::parse_decimal(text).map(Amount::cents)
    }

    #[test]
    fn parses_exactly() {
        assert_eq!(cents("0.1"), Ok(10));
        assert_eq!(cents("0.01"), Ok(1));
        assert_eq!(cents("12.30"), Ok(1230));
        assert_eq!(cents("49.99"), Ok(4999));
        assert_eq!(cents("100"), Ok(10_000));
        assert_eq!(cents("1000000.00"), Ok(MAX_CENTS));
        assert_eq!(cents("5.5"), Ok(550));
        // 0.1 + 0.2 is not 0.30000000000000004 here.
        assert_eq!(cents("0.3"), Ok(30));
    }

    #[test]
    fn rejects_each_bad_form_with_its_reason() {
        assert_eq!(cents(""), Err(AmountError::Empty));
        assert_eq!(cents("0"), Err(AmountError::NotPositive));
        assert_eq!(cents("0.00"), Err(AmountError::NotPositive));
        assert_eq!(cents("-5"), Err(AmountError::NotPositive));
        assert_eq!(cents("-0.01"), Err(AmountError::NotPositive));
        assert_eq!(cents("NaN"), Err(AmountError::NotFinite("NaN".into())));
        assert_eq!(
            cents("Infinity"),
            Err(AmountError::NotFinite("Infinity".into()))
        );
        assert_eq!(cents("-inf"), Err(AmountError::NotFinite("-inf".into())));
        assert_eq!(cents("1e2"), Err(AmountError::Exponent));
        assert_eq!(cents("1E2"), Err(AmountError::Exponent));
        assert_eq!(cents("1.5e-1"), Err(AmountError::Exponent));
        // JSON-like: a single leading zero only, refused at once however many follow.
        assert_eq!(cents("0000000000005.5"), Err(AmountError::LeadingZero));
        assert_eq!(cents("00.50"), Err(AmountError::LeadingZero));
        assert_eq!(cents("007"), Err(AmountError::LeadingZero));
        let zeros = format!("{}1", "0".repeat(15_000));
        assert_eq!(cents(&zeros), Err(AmountError::LeadingZero));
        assert_eq!(cents(&format!("{zeros}.01")), Err(AmountError::LeadingZero));
        assert_eq!(cents("0.75"), Ok(75));
        assert_eq!(cents("0.001"), Err(AmountError::TooManyDecimals));
        assert_eq!(cents("12.300"), Err(AmountError::TooManyDecimals));
        assert_eq!(cents("1000000.01"), Err(AmountError::TooLarge));
        assert_eq!(cents("99999999"), Err(AmountError::TooLarge));
        assert_eq!(cents(&"9".repeat(300)), Err(AmountError::TooLarge));
        for bad in [
            ".5", "5.", "1.2.3", " 1", "1 ", "+1", "1,00", "0x10", "١٢", "1_000", "abc",
        ] {
            assert_eq!(cents(bad), Err(AmountError::Syntax), "{bad:?}");
        }
    }

    #[test]
    fn formats_canonically() {
        assert_eq!(
            Amount::from_cents(4999).map(|a| a.to_string()),
            Ok("49.99".into())
        );
        assert_eq!(
            Amount::from_cents(10).map(|a| a.to_string()),
            Ok("0.10".into())
        );
        assert_eq!(
            Amount::from_cents(100).map(|a| a.to_string()),
            Ok("1.00".into())
        );
        assert_eq!(cents_to_decimal(0), "0.00");
        assert_eq!(cents_to_decimal(123_456_789_012), "1234567890.12");
        assert_eq!(cents_to_decimal(-5), "-0.05");
    }

    #[test]
    fn checks_range_from_cents() {
        assert_eq!(Amount::from_cents(0), Err(AmountError::NotPositive));
        assert_eq!(
            Amount::from_cents(MAX_CENTS + 1),
            Err(AmountError::TooLarge)
        );
        assert!(Amount::from_cents(1).is_ok());
    }
}
