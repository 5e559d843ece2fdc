//! churn-guard: a proxy-wasm HTTP filter that keeps requests succeeding while Kubernetes
//! endpoints churn behind Envoy (Gateway).
//!
//! Host-independent logic lives in plain modules (`config`, `outcome`, `health`, `budget`, `calm`,
//! `clusters`, `decision`, `inflight`, `store`); `plugin` is what happens on each callback, written against
//! the `host::Host` trait. All of them are unit-tested natively and on wasm32, `plugin` with an
//! in-memory host. `filter` is the thin proxy-wasm glue, built only for the WASI target Envoy
//! loads.

pub mod budget;
pub mod calm;
pub mod clusters;
pub mod config;
pub mod decision;
pub mod health;
pub mod host;
pub mod inflight;
pub mod outcome;
pub mod plugin;
pub mod properties;
pub mod rng;
pub mod store;

#[cfg(target_os = "wasi")]
mod filter;
