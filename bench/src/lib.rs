//! The churn lab: reproduces the rolling-restart outage of envoyproxy/gateway#5326 on one
//! machine (pods on loopback, a control plane that lags, real Envoy) and measures the
//! mitigations users would pick side by side.

pub mod blackhole;
pub mod compare;
pub mod control_plane;
pub mod delivery;
pub mod demo;
pub mod gateway_examples;
pub mod lagged;
pub mod load;
pub mod pods;
pub mod registry_bench;
pub mod report;
pub mod scenario;
pub mod service;
pub mod variants;
