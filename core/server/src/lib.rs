//! The Stagely core service: the HTTP API and the agent endpoint ([`http`]), the runner that
//! boots instances and drives the engine ([`runner`]), the agent links ([`agent_link`]), the
//! log hub, run events, and the one submission path ([`submit`]).
//!
//! Entered through [`server::run`] (the `stagely serve` binary) or [`server::start`] (an
//! embedded core: `stagely run`, the tests), both on a listener the caller bound.

pub mod admission;
pub mod agent_link;
pub mod clock;
pub mod config;
pub mod cost;
pub mod gate;
pub mod http;
pub mod image_check;
pub mod images;
pub mod log_hub;
pub mod repo_url;
pub mod run_events;
pub mod runner;
pub mod server;
pub mod source;
pub mod stagely_yaml;
pub mod submit;
pub mod tls;
pub mod views;

/// The workflow engine, its own crate (`stagely-engine`): no I/O, no clock, no tokio.
pub use stagely_engine as engine;

/// The store, its own crate (`stagely-store`): the only one that knows SQL.
pub use stagely_store as db;

/// The API's requests, views and limits, their own crate (`stagely-api`).
pub use stagely_api as api;
