//! The client side of the control socket: `antnest submit`, `jobs`,
//! `cancel` and `peers` connect to the peer on this machine and exchange
//! [`antnest_proto::control`] messages with it.

use std::path::Path;

use tokio::net::UnixStream;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt as _};

/// A connection to a peer's control socket, read and written with
/// [`antnest_proto::control::read_msg`] and
/// [`antnest_proto::control::write_msg`].
pub type Connection = Compat<UnixStream>;

/// Connect to the control socket at `socket`.
pub async fn connect(socket: &Path) -> std::io::Result<Connection> {
    Ok(UnixStream::connect(socket).await?.compat())
}
