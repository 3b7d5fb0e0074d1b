//! The Redis key schema of the per-user totals, defined once. grpc_kafka writes it (its Lua
//! script too, which a test of grpc_kafka holds to these names), walletctl's reconcile and the
//! tests read it. Every key starts with the deployment's `REDIS_KEY_PREFIX`:
//!
//! - `{prefix}total:{user_id}`: hash of [`CENTS`] and [`COUNT`], integers, changed only by
//!   `HINCRBY`;
//! - `{prefix}seen:{user_id}:{hour}`: set of the purchase ids of that user created in that hour,
//!   expiring `DEDUPE_HORIZON_SECS` after its last write;
//! - `{prefix}offsets:{log}`: hash of partition to the next offset to apply, where `log` names one
//!   topic in one Kafka cluster (`{cluster_id}:{topic}`);
//! - `{prefix}fingerprints:{log}`: hash of partition to the purchase id (hex) of the record just
//!   before that offset;
//! - `{prefix}probe`: a short-lived key readiness writes to learn that Redis takes writes.
//!
//! Counting by sequence (`COUNT_BY=sequence`, issue 19) keeps no dedupe sets and no offsets:
//!
//! - `{prefix}marks:{tag}`: hash of [`NEXT`] (the next sequence number to count) and [`HINT`]
//!   (the Kafka offset after the last record counted: where reading resumes);
//! - `{prefix}total:{tag}:{user_id}`: the total, as above;
//! - `{prefix}partitions:{stream}`: the stream's partition count (its topic's), written before
//!   anything of the stream is counted: which partition's key holds a user's total;
//! - `{prefix}segments`: hash of every stream counted under the prefix to its partition count:
//!   the segments of a chain of repartitions, whose totals a user's total sums;
//!
//! where `{tag}` is `{<stream>.<partition>}`, the Redis Cluster hash tag of the (stream,
//! partition) the user's purchases go to: one batch of a partition touches one slot.
//!
//! Where the keys live is one Redis or a Redis Cluster ([`Location`], parsed from `REDIS_URL`).
//!
//! No I/O here.

/// What follows the prefix in a total's key, before the user id.
pub const TOTAL: &str = "total:";
/// What follows the prefix in a dedupe set's key, before `{user_id}:{hour}`.
pub const SEEN: &str = "seen:";
/// What follows the prefix in the offsets hash's key, before the log name.
pub const OFFSETS: &str = "offsets:";
/// What follows the prefix in the fingerprints hash's key, before the log name.
pub const FINGERPRINTS: &str = "fingerprints:";
/// What follows the prefix in a partition's marks, before its hash tag.
pub const MARKS: &str = "marks:";
/// The field of the marks holding the next sequence number to count.
pub const NEXT: &str = "next";
/// The field of the marks holding the offset after the last record counted.
pub const HINT: &str = "hint";
/// What follows the prefix in a stream's partition count, before the stream id.
pub const PARTITIONS: &str = "partitions:";
/// The key, after the prefix, of the hash of the streams counted under the prefix.
pub const SEGMENTS: &str = "segments";
/// What follows the prefix in readiness's probe key.
pub const PROBE: &str = "probe";
/// The field of a total holding its sum, in cents.
pub const CENTS: &str = "cents";
/// The field of a total holding its number of purchases.
pub const COUNT: &str = "count";

/// The keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The total of `user_id`.
    pub fn total(&self, user_id: &str) -> String {
        format!("{}{TOTAL}{user_id}", self.prefix)
    }

    /// A `SCAN MATCH` pattern of every total (a glob character in the prefix may match more:
    /// check each key with [`Keys::user_of_total`]).
    pub fn total_pattern(&self) -> String {
        format!("{}{TOTAL}*", self.prefix)
    }

    /// The user whose total `key` is, if it is one under this prefix (either layout: a user id
    /// never holds a brace).
    pub fn user_of_total<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(TOTAL)?;
        match rest.strip_prefix('{') {
            Some(tagged) => tagged.split_once("}:").map(|(_tag, user)| user),
            None => Some(rest),
        }
    }

    /// The total of `user_id`, counted by sequence in `partition` of `stream`.
    pub fn tagged_total(&self, stream: &str, partition: u32, user_id: &str) -> String {
        format!("{}{TOTAL}{}:{user_id}", self.prefix, tag(stream, partition))
    }

    /// The marks (next sequence number, resume offset) of `partition` of `stream`.
    pub fn marks(&self, stream: &str, partition: u32) -> String {
        format!("{}{MARKS}{}", self.prefix, tag(stream, partition))
    }

    /// The partition count of `stream`.
    pub fn partitions(&self, stream: &str) -> String {
        format!("{}{PARTITIONS}{stream}", self.prefix)
    }

    /// The hash of every stream counted under the prefix to its partition count.
    pub fn segments(&self) -> String {
        format!("{}{SEGMENTS}", self.prefix)
    }

    /// A `SCAN MATCH` pattern of every dedupe set.
    pub fn seen_pattern(&self) -> String {
        format!("{}{SEEN}*", self.prefix)
    }

    /// The offsets hash of `log` (`{cluster_id}:{topic}`).
    pub fn offsets(&self, log: &str) -> String {
        format!("{}{OFFSETS}{log}", self.prefix)
    }

    /// A `SCAN MATCH` pattern of every offsets hash.
    pub fn offsets_pattern(&self) -> String {
        format!("{}{OFFSETS}*", self.prefix)
    }

    /// The fingerprints hash of `log`.
    pub fn fingerprints(&self, log: &str) -> String {
        format!("{}{FINGERPRINTS}{log}", self.prefix)
    }

    /// Readiness's probe key.
    pub fn probe(&self) -> String {
        format!("{}{PROBE}", self.prefix)
    }
}

/// Where the totals are: one Redis (`redis://...`), or a Redis Cluster given by seed nodes
/// (`redis+cluster://[user[:password]@]host:port[,host:port...][/]`; the credentials are every
/// node's). A cluster client learns the other nodes and the slots from any seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// One Redis: its URL as given.
    Single(String),
    /// A Redis Cluster: one `redis://` URL per seed node.
    Cluster(Vec<String>),
}

/// The scheme of a Redis Cluster's seed list.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

impl Location {
    /// Splits a cluster URL into its seeds; any other URL is one Redis (checked by the client
    /// that opens it).
    pub fn parse(url: &str) -> Result<Self, String> {
        let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) else {
            return Ok(Self::Single(url.to_owned()));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (credentials, hosts) = match rest.rsplit_once('@') {
            Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
            None => (String::new(), rest),
        };
        let seeds = hosts
            .split(',')
            .map(|node| {
                let (host, port) = node
                    .rsplit_once(':')
                    .ok_or_else(|| format!("{CLUSTER_SCHEME} seed {node:?} is not host:port"))?;
                if host.is_empty() || host.contains('/') || port.parse::<u16>().is_err() {
                    return Err(format!("{CLUSTER_SCHEME} seed {node:?} is not host:port"));
                }
                Ok(format!("redis://{credentials}{node}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::Cluster(seeds))
    }
}

/// The Redis Cluster hash tag of one (stream, partition).
fn tag(stream: &str, partition: u32) -> String {
    format!("{{{stream}.{partition}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_url_is_its_seeds_with_their_credentials_and_anything_else_one_redis() {
        assert_eq!(
            Location::parse("redis://127.0.0.1:6379/0"),
            Ok(Location::Single("redis://127.0.0.1:6379/0".into()))
        );
        assert_eq!(
            Location::parse("redis+cluster://a:7001,b:7002/"),
            Ok(Location::Cluster(vec![
                "redis://a:7001".into(),
                "redis://b:7002".into()
            ]))
        );
        assert_eq!(
            Location::parse("redis+cluster://u:pw@a:7001,b:7002"),
            Ok(Location::Cluster(vec![
                "redis://u:pw@a:7001".into(),
                "redis://u:pw@b:7002".into()
            ]))
        );
        for bad in [
            "redis+cluster://",
            "redis+cluster://a",
            "redis+cluster://a:7001,",
            "redis+cluster://a:70000",
            "redis+cluster://:7001",
            "redis+cluster://a:7001/0",
        ] {
            let error = Location::parse(bad).expect_err(bad);
            assert!(error.contains("host:port"), "{bad}: {error}");
        }
    }

    #[test]
    fn every_key_starts_with_the_prefix_and_a_total_names_its_user() {
        let keys = Keys::new("wallet:");
        assert_eq!(keys.total("u-1"), "wallet:total:u-1");
        assert_eq!(keys.user_of_total(&keys.total("u-1")), Some("u-1"));
        assert_eq!(keys.user_of_total("wallet:seen:u-1:1"), None);
        assert_eq!(keys.user_of_total("other:total:u-1"), None);
        assert_eq!(keys.offsets("c:t"), "wallet:offsets:c:t");
        assert_eq!(keys.fingerprints("c:t"), "wallet:fingerprints:c:t");
        assert_eq!(keys.probe(), "wallet:probe");
        let tagged = keys.tagged_total("s-1", 3, "u-1");
        assert_eq!(tagged, "wallet:total:{s-1.3}:u-1");
        assert_eq!(keys.user_of_total(&tagged), Some("u-1"));
        assert_eq!(keys.marks("s-1", 3), "wallet:marks:{s-1.3}");
        for pattern in [
            keys.total_pattern(),
            keys.seen_pattern(),
            keys.offsets_pattern(),
        ] {
            assert!(pattern.starts_with("wallet:") && pattern.ends_with('*'));
        }
    }
}
