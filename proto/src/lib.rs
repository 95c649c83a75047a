//! ferry's wire contract, shared by `ferry` (coordinator) and `ferry-agent`.
//!
//! # Layout
//! - [`v1`]: the generated gRPC service and messages of `proto/ferry/agent/v1/agent.proto`.
//! - [`config_file`]: reading a TOML config file into a checked type, with errors that name the
//!   file, the key and the reason (both `agent.toml` and `fleet.toml` go through it).
//! - [`durable`]: the one crash-safe file write (temp → fsync → rename → fsync dir) both sides use.
//! - [`identity`]: what a fleet certificate says about its holder (name, addresses, role) and how
//!   both sides read certificates and keys from PEM files with errors that name the file.
//!
//! - [`delta`]: piece deltas that rebuild a changed chunk from old content the host keeps.
//! - [`prometheus`]: the Prometheus text format both sides write (agent `/metrics`, `ferry
//!   --metrics-file`), and a reader of it for checks.
//! - [`manifest`]: the release manifest rules (the one gate for untrusted manifests), its
//!   canonical hash, release ids, and the chunking parameters both sides share.
//!
//! This crate holds no behaviour of either process: only the contract and the checked
//! conversions both sides must agree on.
#![forbid(unsafe_code)]

pub mod audit_file;
pub mod config_file;
pub mod delta;
pub mod durable;
pub mod first_bytes;
pub mod identity;
pub mod manifest;
pub mod prometheus;
pub mod reload;
pub mod render;
pub mod signing;
pub mod text;

/// Generated code for package `ferry.agent.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
    tonic::include_proto!("ferry.agent.v1");
}

/// The agent's default gRPC port.
pub const DEFAULT_AGENT_PORT: u16 = 7443;

/// The HTTP/2 flow-control window of one stream, on both ends of the agent's gRPC: an upload is
/// one stream, and the 64 KiB default would stall it every round trip.
pub const HTTP2_STREAM_WINDOW: u32 = 4 << 20;
/// The window of a whole connection (several streams: an upload and its status calls).
pub const HTTP2_CONNECTION_WINDOW: u32 = 8 << 20;
