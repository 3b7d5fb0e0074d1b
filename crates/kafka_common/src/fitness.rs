//! The rules an existing topic must follow to serve as the rebuild source, without I/O: at least
//! the configured replication and `min.insync.replicas`, records kept forever, never compacted.
//! Each broken rule is named with the setting or the topic configuration that breaks it.

use crate::TopicSpec;

/// Checks a topic with `replicas` per partition and the configuration `value(key)` (None: not
/// returned) against `spec`; the problem, worded after "existing topic NAME", when unfit.
pub fn check(
    spec: &TopicSpec,
    replicas: &[usize],
    value: impl Fn(&str) -> Option<String>,
) -> Result<(), String> {
    let replication = replicas.iter().copied().min().unwrap_or(0);
    if replication < spec.replication_factor as usize {
        return Err(format!(
            "has replication factor {replication} but KAFKA_TOPIC_REPLICATION_FACTOR is {}: \
             the topic is the rebuild source and must be replicated as configured",
            spec.replication_factor
        ));
    }
    let value = |key: &str| value(key).unwrap_or_default();
    let retention = value("retention.ms");
    if retention != "-1" {
        return Err(format!(
            "has retention.ms={retention}: the topic is the rebuild source and must keep its \
             records forever (retention.ms=-1)"
        ));
    }
    let retention_bytes = value("retention.bytes");
    if retention_bytes != "-1" {
        return Err(format!(
            "has retention.bytes={retention_bytes}: the rebuild source must keep every record \
             (retention.bytes=-1)"
        ));
    }
    let policy = value("cleanup.policy");
    if policy != "delete" {
        return Err(format!(
            "has cleanup.policy={policy}: compaction would drop purchases of the rebuild source \
             (cleanup.policy=delete with infinite retention)"
        ));
    }
    let min_isr: i32 = value("min.insync.replicas").parse().unwrap_or(0);
    if min_isr < spec.min_insync_replicas {
        return Err(format!(
            "has min.insync.replicas={min_isr} but KAFKA_TOPIC_MIN_INSYNC_REPLICAS is {}",
            spec.min_insync_replicas
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn spec(replication_factor: i32, min_insync_replicas: i32) -> TopicSpec {
        TopicSpec {
            brokers: "127.0.0.1:9092".to_owned(),
            topic: "t".to_owned(),
            partitions: 4,
            replication_factor,
            min_insync_replicas,
        }
    }

    fn fit_config() -> HashMap<&'static str, &'static str> {
        HashMap::from([
            ("retention.ms", "-1"),
            ("retention.bytes", "-1"),
            ("cleanup.policy", "delete"),
            ("min.insync.replicas", "2"),
        ])
    }

    fn check_with(
        spec: &TopicSpec,
        replicas: &[usize],
        config: &HashMap<&'static str, &'static str>,
    ) -> Result<(), String> {
        check(spec, replicas, |key| {
            config.get(key).map(|v| (*v).to_owned())
        })
    }

    #[test]
    fn a_topic_as_created_fits() {
        assert_eq!(
            check_with(&spec(3, 2), &[3, 3, 3, 3], &fit_config()),
            Ok(())
        );
    }

    #[test]
    fn each_broken_rule_is_named_with_its_setting() {
        let under_replicated = check_with(&spec(3, 2), &[3, 1, 3], &fit_config());
        assert!(
            under_replicated
                .as_ref()
                .is_err_and(|p| p.contains("replication factor 1")
                    && p.contains("KAFKA_TOPIC_REPLICATION_FACTOR is 3")),
            "{under_replicated:?}"
        );
        for (key, bad, named) in [
            ("retention.ms", "604800000", "retention.ms=604800000"),
            (
                "retention.bytes",
                "1073741824",
                "retention.bytes=1073741824",
            ),
            ("cleanup.policy", "compact", "cleanup.policy=compact"),
            (
                "min.insync.replicas",
                "1",
                "KAFKA_TOPIC_MIN_INSYNC_REPLICAS is 2",
            ),
        ] {
            let mut config = fit_config();
            config.insert(key, bad);
            let problem = check_with(&spec(3, 2), &[3, 3], &config);
            assert!(
                problem.as_ref().is_err_and(|p| p.contains(named)),
                "{key}: {problem:?}"
            );
        }
    }

    #[test]
    fn a_configuration_not_returned_is_unfit_not_assumed() {
        let problem = check_with(&spec(1, 1), &[1], &HashMap::new());
        assert!(problem.is_err_and(|p| p.contains("retention.ms=")));
    }
}
