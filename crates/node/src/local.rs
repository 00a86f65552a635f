//! A peer's local servers: the control socket that `antnest submit`,
//! `antnest jobs` and `antnest peers` talk to, and the web view
//! (`--ui`: a live page, JSON status, Prometheus metrics).

pub mod control;
pub mod http;
