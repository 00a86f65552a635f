//! End-to-end tests: real `antnest` processes, real wasmtime, real libp2p
//! over loopback (and veth namespaces for mDNS). One binary, as in
//! wasmtime's `tests/all`.

#[path = "../../examples/common/bridge.rs"]
#[allow(dead_code)] // the benchmark's traffic counters
mod bridge;
mod chaos;
mod common;
mod hostile;
mod jobs;
mod mesh;
mod nat;
mod native;
mod sandbox;
mod scale;
mod share;
mod trust;
mod ui;
mod ux;
