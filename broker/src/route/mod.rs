//! The router: raw envelopes normalised into events, CONTRL replies, bounces; and the
//! patient keys that partition events.

pub mod coverage;
pub mod edifact;
pub mod inspect;
pub mod keys;
pub mod normalise;
pub mod router;
