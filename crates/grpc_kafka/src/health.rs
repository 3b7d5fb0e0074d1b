//! Health: the gRPC health service's status, following Redis while the service runs; the stall
//! detector over the aggregator's heartbeat; and the `healthcheck` command (what an
//! orchestrator runs).
//!
//! SERVING while Redis answers, takes writes and does not evict; NOT_SERVING while it does not
//! (back to SERVING by itself). Once the service stops, or any of its long-lived tasks ends, it is
//! NOT_SERVING for good.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::{aggregator, totals};

/// Both the overall service ("") and the wallet service: a probe of either sees it.
pub async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for service in ["", "wallet.v1.WalletService"] {
        reporter.set_service_status(service, status).await;
    }
}

/// How often readiness asks Redis, and how long it waits for the answer.
const READINESS_PERIOD: Duration = Duration::from_secs(1);

/// Health follows Redis: NOT_SERVING while it does not answer within the period, refuses writes
/// (read-only replica, out of memory, MISCONF) or has an evicting `maxmemory-policy`; SERVING
/// again once all is well. Each change is logged with its cause. Runs until `stop`.
pub async fn follow_redis(
    totals: totals::Totals,
    reporter: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    let mut serving = true;
    loop {
        let problem = match tokio::time::timeout(READINESS_PERIOD, totals.ready()).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!("no answer within {READINESS_PERIOD:?}")),
        };
        if problem.is_none() != serving {
            serving = problem.is_none();
            if stop.is_cancelled() {
                return;
            }
            match problem {
                None => {
                    tracing::info!("redis is usable again: SERVING");
                    set_health(&reporter, ServingStatus::Serving).await;
                }
                Some(problem) => {
                    tracing::error!(%problem, "redis is not usable: NOT_SERVING");
                    set_health(&reporter, ServingStatus::NotServing).await;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(READINESS_PERIOD) => {}
        }
    }
}

/// Resolves once the aggregator's heartbeat has been silent for `limit`.
pub async fn stalled(heartbeat: &aggregator::Heartbeat, limit: Duration) {
    let period = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::time::sleep(period).await;
        if heartbeat.silent_for() >= limit {
            return;
        }
    }
}

/// Asks the gRPC health service at `addr` (an unspecified address means this host) whether the
/// wallet service is SERVING.
pub async fn healthcheck(addr: SocketAddr) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let target = service_kit::this_host(addr);
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
            .map_err(|e| format!("bad address {target}: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("cannot reach {target}: {e}"))?;
        let mut client = HealthClient::new(channel);
        let response = client
            .check(HealthCheckRequest {
                service: "wallet.v1.WalletService".to_owned(),
            })
            .await
            .map_err(|e| format!("health check failed: {}", e.message()))?;
        match response.into_inner().status() {
            ServingStatus::Serving => Ok(()),
            other => Err(format!("status {other:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(3), check)
        .await
        .map_err(|_| format!("no answer from {target} within 3s"))?
}
