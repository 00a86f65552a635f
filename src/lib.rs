//! The `antnest` command's own parts, beside the crates it is built from
//! (`antnest-proto`: messages; `antnest-sandbox`: the wasm host;
//! `antnest-sched`: a job's scheduling; `antnest-node`: a running peer):
//!
//! - [`source`]: building job components from Rust crates and Python files.
//! - [`config`]: the bootstrap config file.
//! - [`client`]: talking to the peer on this machine through its control
//!   socket.

pub mod client;
pub mod config;
pub mod source;
