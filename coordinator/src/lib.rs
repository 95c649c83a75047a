#![recursion_limit = "512"]
//! `ferry`: the coordinator of a ferry fleet.
//!
//! # Layout
//! - [`artifact`]: scanning a build (directory or tar archive) into a manifest + chunk source.
//! - [`cli`]: flags, dispatch, exit codes ([`exit`]).
//! - [`config`]: `fleet.toml`: the app, TLS files, environments and their hosts.
//! - [`plan`]: rollout strategies and the batches they make (pure).
//! - [`metrics`]: `--metrics-file`: an environment's deployments as Prometheus metrics.
//! - [`registry`]: the SQLite record of every deployment, host step and event; environment locks.
//! - [`pki`]: the fleet CA; issuing and reading certificates.
//! - [`tls`]: the coordinator's mTLS (fleet CA only; agent must match the host dialled).
//! - [`client`]: connecting to agents and turning every failure into a `HostError` a human can act on.
//! - [`commands`]: one module per verb, each returning a value.
//! - [`ui`]: renders those values as text or JSON; the only place that prints results.
#![forbid(unsafe_code)]

pub mod artifact;
pub mod cache;
pub mod cli;
pub mod cli_remote;
pub mod client;
pub mod commands;
pub mod config;
pub mod exit;
pub mod metrics;
pub mod pki;
pub mod plan;
pub mod registry;
pub mod remote;
pub mod server;
pub mod state;
pub mod tls;
pub mod ui;
