//! The ketenbus broker: configuration, the log engines, the router that normalises raw
//! envelopes into events, dispatch to subscriptions, the HTTP API and dead-letter tools.
//! `main.rs` is the command line around [`runtime::run`].

pub mod bus;
pub mod cli;
pub mod config;
pub mod deliver;
pub mod env;
#[cfg(debug_assertions)]
pub mod fault;
pub mod http;
pub mod ingest;
pub mod observe;
pub mod route;
pub mod runtime;
pub mod tls;
