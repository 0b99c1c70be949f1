//! The `stagely` binary: its commands ([`cli`]: `serve`, `run`, `submit`, `status`, `logs`,
//! `cancel`, `token`), the terminal they print to, and the throwaway registry of `stagely run`.
//! The service itself is `stagely-server`; `serve` hands over to [`stagely_server::server::run`].

pub mod cli;
pub mod client;
pub mod registry;
pub mod run;
pub mod terminal;
