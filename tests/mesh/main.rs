//! End-to-end tests: real `antnest` processes, real wasmtime, real libp2p
//! over loopback (and veth namespaces for mDNS). One binary, as in
//! wasmtime's `tests/all`.

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
