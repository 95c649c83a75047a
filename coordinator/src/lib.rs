#![recursion_limit = "512"]
//! `ferry`: the coordinator of a ferry fleet.
//!
//! # Layout
//! Each layer only calls the ones below it.
//!
//! Pure core (no I/O):
//! - [`plan`]: rollout strategies and the batches they make.
//! - [`state`]: the rollout state machine: host and deployment statuses (one table each), their
//!   time limits, and `next`, the one function that says what a deployment does next.
//! - [`exit`]: the process exit codes.
//! - [`window`]: deploy windows and freezes: whether a deployment may start now, and when next.
//!
//! Effects, each behind a narrow interface:
//! - [`config`]: `fleet.toml`: the app, TLS files, environments and their hosts, validated at load.
//! - [`artifact`]: scanning a build (directory or tar archive) into a manifest + chunk source;
//!   [`cache`]: the scan cache and the manifests of releases sent before.
//! - [`pki`]: the fleet CA; issuing and reading certificates. [`tls`]: the coordinator's mTLS
//!   (fleet CA only; an agent must match the host dialled).
//! - [`client`]: connecting to agents and turning every failure into a `HostError` a human can act on;
//!   [`dialin`]: the connections of agents that dial in to `ferry serve`.
//! - [`fleet`]: the `Fleet` trait the engine drives hosts through, its gRPC implementation and a
//!   scripted fake.
//! - [`registry`]: the `Registry` trait (deployments, host steps, events, locks, versions, smoke
//!   runs, approvals) and its SQLite implementation.
//! - [`metrics`]: `--metrics-file`: an environment's deployments as Prometheus metrics.
//!
//! The engine:
//! - [`rollout`]: one deployment or rollback from its record to its end, emitting typed events and
//!   returning typed errors; coordinator hooks and blue-green switching.
//!
//! Use cases shared by every front end:
//! - [`commands`]: deploy, rollback, resume, promote, status, plan, history, report, token, ca,
//!   cert. Validation happens there, once.
//!
//! Front ends:
//! - [`cli`]: flags, and where a verb runs (here, or on a `ferry serve` with `--server`).
//! - [`server`]: `ferry serve`, the HTTPS API (HTTP only; one conversion of errors to status codes).
//! - [`ui`]: renders values and events as text or JSON; the only place that prints results.
#![forbid(unsafe_code)]

pub mod artifact;
pub mod cache;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod dialin;
pub mod exit;
pub mod fleet;
pub mod gate;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod pki;
pub mod plan;
pub mod registry;
pub mod rollout;
pub mod secrets;
pub mod server;
pub mod signing;
pub mod state;
pub mod tls;
pub mod ui;
pub mod window;
