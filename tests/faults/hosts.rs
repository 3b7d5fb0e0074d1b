//! Hosts of their own (issue 21): every component on a network namespace of its own, with its own
//! address, and links between them cut and healed while purchases stream.
//!
//! [`Hosts::up`] makes a bridge in the test's namespace (10.211.0.1, the test's own address there)
//! and one namespace per host, each joined to the bridge by a veth pair (`ip netns`, `ip link`).
//! PostgreSQL, a Kafka broker and a Redis Cluster of three masters and three replicas (a node per
//! host) are started inside theirs by `scripts/stack.sh` (its `STACK_HOST` names the address), under
//! `.stack-test/hosts/`; the services run inside theirs by `ip netns exec`. Everything stays on
//! this machine: the subnet exists only on the bridge, and [`Hosts`] removes it all when dropped
//! (and any leftovers of an earlier run when made).
//!
//! A cut is a real partition, silent both ways: each side's neighbour entry for the other is set
//! to a hardware address nobody has, so their packets are dropped on the bridge: connections stall
//! and time out, new ones get no answer. Healing deletes the two entries.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;

use super::*;

const BRIDGE: &str = "wallet-br0";
/// The hardware address of a cut: no interface has it.
const NOWHERE: &str = "02:00:00:00:00:01";
/// The hosts and the last byte of each one's address in 10.211.0.0/24.
const HOSTS: [(&str, u8); 12] = [
    ("pg", 10),
    ("kafka", 11),
    ("redis1", 21),
    ("redis2", 22),
    ("redis3", 23),
    ("redis4", 24),
    ("redis5", 25),
    ("redis6", 26),
    ("ws1", 31),
    ("grpc1", 41),
    ("grpc2", 42),
    ("grpc3", 43),
];
/// The test's own address on the bridge.
const TEST: &str = "test";
const PG_PORT: u16 = 5432;
const KAFKA_PORT: u16 = 9092;
/// Redis Cluster node N (1 to 6) listens on this + N, on host `redisN`.
const REDIS_BASE: u16 = 7000;
/// What a grpc_kafka cut from Redis waits before it hands its partitions over.
const HANDOVER_MS: &str = "3000";
/// Where a grpc_kafka serves `/metrics`, on its host's address.
const METRICS_PORT: u16 = 9464;

fn addr(host: &str) -> Ipv4Addr {
    if host == TEST {
        return Ipv4Addr::new(10, 211, 0, 1);
    }
    let (_, last) = HOSTS
        .iter()
        .find(|(name, _)| *name == host)
        .unwrap_or_else(|| panic!("no host {host}"));
    Ipv4Addr::new(10, 211, 0, *last)
}

fn netns(host: &str) -> String {
    format!("wallet-{host}")
}

/// `ip ARGS...`, which must succeed.
fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        output.status.success(),
        "ip {} failed: {} (the hosts scenarios make network namespaces: they run as root)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

fn ip_output(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().expect("run ip");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The namespaces, the bridge and the dependencies on them; removed when dropped.
pub(crate) struct Hosts {
    /// `STACK_DIR` of the hosts' dependencies.
    dir: PathBuf,
}

impl Hosts {
    pub(crate) async fn up() -> Self {
        // Refuses to run outside the test stack, as every scenario does.
        stack_command();
        let test_stack = PathBuf::from(std::env::var("STACK_DIR").expect("STACK_DIR"));
        let hosts = Self {
            dir: test_stack.join("hosts"),
        };
        hosts.remove();
        let _ = std::fs::remove_dir_all(&hosts.dir);
        let routes = ip_output(&["-4", "route", "show"]);
        assert!(
            !routes.contains("10.211.0."),
            "10.211.0.0/24 is routed on this machine already: {routes}"
        );
        ip(&["link", "add", BRIDGE, "type", "bridge"]);
        ip(&["addr", "add", "10.211.0.1/24", "dev", BRIDGE]);
        ip(&["link", "set", BRIDGE, "up"]);
        for (host, _) in HOSTS {
            let (ns, link) = (netns(host), format!("wv-{host}"));
            let cidr = format!("{}/24", addr(host));
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &link, "master", BRIDGE, "up"]);
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        // Kafka's jars: the test stack's, resolved already.
        std::fs::create_dir_all(hosts.dir.join("kafka")).expect("hosts folder");
        std::os::unix::fs::symlink(test_stack.join("kafka/libs"), hosts.dir.join("kafka/libs"))
            .expect("link Kafka's jars");
        hosts.stack("pg", &[("STACK_PG_PORT", PG_PORT)], &["start", "postgres"]);
        hosts.stack(
            "kafka",
            &[
                ("STACK_KAFKA_PORT", KAFKA_PORT),
                ("STACK_KAFKA_CONTROLLER_PORT", KAFKA_PORT + 1),
            ],
            &["start", "kafka"],
        );
        let mut nodes = Vec::new();
        for node in 1..=6u16 {
            hosts.stack(
                &format!("redis{node}"),
                &[("STACK_REDIS_CLUSTER_PORT", REDIS_BASE)],
                &["redis-cluster", "start", &node.to_string()],
            );
            nodes.push(Self::redis_node(node).to_string());
        }
        let mut create = vec!["create"];
        create.extend(nodes.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        redis_cli_cluster(&create).await;
        hosts.healthy_cluster().await;
        hosts
    }

    /// `scripts/stack.sh ARGS...` in `host`'s namespace, its dependencies on `host`'s address.
    fn stack(&self, host: &str, ports: &[(&str, u16)], args: &[&str]) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new("ip")
            .args(["netns", "exec", &netns(host)])
            .arg(root.join("scripts/stack.sh"))
            .args(args)
            .env("STACK_DIR", &self.dir)
            .env("STACK_HOST", addr(host).to_string())
            .envs(ports.iter().map(|(name, port)| (name, port.to_string())))
            .status()
            .expect("run scripts/stack.sh");
        assert!(
            status.success(),
            "scripts/stack.sh {} on host {host} failed",
            args.join(" ")
        );
    }

    /// Stops what runs on the hosts and removes the namespaces and the bridge.
    fn remove(&self) {
        if self.dir.exists() {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let _ = Command::new(root.join("scripts/stack.sh"))
                .arg("down")
                .env("STACK_DIR", &self.dir)
                .stderr(std::process::Stdio::null())
                .status();
        }
        for (host, _) in HOSTS {
            // The veth pair first: a deleted namespace frees its devices only later, and the next
            // scenario makes the same names at once.
            for args in [
                ["link", "del", &format!("wv-{host}")],
                ["netns", "del", &netns(host)],
            ] {
                let _ = Command::new("ip")
                    .args(args)
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", BRIDGE])
            .stderr(std::process::Stdio::null())
            .status();
    }

    fn redis_node(node: u16) -> SocketAddr {
        SocketAddr::new(addr(&format!("redis{node}")).into(), REDIS_BASE + node)
    }

    fn admin_database_url() -> String {
        format!("postgres://postgres@{}:{PG_PORT}/postgres", addr("pg"))
    }

    fn kafka_brokers() -> String {
        format!("{}:{KAFKA_PORT}", addr("kafka"))
    }

    fn redis_cluster_url() -> String {
        let seeds: Vec<String> = (1..=6).map(|n| Self::redis_node(n).to_string()).collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The hosts' cluster as its nodes describe it, once it is ready for a scenario
    /// ([`healthy_cluster_on`]).
    async fn healthy_cluster(&self) -> ClusterNodes {
        let nodes: Vec<SocketAddr> = (1..=6).map(Self::redis_node).collect();
        healthy_cluster_on(&nodes, REDIS_BASE).await
    }

    /// Sets (or, healing, deletes) `on`'s neighbour entry for `of`.
    fn neighbour(on: &str, of: &str, cut: bool) {
        let ns = netns(on);
        let of = addr(of).to_string();
        let mut args: Vec<&str> = Vec::new();
        if on != TEST {
            args.extend(["-n", &ns]);
        }
        let dev = if on == TEST { BRIDGE } else { "eth0" };
        if cut {
            args.extend([
                "neigh",
                "replace",
                &of,
                "lladdr",
                NOWHERE,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        } else {
            args.extend(["neigh", "del", &of, "dev", dev]);
        }
        ip(&args);
    }

    /// Cuts the link between hosts `a` and `b`, both ways.
    pub(crate) fn cut(&self, a: &str, b: &str) {
        Self::neighbour(a, b, true);
        Self::neighbour(b, a, true);
    }

    pub(crate) fn heal(&self, a: &str, b: &str) {
        Self::neighbour(a, b, false);
        Self::neighbour(b, a, false);
    }

    /// Every host but `host`, and the test.
    fn others(host: &str) -> impl Iterator<Item = &'static str> + '_ {
        HOSTS
            .iter()
            .map(|(name, _)| *name)
            .chain([TEST])
            .filter(move |name| *name != host)
    }

    /// A scenario of the hosts: its database on their PostgreSQL, its topic on their Kafka, its
    /// totals in their Redis Cluster.
    pub(crate) async fn scenario(&self, name: &'static str) -> Scenario {
        let kafka = Kafka {
            brokers: Self::kafka_brokers(),
            replication: 1,
            min_insync: 1,
        };
        let db = fresh_database_on(&Self::admin_database_url()).await;
        Scenario::build(
            name,
            kafka,
            4,
            Store::RedisCluster,
            db,
            Self::redis_cluster_url(),
        )
        .await
    }

    pub(crate) fn websocket(&self, scenario: &Scenario, host: &str) -> ServiceProcess {
        scenario
            .websocket()
            .in_netns(&netns(host), IpAddr::V4(addr(host)))
    }

    pub(crate) fn grpc_kafka(&self, scenario: &Scenario, host: &str) -> ServiceProcess {
        let mut service = scenario.grpc_kafka();
        service.env.extend([
            ("REDIS_HANDOVER_AFTER_MS", HANDOVER_MS.to_owned()),
            ("METRICS_ADDR", format!("{}:{METRICS_PORT}", addr(host))),
        ]);
        service.in_netns(&netns(host), IpAddr::V4(addr(host)))
    }

    /// What the grpc_kafka on `host` has counted so far (`grpc_kafka_events_applied_total`).
    async fn applied(host: &str) -> f64 {
        let metrics = SocketAddr::new(IpAddr::V4(addr(host)), METRICS_PORT);
        sample(
            &scrape(metrics).await,
            "grpc_kafka_events_applied_total",
            &[],
        )
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.remove();
    }
}

/// One grpc_kafka replica cut from every Redis node: it stops counting and hands its partitions
/// over (it leaves the group after `REDIS_HANDOVER_AFTER_MS`), the other replica counts them
/// meanwhile; after the link heals it joins again and counts nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_kafka_replica_cut_from_redis_hands_its_partitions_over() {
    let _serial = SERIAL.lock().await;
    let hosts = Hosts::up().await;
    let scenario = hosts.scenario("hosts-grpc-from-redis").await;
    let mut ws = hosts.websocket(&scenario, "ws1");
    let (mut grpc1, mut grpc2) = (
        hosts.grpc_kafka(&scenario, "grpc1"),
        hosts.grpc_kafka(&scenario, "grpc2"),
    );
    for service in [&mut ws, &mut grpc1, &mut grpc2] {
        service.start().await;
    }
    let stream = Stream::start(&[ws.addr]);
    stream.until_acked(WARMUP).await;
    // Both replicas count now: the group's first rebalances are over and grpc1 holds partitions.
    let (one, two) = (Hosts::applied("grpc1").await, Hosts::applied("grpc2").await);
    eventually(SCENARIO_DEADLINE, "both replicas counting", || async {
        (Hosts::applied("grpc1").await > one && Hosts::applied("grpc2").await > two).then_some(())
    })
    .await;
    for node in 1..=6 {
        hosts.cut("grpc1", &format!("redis{node}"));
    }
    // The stream goes on and ends while grpc1 is cut off: grpc2 alone must count every purchase,
    // which it can only once grpc1 has handed its partitions over.
    let report = stream.finish(WARMUP).await;
    scenario.verify(&report, grpc2.addr).await;
    for node in 1..=6 {
        hosts.heal("grpc1", &format!("redis{node}"));
    }
    // Healed: grpc1 joins again and counts (its partitions resumed from the marks), nothing twice.
    let stream = Stream::start(&[ws.addr]);
    let before = Hosts::applied("grpc1").await;
    eventually(SCENARIO_DEADLINE, "grpc1 counting again", || async {
        (Hosts::applied("grpc1").await > before).then_some(())
    })
    .await;
    let mut report_after = stream.finish(WARMUP).await;
    report_after.add(report);
    scenario.verify(&report_after, grpc1.addr).await;
}

/// The hosts up, with one websocket on ws1 and one grpc_kafka on grpc1 started and a stream of
/// purchases acked past its warm-up. (Dropped in reverse: the stream, the services, the hosts.)
async fn streaming(
    name: &'static str,
) -> (Hosts, Scenario, ServiceProcess, ServiceProcess, Stream) {
    let hosts = Hosts::up().await;
    let scenario = hosts.scenario(name).await;
    let mut ws = hosts.websocket(&scenario, "ws1");
    let mut grpc = hosts.grpc_kafka(&scenario, "grpc1");
    ws.start().await;
    grpc.start().await;
    let stream = Stream::start(&[ws.addr]);
    stream.until_acked(WARMUP).await;
    (hosts, scenario, ws, grpc, stream)
}

/// The websocket cut from PostgreSQL: it answers `unavailable` and acks nothing meanwhile, and
/// recovers by itself once the link heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_cut_from_postgres_answers_unavailable_and_recovers() {
    let _serial = SERIAL.lock().await;
    let (hosts, scenario, _ws, grpc, stream) = streaming("hosts-ws-from-postgres").await;
    hosts.cut("ws1", "pg");
    stream.until_unavailable(CLIENTS).await;
    let during = stream.acked();
    stream.until_retried(3 * CLIENTS).await;
    assert_eq!(stream.acked(), during, "no ack while cut from PostgreSQL");
    hosts.heal("ws1", "pg");
    let report = stream.finish(WARMUP).await;
    scenario.verify(&report, grpc.addr).await;
}

/// The websocket cut from Kafka: purchases are still acked (they are in PostgreSQL), and the
/// stream relay publishes them all once the link heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_cut_from_kafka_acks_on_and_its_relay_catches_up() {
    let _serial = SERIAL.lock().await;
    let (hosts, scenario, _ws, grpc, stream) = streaming("hosts-ws-from-kafka").await;
    hosts.cut("ws1", "kafka");
    // What reached the broker before the cut is on the topic; from then on nothing is published,
    // while purchases are still acked (for seconds: past the producer's message timeout).
    stream.until_acked(WARMUP).await;
    let published = topic_records_on(&scenario.kafka.brokers, &scenario.topic).len();
    stream.until_acked(10 * WARMUP).await;
    assert_eq!(
        topic_records_on(&scenario.kafka.brokers, &scenario.topic).len(),
        published,
        "nothing is published while the websocket is cut from Kafka"
    );
    hosts.heal("ws1", "kafka");
    let report = stream.finish(WARMUP).await;
    scenario.verify(&report, grpc.addr).await;
}

/// The Redis master holding partition 0's slot cut from every other host: its replica is
/// promoted, counting goes on there; after the link heals the old master rejoins as a replica.
/// Totals exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_master_cut_from_the_rest_fails_over() {
    let _serial = SERIAL.lock().await;
    let (hosts, scenario, _ws, grpc, stream) = streaming("hosts-redis-master-cut").await;
    let slot = marks_slot(&scenario, 0).await;
    let (_, node) = hosts
        .healthy_cluster()
        .await
        .master_of(slot)
        .expect("a master serves partition 0's slot");
    let cut_off = format!("redis{node}");
    for other in Hosts::others(&cut_off) {
        hosts.cut(&cut_off, other);
    }
    let promoted = eventually(
        SCENARIO_DEADLINE,
        "a replica promoted for the slot",
        || async {
            let nodes = (1..=6)
                .filter(|n| *n != node)
                .map(Hosts::redis_node)
                .collect::<Vec<_>>();
            let (_, serving) = cluster_nodes_on(&nodes, REDIS_BASE).await.master_of(slot)?;
            (serving != node).then_some(serving)
        },
    )
    .await;
    stream.until_acked(WARMUP).await;
    for other in Hosts::others(&cut_off) {
        hosts.heal(&cut_off, other);
    }
    let report = stream.finish(WARMUP).await;
    scenario.verify(&report, grpc.addr).await;
    println!("partition 0's slot {slot}: master node {node} cut off, node {promoted} promoted");
}
