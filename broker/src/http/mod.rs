//! The HTTP side: the listener (TLS, limits), authentication, the memory budget, the REST
//! and FHIR write routes, the operator API and the metrics route.

pub mod api;
pub mod auth;
pub mod budget;
pub mod fhir;
pub mod idempotency;
pub mod server;
