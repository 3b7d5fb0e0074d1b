//! Kafka's default partitioner for keyed records: `toPositive(murmur2(key)) % partitions`, with
//! the seed and mixing of the Java client (`org.apache.kafka.common.utils.Utils.murmur2`).
//! librdkafka's own default is `consistent_random` (CRC32), so a relay that must know the
//! partition computes it here and produces to it explicitly.

/// MurmurHash2 (32-bit) as Kafka's Java client computes it.
#[must_use]
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Kafka hashes lengths as a Java int; keys are far below 2 GiB.
    let length = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let mut h = SEED ^ length;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if let Some(first) = tail.first() {
        h ^= u32::from(*first);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    i32::from_ne_bytes(h.to_ne_bytes())
}

/// The partition Kafka's default partitioner gives `key` among `partitions` (at least one).
#[must_use]
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    let positive = u32::from_ne_bytes(murmur2(key).to_ne_bytes()) & 0x7fff_ffff;
    positive % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by `Utils.murmur2` and `Utils.toPositive(..) % 16` of the Java client
    /// (kafka-clients 4.4.0) for the same bytes.
    #[test]
    fn agrees_with_the_java_client() {
        let cases: [(&str, i32, u32); 7] = [
            ("21", -973_932_308, 12),
            ("foobar", -790_332_482, 14),
            ("a-little-bit-long-string", -985_981_536, 0),
            ("abc", 479_470_107, 11),
            ("u-1", -766_518_409, 7),
            ("user-42", 1_459_644_460, 12),
            ("", 275_646_681, 9),
        ];
        for (key, hash, partition) in cases {
            assert_eq!(murmur2(key.as_bytes()), hash, "murmur2({key:?})");
            assert_eq!(
                partition_of(key.as_bytes(), 16),
                partition,
                "partition of {key:?}"
            );
        }
    }
}
