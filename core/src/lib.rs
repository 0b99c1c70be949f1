//! The Stagely core: HTTP API, agent endpoint, scheduler, persistence, and the `stagely` CLI.
//!
//! Entry points: [`server::start`] runs a core on a listener; [`cli`] implements the
//! `stagely` commands (`serve`, `run`, `submit`, `status`, `logs`, `cancel`).

pub mod admission;
pub mod agent_link;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod cost;
pub mod gate;
pub mod image_check;
pub mod images;
pub mod log_hub;
pub mod registry;
pub mod repo_url;
pub mod run_events;
pub mod runner;
pub mod server;
pub mod source;
pub mod stagely_yaml;
pub mod terminal;
pub mod tls;

/// The workflow engine, its own crate (`stagely-engine`): no I/O, no clock, no tokio.
pub use stagely_engine as engine;

/// The store, its own crate (`stagely-store`): the only one that knows SQL.
pub use stagely_store as db;
