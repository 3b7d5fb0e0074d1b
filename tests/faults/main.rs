//! The fault-injection suite: a steady stream of purchases from several retrying clients while one
//! component at a time is killed, stopped, wiped or replicated. After each scenario, once idle,
//! it prints one line of figures and checks that nothing acked was lost and nothing was counted
//! twice:
//! - every acked purchase is in PostgreSQL exactly once, and every sent purchase was acked;
//! - every PostgreSQL purchase is on the topic;
//! - per user, gRPC `total_cents` = `SUM(amount_cents)` and `purchase_count` = `COUNT(*)`.
//!
//! Scenarios stop and start the shared native stack's PostgreSQL, Redis and Kafka (through
//! `scripts/stack.sh`, by pid), so they run one at a time ([`SERIAL`]) and in their own test
//! binary, after the other tests. Each has its own database, topic, consumer group and key prefix.
//! Everything targets 127.0.0.1 and stops by itself (bounded purchases, deadlines everywhere).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use purchase::{ErrorCode, Reply};
use rand::Rng;
use tests::*;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// Scenarios share the stack's PostgreSQL, Redis and Kafka and take them down: one at a time,
/// whatever the test runner's thread count. (Async-aware: each test has its own runtime.)
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CLIENTS: usize = 6;
/// Each client sends at most one purchase per PACE: a steady stream, not a flood.
const PACE: Duration = Duration::from_millis(10);
const BACKOFF: Duration = Duration::from_millis(100);
/// Acks before the first fault, and after the last recovery before the stream stops.
const WARMUP: usize = 300;
const USERS: usize = 20;
const SCENARIO_DEADLINE: Duration = Duration::from_secs(240);

// ------------------------------------------------------------------------------------ the stack

fn stack(action: &str, service: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = std::process::Command::new(root.join("scripts/stack.sh"))
        .args([action, service])
        .status()
        .expect("run scripts/stack.sh");
    assert!(
        status.success(),
        "scripts/stack.sh {action} {service} failed"
    );
}

// ------------------------------------------------------------------------------------ services

/// One service binary with a fixed environment (so a restart binds the same port).
struct Service {
    name: &'static str,
    env: Vec<(&'static str, String)>,
    addr: SocketAddr,
    process: Option<Process>,
}

impl Service {
    fn websocket(db: &TestDb, topic: &str) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        Self {
            name: "websocket",
            env: vec![
                ("DATABASE_URL", db.url.clone()),
                ("KAFKA_BROKERS", Env::get().kafka_brokers),
                ("WEBSOCKET_ADDR", addr.to_string()),
                ("KAFKA_TOPIC", topic.to_owned()),
                ("DATABASE_TIMEOUT_MS", "1000".to_owned()),
                ("KAFKA_MESSAGE_TIMEOUT_MS", "5000".to_owned()),
            ],
            addr,
            process: None,
        }
    }

    fn grpc_kafka(topic: &str, prefix: &str, group: &str) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        Self {
            name: "grpc_kafka",
            env: vec![
                ("KAFKA_BROKERS", Env::get().kafka_brokers),
                ("REDIS_URL", Env::get().redis_url),
                ("GRPC_ADDR", addr.to_string()),
                ("KAFKA_TOPIC", topic.to_owned()),
                ("KAFKA_GROUP_ID", group.to_owned()),
                ("REDIS_KEY_PREFIX", prefix.to_owned()),
                ("REDIS_TIMEOUT_MS", "500".to_owned()),
            ],
            addr,
            process: None,
        }
    }

    async fn start(&mut self) {
        self.process = Some(Process::spawn(self.name, &self.env));
        let (name, addr) = (self.name, self.addr);
        eventually(
            Duration::from_secs(60),
            "the service to be healthy",
            || async move {
                match name {
                    "websocket" => websocket::healthcheck(addr).await.ok(),
                    _ => grpc_kafka::healthcheck(addr).await.ok(),
                }
            },
        )
        .await;
    }

    async fn kill9(&mut self) {
        let mut process = self.process.take().expect("running");
        process.signal("KILL");
        let _ = process.child.wait().await;
    }

    async fn sigterm(&mut self) {
        let process = self.process.take().expect("running");
        let status = process.terminate().await;
        assert!(
            status.success(),
            "{} exit status after SIGTERM: {status}",
            self.name
        );
    }
}

// ------------------------------------------------------------------------------------ clients

#[derive(Clone)]
struct Purchase {
    id: Uuid,
    user: String,
    cents: i64,
    frame: String,
}

fn purchase() -> Purchase {
    let mut rng = rand::rng();
    let id = Uuid::new_v4();
    let user = format!("user-{}", rng.random_range(0..USERS));
    let cents: i64 = rng.random_range(1..=99_999);
    let frame = format!(
        r#"{{"user_id":"{user}","amount":"{}.{:02}","purchase_id":"{id}"}}"#,
        cents / 100,
        cents % 100
    );
    Purchase {
        id,
        user,
        cents,
        frame,
    }
}

#[derive(Default)]
struct ClientReport {
    sent: Vec<Purchase>,
    acked: Vec<Uuid>,
    retries: usize,
    close_codes: Vec<u16>,
}

/// Acks and retries of all clients, and the signal that ends the stream.
#[derive(Default)]
struct Counters {
    acked: AtomicUsize,
    retries: AtomicUsize,
    stop: std::sync::atomic::AtomicBool,
}

enum Attempt {
    Acked,
    Retry,
}

/// A good client: one purchase at a time, a new one every [`PACE`] until the stream stops; on
/// `unavailable`, a timeout or a dropped connection it reconnects (to the next address) and resends
/// the same purchase until it is acked.
async fn client(addrs: Vec<SocketAddr>, counters: Arc<Counters>) -> ClientReport {
    let mut report = ClientReport::default();
    let mut socket: Option<Socket> = None;
    let mut next_addr = 0;
    let deadline = tokio::time::Instant::now() + SCENARIO_DEADLINE;
    let mut pace = tokio::time::interval(PACE);
    while !counters.stop.load(Ordering::SeqCst) {
        pace.tick().await;
        let purchase = purchase();
        report.sent.push(purchase.clone());
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "purchase {} not acked before the deadline",
                purchase.id
            );
            let attempt = match socket.as_mut() {
                None => {
                    let addr = addrs[next_addr % addrs.len()];
                    next_addr += 1;
                    let connect = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"));
                    match tokio::time::timeout(Duration::from_secs(2), connect).await {
                        Ok(Ok((ws, _))) => socket = Some(ws),
                        _ => tokio::time::sleep(BACKOFF).await,
                    }
                    continue;
                }
                Some(ws) => send_once(ws, &purchase, &mut report).await,
            };
            match attempt {
                Some(Attempt::Acked) => {
                    report.acked.push(purchase.id);
                    counters.acked.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                Some(Attempt::Retry) => {
                    // `unavailable`: the connection is fine, the server asks for a retry.
                    tokio::time::sleep(BACKOFF).await;
                }
                None => socket = None,
            }
            report.retries += 1;
            counters.retries.fetch_add(1, Ordering::SeqCst);
        }
    }
    if let Some(mut ws) = socket {
        let _ = ws.close(None).await;
    }
    report
}

/// Sends one frame and reads its reply: `None` when the connection is unusable (closed, failed,
/// silent for 5 s).
async fn send_once(
    ws: &mut Socket,
    purchase: &Purchase,
    report: &mut ClientReport,
) -> Option<Attempt> {
    ws.send(Message::text(purchase.frame.clone())).await.ok()?;
    let reply = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text.to_string()),
                Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(None),
            }
        }
    })
    .await
    .ok()?;
    let text = match reply {
        Ok(text) => text,
        Err(close_code) => {
            report.close_codes.extend(close_code);
            return None;
        }
    };
    match serde_json::from_str::<Reply>(&text).expect("reply") {
        Reply::Ack {
            purchase_id,
            user_id,
            amount,
        } => {
            assert_eq!(purchase_id, purchase.id);
            assert_eq!(user_id, purchase.user);
            assert_eq!(
                amount,
                format!("{}.{:02}", purchase.cents / 100, purchase.cents % 100)
            );
            Some(Attempt::Acked)
        }
        Reply::Error {
            code: ErrorCode::Unavailable,
            purchase_id,
            ..
        } => {
            assert_eq!(
                purchase_id,
                Some(purchase.id),
                "unavailable names the purchase to retry"
            );
            Some(Attempt::Retry)
        }
        other => panic!("unexpected reply to a valid purchase: {other:?}"),
    }
}

/// A steady stream of purchases from [`CLIENTS`] clients over the given WebSocket addresses.
struct Stream {
    counters: Arc<Counters>,
    tasks: Vec<tokio::task::JoinHandle<ClientReport>>,
}

impl Stream {
    fn start(addrs: &[SocketAddr]) -> Self {
        let counters = Arc::new(Counters::default());
        let tasks = (0..CLIENTS)
            .map(|_| tokio::spawn(client(addrs.to_vec(), counters.clone())))
            .collect();
        Self { counters, tasks }
    }

    fn acked(&self) -> usize {
        self.counters.acked.load(Ordering::SeqCst)
    }

    fn retries(&self) -> usize {
        self.counters.retries.load(Ordering::SeqCst)
    }

    /// Waits until `more` purchases have been acked from now: the next fault then hits mid-stream.
    async fn until_acked(&self, more: usize) {
        let target = self.acked() + more;
        eventually(SCENARIO_DEADLINE, "the stream to progress", || async {
            (self.acked() >= target).then_some(())
        })
        .await;
    }

    /// Waits until the clients have retried `more` times from now.
    async fn until_retried(&self, more: usize) {
        let target = self.retries() + more;
        eventually(SCENARIO_DEADLINE, "clients to retry", || async {
            (self.retries() >= target).then_some(())
        })
        .await;
    }

    /// Lets the stream run on for `more` acks, then stops it; every purchase sent is acked by then.
    async fn finish(self, more: usize) -> ClientReport {
        self.until_acked(more).await;
        self.counters.stop.store(true, Ordering::SeqCst);
        let mut total = ClientReport::default();
        for task in self.tasks {
            let report = task.await.expect("client task");
            total.sent.extend(report.sent);
            total.acked.extend(report.acked);
            total.retries += report.retries;
            total.close_codes.extend(report.close_codes);
        }
        total
    }
}

/// A dependency taken down by a scenario; started again when dropped, also if the scenario fails,
/// so one failure does not take the next scenarios down with it.
struct Outage {
    service: &'static str,
    restored: bool,
}

impl Outage {
    fn new(action: &str, service: &'static str) -> Self {
        stack(action, service);
        Self {
            service,
            restored: false,
        }
    }

    fn restore(mut self) {
        stack("start", self.service);
        self.restored = true;
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if !self.restored {
            stack("start", self.service);
        }
    }
}

// ------------------------------------------------------------------------------------ the check

struct Scenario {
    name: &'static str,
    db: TestDb,
    topic: String,
    prefix: String,
    group: String,
}

impl Scenario {
    async fn new(name: &'static str) -> Self {
        Self {
            name,
            db: fresh_database().await,
            topic: fresh_topic(4).await,
            prefix: format!("{}:", unique("faults")),
            group: unique("group"),
        }
    }

    fn websocket(&self) -> Service {
        Service::websocket(&self.db, &self.topic)
    }

    fn grpc_kafka(&self) -> Service {
        Service::grpc_kafka(&self.topic, &self.prefix, &self.group)
    }

    /// Once idle: prints the figures and asserts nothing was lost or counted twice.
    async fn verify(&self, report: &ClientReport, grpc: SocketAddr) {
        let sent = &report.sent;
        let mut expected: HashMap<String, (i64, i64)> = HashMap::new();
        for purchase in sent {
            let entry = expected.entry(purchase.user.clone()).or_default();
            entry.0 += purchase.cents;
            entry.1 += 1;
        }
        let acked: HashSet<Uuid> = report.acked.iter().copied().collect();
        let rows = self.db.purchases().await;
        // Idle: the outbox is drained and every event counted.
        eventually(Duration::from_secs(120), "the outbox to drain", || async {
            (self.db.count("SELECT COUNT(*) FROM purchase_outbox").await == 0).then_some(())
        })
        .await;
        let counted = eventually(
            Duration::from_secs(120),
            "redis to count every purchase",
            || {
                let expected = &expected;
                async move {
                    let mut client = grpc_client(grpc).await;
                    let mut counted = 0u64;
                    for user in expected.keys() {
                        counted += grpc_total(&mut client, user).await.ok()?.1;
                    }
                    (counted >= sent.len() as u64).then_some(counted)
                }
            },
        )
        .await;
        let records = topic_records(&self.topic);
        let on_topic: HashSet<Uuid> = records.iter().map(|(_, e)| e.purchase_id).collect();
        let pg_totals = self.db.totals().await;
        let mut client = grpc_client(grpc).await;
        let mut equal_users = 0;
        for (user, (cents, count)) in &pg_totals {
            let got = grpc_total(&mut client, user).await.expect("grpc total");
            if got == (*cents, *count as u64) {
                equal_users += 1;
            }
        }
        // On a line of its own: the test runner prints "test NAME ... " before it.
        println!(
            "\nscenario {:<22} sent {:>5}  acked {:>5}  postgres {:>5}  topic {:>5} distinct ({} records)  redis {:>5} counted  users equal {}/{}  client retries {}",
            self.name,
            sent.len(),
            acked.len(),
            rows.len(),
            on_topic.len(),
            records.len(),
            counted,
            equal_users,
            pg_totals.len(),
            report.retries,
        );
        assert_eq!(
            report.acked.len(),
            acked.len(),
            "an ack arrived twice for one purchase"
        );
        assert_eq!(
            acked.len(),
            sent.len(),
            "every purchase was acked (clients retry until acked)"
        );
        assert!(
            acked.iter().all(|id| rows.contains_key(id)),
            "an acked purchase is missing in PostgreSQL"
        );
        assert_eq!(
            rows.len(),
            sent.len(),
            "PostgreSQL holds exactly the sent purchases"
        );
        assert!(
            rows.keys().all(|id| on_topic.contains(id)),
            "a PostgreSQL purchase is missing on the topic"
        );
        assert_eq!(pg_totals, expected, "PostgreSQL sums per user");
        assert_eq!(
            equal_users,
            pg_totals.len(),
            "gRPC totals equal PostgreSQL per user"
        );
        assert_eq!(
            counted,
            sent.len() as u64,
            "redis counted each purchase exactly once"
        );
    }
}

// ------------------------------------------------------------------------------------ scenarios

/// One websocket and one grpc_kafka, started.
async fn single(scenario: &Scenario) -> (Service, Service) {
    let (mut ws, mut grpc) = (scenario.websocket(), scenario.grpc_kafka());
    ws.start().await;
    grpc.start().await;
    (ws, grpc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_websocket_mid_stream() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new("kill9-websocket").await;
    let (mut ws, grpc) = single(&scenario).await;
    let stream = Stream::start(&[ws.addr]);
    stream.until_acked(WARMUP).await;
    ws.kill9().await;
    ws.start().await;
    let report = stream.finish(WARMUP).await;
    scenario.verify(&report, grpc.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_grpc_kafka_mid_stream() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new("kill9-grpc_kafka").await;
    let (ws, mut grpc) = single(&scenario).await;
    let stream = Stream::start(&[ws.addr]);
    // Three times, while batches flow steadily: some kills land mid-batch.
    for _ in 0..3 {
        stream.until_acked(WARMUP).await;
        grpc.kill9().await;
        grpc.start().await;
    }
    let report = stream.finish(WARMUP).await;
    scenario.verify(&report, grpc.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_kafka_broker_mid_stream() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new("kill9-kafka").await;
    let (ws, grpc) = single(&scenario).await;
    let stream = Stream::start(&[ws.addr]);
    stream.until_acked(WARMUP).await;
    let outage = Outage::new("kill9", "kafka");
    // The websocket service keeps acking while the broker is down.
    stream.until_acked(WARMUP).await;
    outage.restore();
    let report = stream.finish(WARMUP).await;
    scenario.verify(&report, grpc.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_stopped_for_30_seconds() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new("kafka-down-30s").await;
    let (ws, grpc) = single(&scenario).await;
    let stream = Stream::start(&[ws.addr]);
    stream.until_acked(WARMUP).await;
    let outage = Outage::new("stop", "kafka");
    let before = stream.acked();
    // The outage lasts 30 s by design; clients keep sending throughout.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        stream.acked() >= before + WARMUP,
        "acks continued while Kafka was stopped"
    );
    outage.restore();
    let report = stream.finish(WARMUP).await;
    scenario.verify(&report, grpc.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_redis_and_restart_from_aof() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new("kill9-redis").await;
    let (ws, grpc) = single(&scenario).await;
    let stream = Stream::start(&[ws.addr]);
    stream.until_acked(WARMUP).await;
    Outage::new("kill9", "redis").restore();
    let report = stream.finish(WARMUP).await;
    scenario.verify(&report, grpc.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wiped_completely_is_rebuilt() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new("flushall-redis").await;
    let (ws, grpc) = single(&scenario).await;
    let stream = Stream::start(&[ws.addr]);
    stream.until_acked(WARMUP).await;
    let mut conn = redis_connection().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("FLUSHALL");
    let report = stream.finish(WARMUP).await;
    scenario.verify(&report, grpc.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fast_stop_and_restart() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new("postgres-fast-stop").await;
    let (ws, grpc) = single(&scenario).await;
    let stream = Stream::start(&[ws.addr]);
    stream.until_acked(WARMUP).await;
    let outage = Outage::new("stop", "postgres");
    // While it is down, clients get `unavailable` (or lose their connection) and nothing is acked.
    // (Enough retries first that every reply already on its way has arrived.)
    stream.until_retried(3 * CLIENTS).await;
    let during = stream.acked();
    stream.until_retried(3 * CLIENTS).await;
    assert_eq!(stream.acked(), during, "no ack while PostgreSQL is down");
    outage.restore();
    // The services recover by themselves: no restart.
    let report = stream.finish(WARMUP).await;
    scenario.verify(&report, grpc.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_each_one_grpc_kafka_killed() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new("replicas-kill9-grpc").await;
    let (mut ws1, mut ws2) = (scenario.websocket(), scenario.websocket());
    let (mut grpc1, mut grpc2) = (scenario.grpc_kafka(), scenario.grpc_kafka());
    for service in [&mut ws1, &mut ws2, &mut grpc1, &mut grpc2] {
        service.start().await;
    }
    let stream = Stream::start(&[ws1.addr, ws2.addr]);
    stream.until_acked(WARMUP).await;
    // Its partitions move to the other replica, which reads the offsets stored in Redis.
    grpc1.kill9().await;
    let report = stream.finish(WARMUP).await;
    scenario.verify(&report, grpc2.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_each_service_mid_stream() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new("sigterm").await;
    let (mut ws, mut grpc) = single(&scenario).await;
    let stream = Stream::start(&[ws.addr]);
    stream.until_acked(WARMUP).await;
    ws.sigterm().await;
    ws.start().await;
    stream.until_acked(WARMUP).await;
    grpc.sigterm().await;
    grpc.start().await;
    let report = stream.finish(WARMUP).await;
    assert!(
        report.close_codes.iter().all(|code| *code == 1001),
        "only 1001 closes on SIGTERM: {:?}",
        report.close_codes
    );
    scenario.verify(&report, grpc.addr).await;
}
