//! The purchase itself, the one type every stage shares: the websocket service commits it (with
//! its trace context), the relay publishes it (with its commit time, [`crate::PurchaseEvent`]),
//! the aggregator counts that event. A field added here is carried by all of them.

use uuid::Uuid;

use crate::amount::Amount;
use crate::user::UserId;

/// One purchase: its id, whose it is, how much. Every value is valid by construction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Purchase {
    pub purchase_id: Uuid,
    pub user_id: UserId,
    pub amount: Amount,
}

impl Purchase {
    pub fn new(purchase_id: Uuid, user_id: UserId, amount: Amount) -> Self {
        Self {
            purchase_id,
            user_id,
            amount,
        }
    }
}
