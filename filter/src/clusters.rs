//! State one VM keeps per cluster for itself (its copy of the shared table, its retry budget):
//! bounded, and forgotten once the cluster has not been used for a while, so that a gateway
//! whose routes come and go does not accumulate state for clusters that no longer exist.

use std::collections::HashMap;

#[derive(Debug, Clone)]
struct Slot<T> {
    value: T,
    used_ms: u64,
}

#[derive(Debug, Clone)]
pub struct ClusterMap<T> {
    slots: HashMap<String, Slot<T>>,
    capacity: usize,
}

impl<T> ClusterMap<T> {
    pub fn new(capacity: usize) -> Self {
        Self { slots: HashMap::new(), capacity: capacity.max(1) }
    }

    /// The state of `cluster`, made with `make` if there is none; marks it used at `now_ms`.
    /// When the map is full, the least recently used cluster makes room.
    pub fn get_or_insert_with(&mut self, cluster: &str, now_ms: u64, make: impl FnOnce() -> T) -> Option<&mut T> {
        if !self.slots.contains_key(cluster) {
            if self.slots.len() >= self.capacity {
                self.evict_least_recently_used();
            }
            self.slots.insert(cluster.to_string(), Slot { value: make(), used_ms: now_ms });
        }
        self.get_mut(cluster, now_ms)
    }

    /// The state of `cluster`, if any; marks it used at `now_ms`.
    pub fn get_mut(&mut self, cluster: &str, now_ms: u64) -> Option<&mut T> {
        let slot = self.slots.get_mut(cluster)?;
        slot.used_ms = slot.used_ms.max(now_ms);
        Some(&mut slot.value)
    }

    pub fn get(&self, cluster: &str) -> Option<&T> {
        self.slots.get(cluster).map(|s| &s.value)
    }

    pub fn contains(&self, cluster: &str) -> bool {
        self.slots.contains_key(cluster)
    }

    pub fn remove(&mut self, cluster: &str) -> Option<T> {
        self.slots.remove(cluster).map(|s| s.value)
    }

    /// Forgets clusters not used for `ttl_ms`; returns how many.
    pub fn expire(&mut self, now_ms: u64, ttl_ms: u64) -> usize {
        let before = self.slots.len();
        self.slots.retain(|_, s| s.used_ms.saturating_add(ttl_ms) > now_ms);
        before - self.slots.len()
    }

    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.values().map(|s| &s.value)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn evict_least_recently_used(&mut self) {
        let oldest = self.slots.iter().min_by_key(|(_, s)| s.used_ms).map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.slots.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn state_is_per_cluster() {
        let mut m = ClusterMap::new(8);
        *m.get_or_insert_with("a", 0, || 0).unwrap_or(&mut 0) += 5;
        m.get_or_insert_with("b", 0, || 100);
        assert_eq!(m.get("a"), Some(&5));
        assert_eq!(m.get("b"), Some(&100));
        assert_eq!(m.get_or_insert_with("a", 1, || 0).copied(), Some(5), "made once");
    }

    #[test]
    fn unused_clusters_are_forgotten_used_ones_kept() {
        let mut m = ClusterMap::new(8);
        m.get_or_insert_with("gone", 0, || ());
        m.get_or_insert_with("busy", 0, || ());
        m.get_mut("busy", 9_000);
        assert_eq!(m.expire(9_999, 10_000), 0);
        assert_eq!(m.expire(10_000, 10_000), 1);
        assert!(!m.contains("gone") && m.contains("busy"));
        assert_eq!(m.expire(19_000, 10_000), 1);
        assert!(m.is_empty());
    }

    #[test]
    fn bounded_by_evicting_the_least_recently_used() {
        let mut m = ClusterMap::new(3);
        for (i, c) in ["a", "b", "c"].iter().enumerate() {
            m.get_or_insert_with(c, i as u64, || ());
        }
        m.get_mut("a", 10);
        m.get_or_insert_with("d", 11, || ());
        assert_eq!(m.len(), 3);
        assert!(!m.contains("b"), "b was used least recently");
        assert!(m.contains("a") && m.contains("c") && m.contains("d"));
    }
}
