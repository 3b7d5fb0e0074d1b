//! Open connections per peer address, capped: both services' listeners close a connection at once
//! when its address already holds the cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// The count of open connections per address, with its cap.
pub struct PerIp {
    limit: u32,
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// One connection's place in its address's count; released on drop.
pub struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    pub fn new(limit: u32) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `ip`, or `None` when it holds the cap already.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            per_ip: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self
            .per_ip
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
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
}
