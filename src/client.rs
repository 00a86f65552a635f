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

/// Connect to the control socket at `socket`, if it is this user's own: a
/// socket another user made (say in /tmp, where anyone may) would be
/// handed this user's jobs and inputs.
pub async fn connect(socket: &Path) -> std::io::Result<Connection> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let owner = std::fs::symlink_metadata(socket)?.uid();
    if owner != me {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {owner}, not to this user (uid {me}): not using it",
                socket.display()
            ),
        ));
    }
    Ok(UnixStream::connect(socket).await?.compat())
}
