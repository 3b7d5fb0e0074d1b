//! Open connections per client address (or per token subject), capped: both services' listeners close a connection at
//! once when its address already holds the cap. An IPv6 client is counted by its /64 (one host
//! usually holds a whole /64, so counting single addresses would cap nothing), an IPv4-mapped
//! IPv6 address as the IPv4 address it is.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// The count of open connections per key (a client address, a token's subject), with its cap.
pub struct PerKey<K: Hash + Eq> {
    limit: u32,
    open: Mutex<HashMap<K, u32>>,
}

/// One connection's place in its key's count; released on drop.
pub struct Slot<K: Hash + Eq> {
    per_key: Arc<PerKey<K>>,
    key: K,
}

/// Open connections per client address.
pub type PerIp = PerKey<IpAddr>;
/// One connection's place in its address's count.
pub type IpSlot = Slot<IpAddr>;

impl<K: Hash + Eq + Clone> PerKey<K> {
    pub fn new(limit: u32) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection of `key`, or `None` when it holds the cap already.
    pub fn try_acquire_key(self: &Arc<Self>, key: K) -> Option<Slot<K>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key.clone()).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Slot {
            per_key: self.clone(),
            key,
        })
    }
}

impl PerKey<IpAddr> {
    /// A slot for one more connection from `ip` (counted as [`counted_as`] says), or `None`
    /// when it holds the cap already.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        self.try_acquire_key(counted_as(ip))
    }
}

/// The address a connection is counted under: IPv4 as it is, IPv6 as its /64.
pub fn counted_as(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from_bits(
                v6.to_bits() & !u128::from(u64::MAX),
            )),
        },
    }
}

impl<K: Hash + Eq> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut open = self
            .per_key
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Requests per second per token subject, shared by all of a subject's connections (so that
/// reconnecting does not refill the bucket).
pub struct SubjectRate {
    limiter: governor::DefaultKeyedRateLimiter<String>,
    per_second: u32,
}

/// Subjects remembered before the idle ones are forgotten (their buckets are full again anyway).
const SUBJECTS_KEPT: usize = 100_000;

impl SubjectRate {
    /// `None` when `per_second` is 0 (no limit per subject). The burst is one second's worth.
    pub fn new(per_second: u32) -> Option<Arc<Self>> {
        let rate = std::num::NonZeroU32::new(per_second)?;
        Some(Arc::new(Self {
            limiter: governor::RateLimiter::keyed(governor::Quota::per_second(rate)),
            per_second,
        }))
    }

    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Whether one more request of `subject` is within its rate (and counts it).
    pub fn check(&self, subject: &str) -> bool {
        let allowed = self.limiter.check_key(&subject.to_owned()).is_ok();
        if self.limiter.len() > SUBJECTS_KEPT {
            self.limiter.retain_recent();
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_address_and_frees_a_slot_on_drop() {
        let per_ip = PerIp::new(2);
        let (a, b) = (IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2]));
        let first = per_ip.try_acquire(a).expect("first");
        let _second = per_ip.try_acquire(a).expect("second");
        assert!(per_ip.try_acquire(a).is_none(), "third over the cap");
        assert!(
            per_ip.try_acquire(b).is_some(),
            "another address is counted apart"
        );
        drop(first);
        assert!(
            per_ip.try_acquire(a).is_some(),
            "a dropped slot is free again"
        );
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        let per_ip = PerIp::new(1);
        let ip = |text: &str| text.parse::<IpAddr>().expect("address");
        let _held = per_ip.try_acquire(ip("2001:db8:1:2::1")).expect("first");
        assert!(
            per_ip.try_acquire(ip("2001:db8:1:2:ffff::9")).is_none(),
            "another address of the same /64"
        );
        assert!(
            per_ip.try_acquire(ip("2001:db8:1:3::1")).is_some(),
            "another /64"
        );
        let _v4 = per_ip.try_acquire(ip("192.0.2.1")).expect("ipv4");
        assert!(
            per_ip.try_acquire(ip("::ffff:192.0.2.1")).is_none(),
            "the same IPv4 client, mapped"
        );
    }
}
