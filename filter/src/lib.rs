//! churn-guard: a proxy-wasm HTTP filter that keeps requests succeeding while Kubernetes
//! endpoints churn behind Envoy (Gateway).
//!
//! Host-independent logic lives in plain modules (`config`, `outcome`, `health`, `budget`,
//! `clusters`, `decision`, `store`) that are unit-tested natively and on wasm32; `filter` is the thin
//! proxy-wasm glue, built only for the WASI target Envoy loads.

pub mod budget;
pub mod clusters;
pub mod config;
pub mod decision;
pub mod health;
pub mod outcome;
pub mod properties;
pub mod rng;
pub mod store;

#[cfg(target_os = "wasi")]
mod filter;
