//! The gRPC API: `wallet.v1.WalletService/GetTotalSpent`, read from Redis.
//!
//! This is the one place where errors become gRPC statuses: invalid input is INVALID_ARGUMENT,
//! an unreachable or failing Redis is UNAVAILABLE, a malformed stored value is INTERNAL. Redis error
//! text is logged, never returned.

use purchase::UserId;
use purchase::amount::cents_to_decimal;
use tonic::{Request, Response, Status};
use wallet_proto::wallet_service_server::WalletService;
use wallet_proto::{GetTotalSpentRequest, GetTotalSpentResponse};

use crate::totals::{Totals, TotalsError};

pub struct Wallet {
    pub totals: Totals,
}

fn status(error: &TotalsError) -> Status {
    match error {
        TotalsError::Unavailable(_) | TotalsError::Redis(_) => {
            Status::unavailable("the totals store is unavailable; retry later")
        }
        TotalsError::Corrupt { .. } => Status::internal("a stored total is invalid"),
    }
}

#[tonic::async_trait]
impl WalletService for Wallet {
    async fn get_total_spent(
        &self,
        request: Request<GetTotalSpentRequest>,
    ) -> Result<Response<GetTotalSpentResponse>, Status> {
        let user_id = request.into_inner().user_id;
        let user = UserId::parse(&user_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let total = self.totals.total(&user).await.map_err(|error| {
            tracing::warn!(user_id = %user, %error, "cannot read total");
            status(&error)
        })?;
        Ok(Response::new(GetTotalSpentResponse {
            user_id: user.to_string(),
            total_cents: total.cents,
            total: cents_to_decimal(total.cents),
            purchase_count: total.count,
        }))
    }
}
