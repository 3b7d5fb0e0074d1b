//! The gRPC API: `wallet.v1.WalletService/GetTotalSpent`, read from Redis.
//!
//! This is the one place where errors become gRPC statuses: a missing or invalid bearer token is
//! UNAUTHENTICATED, a token that may not read this user's total is PERMISSION_DENIED, invalid input
//! is INVALID_ARGUMENT, an unreachable or failing Redis is UNAVAILABLE, a malformed stored value is
//! INTERNAL. Redis error text is logged, never returned.
//!
//! Authentication is an interceptor in front of `WalletService` only ([`authenticate`]): the
//! health service stays open to probes. With `GRPC_RATE_LIMIT_PER_SUBJECT_PER_SEC` set, calls of
//! one token subject over that rate are RESOURCE_EXHAUSTED.

use std::sync::Arc;

use purchase::UserId;
use purchase::amount::cents_to_decimal;
use tonic::{Request, Response, Status};
use wallet_proto::wallet_service_server::WalletService;
use wallet_proto::{GetTotalSpentRequest, GetTotalSpentResponse};

use crate::totals::{Totals, TotalsError};

pub struct Wallet {
    pub totals: Totals,
    pub metrics: Arc<crate::metrics::Metrics>,
}

const GET_TOTAL_SPENT: &str = "GetTotalSpent";

fn status(error: &TotalsError) -> Status {
    match error {
        TotalsError::Unavailable(_)
        | TotalsError::Redis(_)
        | TotalsError::Info { .. }
        | TotalsError::Evicting { .. } => {
            Status::unavailable("the totals store is unavailable; retry later")
        }
        TotalsError::Corrupt { .. } => Status::internal("a stored total is invalid"),
    }
}

/// The interceptor that verifies the `authorization: Bearer <token>` metadata and hands what the
/// token allows ([`auth::Access`]) to the handler.
pub fn authenticate(
    verifier: Arc<auth::Verifier>,
    subject_rate: Option<Arc<service_kit::per_ip::SubjectRate>>,
    metrics: Arc<crate::metrics::Metrics>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let started = std::time::Instant::now();
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(auth::bearer);
        let access = verifier.verify(token).map_err(|error| {
            tracing::info!(reason = %error, "grpc call refused: UNAUTHENTICATED");
            // The only method behind this interceptor.
            metrics.call(
                GET_TOTAL_SPENT,
                tonic::Code::Unauthenticated,
                started.elapsed(),
            );
            Status::unauthenticated(error.to_string())
        })?;
        let over_rate = match (&subject_rate, access.subject()) {
            (Some(rate), Some(subject)) => !rate.check(subject),
            _ => false,
        };
        if over_rate {
            metrics.call(
                GET_TOTAL_SPENT,
                tonic::Code::ResourceExhausted,
                started.elapsed(),
            );
            return Err(Status::resource_exhausted(
                "too many calls per second for this token's subject; retry later",
            ));
        }
        request.extensions_mut().insert(access);
        Ok(request)
    }
}

#[tonic::async_trait]
impl WalletService for Wallet {
    async fn get_total_spent(
        &self,
        request: Request<GetTotalSpentRequest>,
    ) -> Result<Response<GetTotalSpentResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.total_spent(request).await;
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics.call(GET_TOTAL_SPENT, code, started.elapsed());
        result
    }
}

impl Wallet {
    async fn total_spent(
        &self,
        request: Request<GetTotalSpentRequest>,
    ) -> Result<Response<GetTotalSpentResponse>, Status> {
        // Absent only if the service was mounted without the interceptor: refuse, never allow.
        let allowed = request
            .extensions()
            .get::<auth::Access>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("a bearer token is required"))?;
        let user_id = request.into_inner().user_id;
        let user = UserId::parse(&user_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !allowed.may_read(user.as_str()) {
            return Err(Status::permission_denied(format!(
                "this token may not read the total of user_id {user}"
            )));
        }
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
