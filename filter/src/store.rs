//! Compare-and-swap updates of per-cluster tables in proxy-wasm shared data.
//!
//! Shared data is the one store every worker thread's VM sees. Updates read the table with its
//! CAS token, apply observations, and write back only if nobody wrote in between; otherwise
//! they start over from the newer table, so no worker's observation is lost.

use crate::health::{Applied, ClusterTable};

/// Why a write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// Someone else wrote since our read.
    CasMismatch,
    /// The host refused for another reason.
    Host,
}

/// The subset of proxy-wasm shared data used here.
pub trait SharedStore {
    /// Value and CAS token; `(None, None)` for a missing key. Host errors read as missing.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateError {
    /// Lost the race this many times in a row; the observation is dropped, not retried forever.
    Contended,
    Host,
}

pub const MAX_CAS_ATTEMPTS: usize = 16;

pub fn table_key(cluster: &str) -> String {
    format!("churn-guard.v1.cluster.{cluster}")
}

/// Reads a cluster's table; missing or unreadable means empty.
pub fn load<S: SharedStore + ?Sized>(store: &S, cluster: &str) -> ClusterTable {
    match store.get(&table_key(cluster)) {
        (Some(bytes), _) => ClusterTable::decode(&bytes),
        _ => ClusterTable::default(),
    }
}

/// Applies `change` to the cluster's shared table with CAS, retrying on contention.
/// Returns the table as written (or as read, if `change` changed nothing).
pub fn update<S, F>(store: &S, cluster: &str, mut change: F) -> Result<(ClusterTable, Applied), UpdateError>
where
    S: SharedStore + ?Sized,
    F: FnMut(&mut ClusterTable) -> Applied,
{
    let key = table_key(cluster);
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store.get(&key);
        let Some(cas) = cas.filter(|_| bytes.is_some()) else {
            // Create the key first, so that every later write is a real compare-and-swap:
            // Envoy does not check the token of a key that does not exist yet.
            store.set(&key, &ClusterTable::default().encode(), None).map_err(|_| UpdateError::Host)?;
            continue;
        };
        let mut table = bytes.map(|b| ClusterTable::decode(&b)).unwrap_or_default();
        let applied = change(&mut table);
        if !applied.changed {
            return Ok((table, applied));
        }
        match store.set(&key, &table.encode(), Some(cas)) {
            Ok(()) => return Ok((table, applied)),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Host) => return Err(UpdateError::Host),
        }
    }
    Err(UpdateError::Contended)
}

/// Names of the clusters that have a table in shared data. Gauges are reported from it, so that
/// every VM reports the same figures: Envoy also runs the filter's root context on its main
/// thread, which serves no request and would otherwise report an empty table every second.
pub const CLUSTERS_KEY: &str = "churn-guard.v1.clusters";

/// Bound on registered cluster names; further clusters work, but are left out of the gauges.
pub const MAX_CLUSTERS: usize = 1024;

fn decode_clusters(bytes: Option<&[u8]>) -> Vec<String> {
    bytes.and_then(|b| postcard::from_bytes(b).ok()).unwrap_or_default()
}

/// The registered cluster names; missing or unreadable means none.
pub fn clusters<S: SharedStore + ?Sized>(store: &S) -> Vec<String> {
    decode_clusters(store.get(CLUSTERS_KEY).0.as_deref())
}

/// Adds `cluster` to the registered names, unless it is there already or the registry is full.
pub fn register<S: SharedStore + ?Sized>(store: &S, cluster: &str) -> Result<(), UpdateError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store.get(CLUSTERS_KEY);
        let Some(cas) = cas.filter(|_| bytes.is_some()) else {
            // As in `update`: create the key so that the write below is a real compare-and-swap.
            let empty = postcard::to_allocvec(&Vec::<String>::new()).map_err(|_| UpdateError::Host)?;
            store.set(CLUSTERS_KEY, &empty, None).map_err(|_| UpdateError::Host)?;
            continue;
        };
        let mut names = decode_clusters(bytes.as_deref());
        if names.len() >= MAX_CLUSTERS || names.iter().any(|n| n == cluster) {
            return Ok(());
        }
        names.push(cluster.to_string());
        let encoded = postcard::to_allocvec(&names).map_err(|_| UpdateError::Host)?;
        match store.set(CLUSTERS_KEY, &encoded, Some(cas)) {
            Ok(()) => return Ok(()),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Host) => return Err(UpdateError::Host),
        }
    }
    Err(UpdateError::Contended)
}

/// An in-memory `SharedStore` with Envoy's CAS semantics, for tests and fuzzing.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: std::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
    /// Writes to refuse with `CasMismatch` before accepting, to simulate other workers.
    pub contend: std::cell::Cell<u32>,
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.entries.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        let mut entries = self.entries.borrow_mut();
        let current = entries.get(key).map(|(_, c)| *c);
        if let (Some(want), Some(have)) = (cas.filter(|c| *c != 0), current) {
            if want != have {
                return Err(SetError::CasMismatch);
            }
        }
        if self.contend.get() > 0 {
            self.contend.set(self.contend.get() - 1);
            // Another worker got there first: its write bumps the token.
            if let Some(entry) = entries.get_mut(key) {
                entry.1 = entry.1.wrapping_add(1);
            }
            return Err(SetError::CasMismatch);
        }
        let next = current.unwrap_or(0).wrapping_add(1).max(1);
        entries.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::config::Config;
    use crate::health::{Observation, Policy};
    use crate::outcome::FailureKind;

    fn observe(store: &MemoryStore, obs: Observation<'_>, now: u64) -> Result<(ClusterTable, Applied), UpdateError> {
        let policy = Policy::from_config(&Config::default());
        update(store, "c", |t| t.apply(&obs, now, &policy, 0))
    }

    #[test]
    fn first_write_creates_the_table() {
        let store = MemoryStore::default();
        let (t, applied) =
            observe(&store, Observation::Failure("a:1", FailureKind::ConnectFailure), 5).unwrap_or_default();
        assert_eq!(applied.ejected.len(), 1);
        assert_eq!(load(&store, "c"), t);
        assert!(load(&store, "c").is_ejected("a:1", 6));
        assert_eq!(load(&store, "other"), ClusterTable::default());
    }

    #[test]
    fn contention_is_retried_without_losing_observations() {
        let store = MemoryStore::default();
        observe(&store, Observation::Success("a:1"), 0).unwrap_or_default();
        store.contend.set(3);
        observe(&store, Observation::Success("b:1"), 0).unwrap_or_default();
        let t = load(&store, "c");
        assert!(t.find("a:1").is_some() && t.find("b:1").is_some());
    }

    #[test]
    fn endless_contention_gives_up() {
        let store = MemoryStore::default();
        observe(&store, Observation::Success("a:1"), 0).unwrap_or_default();
        store.contend.set(u32::MAX);
        assert_eq!(observe(&store, Observation::Success("b:1"), 0).err(), Some(UpdateError::Contended));
    }

    #[test]
    fn unchanged_tables_are_not_written() {
        let store = MemoryStore::default();
        observe(&store, Observation::Success("a:1"), 0).unwrap_or_default();
        let (_, cas) = store.get(&table_key("c"));
        observe(&store, Observation::Success("a:1"), 10).unwrap_or_default();
        assert_eq!(store.get(&table_key("c")).1, cas);
    }

    #[test]
    fn clusters_are_registered_once() {
        let store = MemoryStore::default();
        assert_eq!(clusters(&store), Vec::<String>::new());
        assert_eq!(register(&store, "a"), Ok(()));
        assert_eq!(register(&store, "b"), Ok(()));
        assert_eq!(register(&store, "a"), Ok(()));
        assert_eq!(clusters(&store), vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn registration_survives_contention_and_stays_bounded() {
        let store = MemoryStore::default();
        register(&store, "first").unwrap_or(());
        store.contend.set(3);
        assert_eq!(register(&store, "second"), Ok(()));
        assert_eq!(clusters(&store).len(), 2);
        for i in 0..MAX_CLUSTERS + 10 {
            register(&store, &format!("c{i}")).unwrap_or(());
        }
        assert_eq!(clusters(&store).len(), MAX_CLUSTERS);
        store.contend.set(u32::MAX);
        assert_eq!(register(&store, "c0"), Ok(()), "a registered name needs no write");
    }

    #[test]
    fn unreadable_registry_reads_as_empty_and_is_replaced() {
        let store = MemoryStore::default();
        store.set(CLUSTERS_KEY, &[0xff, 0xff, 0xff], None).unwrap_or(());
        assert_eq!(clusters(&store), Vec::<String>::new());
        assert_eq!(register(&store, "a"), Ok(()));
        assert_eq!(clusters(&store), vec!["a".to_string()]);
    }

    #[test]
    fn stale_token_is_refused() {
        let store = MemoryStore::default();
        store.set("k", b"1", None).unwrap_or(());
        let (_, cas) = store.get("k");
        store.set("k", b"2", cas).unwrap_or(());
        assert_eq!(store.set("k", b"3", cas), Err(SetError::CasMismatch));
    }
}
