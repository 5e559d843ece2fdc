//! registry-cache: has every Wasm artifact local, verified, before anyone asks for it, so that
//! Envoy Gateway's image checks are answered without waiting on a registry.

pub mod artifact;
pub mod auth;
pub mod cache;
pub mod package;
pub mod permissions;
pub mod publish;
pub mod pull;
pub mod render;
pub mod server;
pub mod service;
pub mod sign;
pub mod sources;
pub mod tls;
