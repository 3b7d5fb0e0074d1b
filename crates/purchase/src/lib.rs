//! Domain types shared by every service and client of the purchase pipeline.
//!
//! Layout:
//! - [`amount`]: [`Amount`], money as integer cents parsed exactly from JSON text;
//! - [`user`]: [`UserId`], the validated user identifier;
//! - [`inbound`]: turns one WebSocket text frame into a [`PurchaseRequest`] or a [`Rejection`];
//! - [`reply`]: the JSON replies the WebSocket service sends back;
//! - [`model`]: [`Purchase`], the purchase itself, shared by every stage;
//! - [`event`]: the [`PurchaseEvent`] carried on the Kafka topic (a purchase and its commit time).
//!
//! This crate never performs I/O and never touches `f64`: every value that can be constructed is valid.

pub mod amount;
pub mod event;
pub mod inbound;
pub mod model;
pub mod reply;
pub mod user;

pub use amount::{Amount, AmountError};
pub use event::{EncodeError, EventError, PurchaseEvent, Sequence};
pub use inbound::{PurchaseRequest, Rejection, parse_frame};
pub use model::Purchase;
pub use reply::{ErrorCode, Reply};
pub use user::{UserId, UserIdError};
