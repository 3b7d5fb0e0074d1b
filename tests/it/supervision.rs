//! Every long-lived task of both services is supervised: each one, killed through the services'
//! fault-injection hook (`KillSwitch`), makes the run end with an error naming it (the process
//! exits non-zero: `service_kit::exit_code`) and health go not-ready (the `healthcheck` an
//! orchestrator runs fails). The task list is read from the running service, so a task added
//! later is covered without editing this test.

use std::time::Duration;

use tests::*;

/// Kills `task` of the service started by `start`, and checks what follows.
async fn kill_and_watch<F, Fut, H, HFut>(service: &str, task: &str, start: F, healthcheck: H)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Running>,
    H: Fn(std::net::SocketAddr) -> HFut,
    HFut: Future<Output = Result<(), String>>,
{
    let running = start().await;
    let addr = running.addr;
    healthy(addr, &healthcheck).await;
    assert!(
        running.kill_switch.abort(task),
        "{service}: no task {task:?}"
    );
    let outcome = running.ended(Duration::from_secs(60)).await;
    let error = outcome.expect_err("a killed task must end the run with an error");
    assert!(
        error.contains(task) && error.contains("aborted"),
        "{service}: the error must name the {task}: {error}"
    );
    let unhealthy = healthcheck(addr).await;
    assert!(
        unhealthy.is_err(),
        "{service}: health must not be ready once the {task} is gone"
    );
}

/// Waits until the service's health check passes: every task is running by then.
async fn healthy<H, HFut>(addr: std::net::SocketAddr, healthcheck: &H)
where
    H: Fn(std::net::SocketAddr) -> HFut,
    HFut: Future<Output = Result<(), String>>,
{
    eventually(Duration::from_secs(60), "the service to be healthy", || {
        let check = healthcheck(addr);
        async move { check.await.ok() }
    })
    .await;
}

/// The task names of a service, read from a running instance.
async fn task_names<H, HFut>(running: Running, healthcheck: H) -> Vec<&'static str>
where
    H: Fn(std::net::SocketAddr) -> HFut,
    HFut: Future<Output = Result<(), String>>,
{
    healthy(running.addr, &healthcheck).await;
    let names = running.kill_switch.names();
    running.stop().await;
    names
}

#[tokio::test]
async fn killing_any_websocket_task_fails_the_run_and_turns_health_not_ready() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let start = || start_websocket(websocket_settings(&db.url, &topic));
    let names = task_names(start().await, websocket::healthcheck).await;
    assert_eq!(names, ["commit writer", "http server", "stream relay"]);
    for task in names {
        kill_and_watch("websocket", task, start, websocket::healthcheck).await;
    }
}

#[tokio::test]
async fn killing_any_grpc_kafka_task_fails_the_run_and_turns_health_not_serving() {
    let topic = fresh_topic(1).await;
    let start = || {
        let settings =
            grpc_kafka_settings(&topic, &format!("{}:", unique("prefix")), &unique("group"));
        start_grpc_kafka(settings)
    };
    let names = task_names(start().await, grpc_kafka::healthcheck).await;
    assert_eq!(
        names,
        [
            "aggregator",
            "grpc server",
            "metrics server",
            "redis follower"
        ]
    );
    for task in names {
        kill_and_watch("grpc_kafka", task, start, grpc_kafka::healthcheck).await;
    }
}
