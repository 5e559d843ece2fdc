//! Compare-and-swap updates of per-cluster tables in proxy-wasm shared data, and the registry
//! that lists them, decides who creates them, and lets expired ones go.
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
    /// The registry of clusters is full: this cluster gets no shared table until others expire.
    Full,
    Host,
}

pub const MAX_CAS_ATTEMPTS: usize = 16;

pub fn table_key(cluster: &str) -> String {
    format!("churn-guard.v1.cluster.{cluster}")
}

/// Reads a cluster's table; missing, emptied or unreadable means empty.
pub fn load<S: SharedStore + ?Sized>(store: &S, cluster: &str) -> ClusterTable {
    match store.get(&table_key(cluster)) {
        (Some(bytes), _) => ClusterTable::decode(&bytes),
        _ => ClusterTable::default(),
    }
}

/// Applies `change` to the cluster's shared table with CAS, retrying on contention.
/// Returns the table as written (or as read, if `change` changed nothing).
///
/// Envoy does not check the CAS token of a key that does not exist yet, so two workers that
/// both find a table missing could each write it, the second overwriting the first. Creation
/// is therefore decided by a compare-and-swap on the registry (see [`claim`]): only the worker
/// that lists the cluster there writes the new key; the others read again until it exists.
pub fn update<S, F>(
    store: &S,
    cluster: &str,
    now_ms: u64,
    mut change: F,
) -> Result<(ClusterTable, Applied), UpdateError>
where
    S: SharedStore + ?Sized,
    F: FnMut(&mut ClusterTable) -> Applied,
{
    let key = table_key(cluster);
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store.get(&key);
        let mut table = bytes.map(|b| ClusterTable::decode(&b)).unwrap_or_default();
        let Some(cas) = cas else {
            if claim(store, cluster, now_ms)? {
                let applied = change(&mut table);
                store.set(&key, &table.encode(), None).map_err(|_| UpdateError::Host)?;
                return Ok((table, applied));
            }
            continue;
        };
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

/// The clusters that have a table in shared data, each with when it was listed. Gauges are
/// reported from it, so that every VM reports the same figures (Envoy also runs the filter's
/// root context on its main thread, which serves no request), and it decides who creates a
/// table (see [`update`]).
pub const CLUSTERS_KEY: &str = "churn-guard.v2.clusters";

/// Bound on listed clusters; a cluster beyond it gets no shared table until others expire.
pub const MAX_CLUSTERS: usize = 1024;

/// A counter any worker bumps when it meets trouble, so that calm workers leave their calm.
pub const ALARM_KEY: &str = "churn-guard.v1.alarm";

/// A shared counter's value; missing or unreadable reads as 0.
pub fn counter<S: SharedStore + ?Sized>(store: &S, key: &str) -> u64 {
    store.get(key).0.and_then(|b| crate::properties::int(&b)).unwrap_or(0)
}

/// Adds one to a shared counter by CAS and returns the new value; `None` if the host refused or
/// the race was lost `MAX_CAS_ATTEMPTS` times. Two workers creating a missing counter at once
/// may both write 1 (Envoy does not check the CAS token of a missing key): a counter read for
/// change, not for its exact count, is not hurt by that.
pub fn increment<S: SharedStore + ?Sized>(store: &S, key: &str) -> Option<u64> {
    (0..MAX_CAS_ATTEMPTS).find_map(|_| {
        let (bytes, cas) = store.get(key);
        let next = bytes.and_then(|b| crate::properties::int(&b)).unwrap_or(0).wrapping_add(1);
        store.set(key, &next.to_le_bytes(), cas).ok().map(|()| next)
    })
}

/// A claim whose table has not appeared after this long is taken over: the VM that claimed it
/// failed to write (a host error), and the cluster must not stay without a table.
pub const CLAIM_TIMEOUT_MS: u64 = 1_000;

type Registry = Vec<(String, u64)>;

fn decode_registry(bytes: Option<&[u8]>) -> Registry {
    bytes.and_then(|b| postcard::from_bytes(b).ok()).unwrap_or_default()
}

/// The listed cluster names; missing or unreadable means none.
pub fn clusters<S: SharedStore + ?Sized>(store: &S) -> Vec<String> {
    decode_registry(store.get(CLUSTERS_KEY).0.as_deref()).into_iter().map(|(name, _)| name).collect()
}

/// Creates the registry if it is missing. This is the one write of a missing key that is not
/// decided by a compare-and-swap: Envoy configures the plugin's main-thread VM before it creates
/// the workers' VMs, so the first VM to call this has nobody to race with.
pub fn ensure_registry<S: SharedStore + ?Sized>(store: &S) -> Result<(), UpdateError> {
    if store.get(CLUSTERS_KEY).1.is_some() {
        return Ok(());
    }
    let empty = postcard::to_allocvec(&Registry::new()).map_err(|_| UpdateError::Host)?;
    store.set(CLUSTERS_KEY, &empty, None).map_err(|_| UpdateError::Host)
}

/// Read-modify-write of the registry with CAS. `change` returns `None` to leave it as it is.
fn edit_registry<S, T>(store: &S, mut change: impl FnMut(&mut Registry) -> Option<T>) -> Result<Option<T>, UpdateError>
where
    S: SharedStore + ?Sized,
{
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store.get(CLUSTERS_KEY);
        let Some(cas) = cas else {
            ensure_registry(store)?;
            continue;
        };
        let mut registry = decode_registry(bytes.as_deref());
        let Some(result) = change(&mut registry) else { return Ok(None) };
        let encoded = postcard::to_allocvec(&registry).map_err(|_| UpdateError::Host)?;
        match store.set(CLUSTERS_KEY, &encoded, Some(cas)) {
            Ok(()) => return Ok(Some(result)),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Host) => return Err(UpdateError::Host),
        }
    }
    Err(UpdateError::Contended)
}

/// Claims the creation of `cluster`'s missing table by listing it in the registry: true if this
/// caller won and must write the table, false if another worker claimed it first (and is
/// writing it). A claim older than [`CLAIM_TIMEOUT_MS`] is taken over, by CAS as well.
pub fn claim<S: SharedStore + ?Sized>(store: &S, cluster: &str, now_ms: u64) -> Result<bool, UpdateError> {
    let mut full = false;
    let won = edit_registry(store, |registry| {
        let full_now = registry.len() >= MAX_CLUSTERS;
        match registry.iter_mut().find(|(name, _)| name == cluster) {
            Some((_, claimed_ms)) if claimed_ms.saturating_add(CLAIM_TIMEOUT_MS) > now_ms => None,
            Some((_, claimed_ms)) => {
                *claimed_ms = now_ms;
                Some(())
            }
            None if full_now => {
                full = true;
                None
            }
            None => {
                registry.push((cluster.to_string(), now_ms));
                Some(())
            }
        }
    })?;
    if full {
        return Err(UpdateError::Full);
    }
    Ok(won.is_some())
}

/// Lists `cluster` again after it expired while another VM still had it cached; a no-op when it
/// is listed. Its table key exists, so listing it decides nothing about creation.
pub fn register<S: SharedStore + ?Sized>(store: &S, cluster: &str, now_ms: u64) -> Result<(), UpdateError> {
    let mut full = false;
    edit_registry(store, |registry| {
        if registry.iter().any(|(name, _)| name == cluster) {
            return None;
        }
        if registry.len() >= MAX_CLUSTERS {
            full = true;
            return None;
        }
        registry.push((cluster.to_string(), now_ms));
        Some(())
    })?;
    if full {
        return Err(UpdateError::Full);
    }
    Ok(())
}

/// Removes the state of `cluster` if its table expired (see [`ClusterTable::is_expired`]): the
/// table is emptied with CAS, so an observation that arrives meanwhile wins, and the cluster
/// leaves the registry. Envoy's shared data cannot delete a key; an emptied one costs its name.
/// Returns whether it was removed.
pub fn retire<S: SharedStore + ?Sized>(
    store: &S,
    cluster: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<bool, UpdateError> {
    let key = table_key(cluster);
    let mut emptied = false;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store.get(&key);
        // Missing: being created by whoever claimed it. Nothing to retire.
        let Some(cas) = cas else { return Ok(false) };
        let expired =
            bytes.as_deref().is_none_or(|b| b.is_empty() || ClusterTable::decode(b).is_expired(now_ms, ttl_ms));
        if !expired {
            return Ok(false);
        }
        if bytes.as_deref().is_none_or(<[u8]>::is_empty) {
            emptied = true;
            break;
        }
        match store.set(&key, &[], Some(cas)) {
            Ok(()) => {
                emptied = true;
                break;
            }
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Host) => return Err(UpdateError::Host),
        }
    }
    if !emptied {
        return Err(UpdateError::Contended);
    }
    edit_registry(store, |registry| {
        let before = registry.len();
        registry.retain(|(name, _)| name != cluster);
        (registry.len() != before).then_some(())
    })?;
    Ok(true)
}

/// An in-memory `SharedStore` with Envoy's CAS semantics, for tests and fuzzing; not in the
/// module Envoy loads.
#[cfg(not(target_os = "wasi"))]
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: std::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
    /// Writes to refuse with `CasMismatch` before accepting, to simulate other workers.
    pub contend: std::cell::Cell<u32>,
}

#[cfg(not(target_os = "wasi"))]
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
    use std::cell::RefCell;

    fn observe_at<S: SharedStore>(
        store: &S,
        obs: Observation<'_>,
        now: u64,
    ) -> Result<(ClusterTable, Applied), UpdateError> {
        let policy = Policy::from_config(&Config::default());
        update(store, "c", now, |t| t.apply(&obs, now, &policy, 0))
    }

    fn observe(store: &MemoryStore, obs: Observation<'_>, now: u64) -> Result<(ClusterTable, Applied), UpdateError> {
        observe_at(store, obs, now)
    }

    /// Whether a call (key, is it a set) is the moment for the other worker to act.
    type Moment<'a> = Box<dyn Fn(&str, bool) -> bool + 'a>;
    /// The other worker's writes.
    type OtherWorker<'a> = RefCell<Option<Box<dyn FnOnce(&MemoryStore) + 'a>>>;

    /// Another worker's writes, run once at the moment `when` matches a call of this worker's.
    struct Interleaved<'a> {
        inner: MemoryStore,
        when: Moment<'a>,
        other: OtherWorker<'a>,
    }

    impl<'a> Interleaved<'a> {
        fn new(when: impl Fn(&str, bool) -> bool + 'a, other: impl FnOnce(&MemoryStore) + 'a) -> Self {
            Self { inner: MemoryStore::default(), when: Box::new(when), other: RefCell::new(Some(Box::new(other))) }
        }

        fn maybe_interleave(&self, key: &str, is_set: bool) {
            if (self.when)(key, is_set) {
                if let Some(other) = self.other.borrow_mut().take() {
                    other(&self.inner);
                }
            }
        }
    }

    impl SharedStore for Interleaved<'_> {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            let read = self.inner.get(key);
            // The other worker acts after this read: what was read is stale.
            self.maybe_interleave(key, false);
            read
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
            self.maybe_interleave(key, true);
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn a_shared_counter_counts_every_increment_and_reads_zero_when_missing() {
        let store = MemoryStore::default();
        assert_eq!(counter(&store, ALARM_KEY), 0);
        assert_eq!((increment(&store, ALARM_KEY), increment(&store, ALARM_KEY)), (Some(1), Some(2)));
        assert_eq!(counter(&store, ALARM_KEY), 2);
        // Another worker wrote between this one's read and write: it reads again.
        let racing = Interleaved::new(
            |key, set| key == ALARM_KEY && set,
            |s: &MemoryStore| {
                let _ = increment(s, ALARM_KEY);
            },
        );
        let _ = increment(&racing.inner, ALARM_KEY);
        assert_eq!(increment(&racing, ALARM_KEY), Some(3));
        assert_eq!(counter(&racing, ALARM_KEY), 3);
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
        assert_eq!(clusters(&store), vec!["c".to_string()], "creating a table lists its cluster");
    }

    #[test]
    fn two_workers_creating_the_same_table_keep_both_observations() {
        // This worker finds the table missing; before it acts, another worker creates it with an
        // ejection. An unconditional create would now wipe that ejection out.
        let key = table_key("c");
        let store = Interleaved::new(
            |k, is_set| k == key && !is_set,
            |inner| {
                observe(inner, Observation::Failure("b:1", FailureKind::ConnectFailure), 5).unwrap_or_default();
            },
        );
        observe_at(&store, Observation::Success("a:1"), 5).unwrap_or_default();
        let t = load(&store.inner, "c");
        assert!(t.is_ejected("b:1", 6), "the other worker's ejection was overwritten");
        assert!(t.find("a:1").is_some(), "this worker's observation was lost");
    }

    #[test]
    fn a_claim_decides_who_creates_and_a_stale_claim_is_taken_over() {
        let store = MemoryStore::default();
        assert_eq!(claim(&store, "c", 0), Ok(true));
        assert_eq!(claim(&store, "c", 0), Ok(false), "the second claimant must not write");
        assert_eq!(claim(&store, "c", CLAIM_TIMEOUT_MS - 1), Ok(false));
        // The claimant never wrote the table: after the timeout the next one takes it over.
        assert_eq!(claim(&store, "c", CLAIM_TIMEOUT_MS), Ok(true));
        assert_eq!(claim(&store, "c", CLAIM_TIMEOUT_MS), Ok(false));
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
        assert_eq!(register(&store, "a", 0), Ok(()));
        assert_eq!(register(&store, "b", 0), Ok(()));
        assert_eq!(register(&store, "a", 0), Ok(()));
        assert_eq!(clusters(&store), vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn registration_survives_contention_and_stays_bounded() {
        let store = MemoryStore::default();
        register(&store, "first", 0).unwrap_or(());
        store.contend.set(3);
        assert_eq!(register(&store, "second", 0), Ok(()));
        assert_eq!(clusters(&store).len(), 2);
        for i in 0..MAX_CLUSTERS + 10 {
            register(&store, &format!("c{i}"), 0).unwrap_or(());
        }
        assert_eq!(clusters(&store).len(), MAX_CLUSTERS);
        assert_eq!(register(&store, "one-too-many", 0), Err(UpdateError::Full));
        assert_eq!(claim(&store, "one-too-many", 0), Err(UpdateError::Full));
        store.contend.set(u32::MAX);
        assert_eq!(register(&store, "c0", 0), Ok(()), "a registered name needs no write");
    }

    #[test]
    fn unreadable_registry_reads_as_empty_and_is_replaced() {
        let store = MemoryStore::default();
        store.set(CLUSTERS_KEY, &[0xff, 0xff, 0xff], None).unwrap_or(());
        assert_eq!(clusters(&store), Vec::<String>::new());
        assert_eq!(register(&store, "a", 0), Ok(()));
        assert_eq!(clusters(&store), vec!["a".to_string()]);
    }

    #[test]
    fn expired_clusters_are_removed_and_come_back_when_seen_again() {
        let store = MemoryStore::default();
        let ttl = Config::default().ejection.endpoint_ttl_ms;
        observe(&store, Observation::Success("a:1"), 1_000).unwrap_or_default();
        assert_eq!(retire(&store, "c", 1_000 + ttl - 1, ttl), Ok(false), "still known");
        assert_eq!(retire(&store, "c", 1_000 + ttl, ttl), Ok(true));
        assert_eq!(clusters(&store), Vec::<String>::new());
        assert_eq!(store.get(&table_key("c")).0, Some(vec![]), "the table's memory is released");
        assert_eq!(load(&store, "c"), ClusterTable::default());

        // Seen again: the emptied key takes a normal compare-and-swap write.
        let now = 2_000 + ttl;
        observe(&store, Observation::Failure("b:1", FailureKind::ConnectFailure), now).unwrap_or_default();
        assert!(load(&store, "c").is_ejected("b:1", now + 1));
        assert_eq!(register(&store, "c", now), Ok(()));
        assert_eq!(clusters(&store), vec!["c".to_string()]);
    }

    #[test]
    fn an_observation_racing_with_retirement_wins() {
        let ttl = Config::default().ejection.endpoint_ttl_ms;
        let late = 1_000 + ttl;
        let key = table_key("c");
        let store = Interleaved::new(
            |k, is_set| k == key && is_set,
            |inner| {
                observe(inner, Observation::Success("b:1"), late).unwrap_or_default();
            },
        );
        observe(&store.inner, Observation::Success("a:1"), 1_000).unwrap_or_default();
        assert_eq!(retire(&store, "c", late, ttl), Ok(false));
        assert!(load(&store.inner, "c").find("b:1").is_some());
        assert_eq!(clusters(&store.inner), vec!["c".to_string()]);
    }

    #[test]
    fn a_table_being_created_is_not_retired() {
        let store = MemoryStore::default();
        assert_eq!(claim(&store, "c", 0), Ok(true));
        assert_eq!(retire(&store, "c", u64::MAX / 2, 1), Ok(false));
        assert_eq!(clusters(&store), vec!["c".to_string()]);
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
