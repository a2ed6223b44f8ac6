//! Calls over one connection to a child, from a thread: a call goes out, the child's host
//! calls are served on this thread (with its route and deadline) until the reply comes back.

use super::wire::{self, Fields, Frame};
use crate::host::HostCtx;
use std::io::{self, BufReader};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// A call that did not get its reply.
#[derive(Debug)]
pub(super) enum Broken {
    Timeout,
    Io(io::Error),
}

/// One connection to a child.
pub(super) struct Conn {
    pub(super) read: BufReader<UnixStream>,
    pub(super) write: UnixStream,
    pub(super) buf: Vec<u8>,
}

impl Conn {
    /// Sends a call and serves the child's host calls until its reply, which is left in `buf`.
    pub(super) fn call(&mut self, frame: Frame, host: &HostCtx, deadline: Instant) -> Result<(), Broken> {
        let left = || {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() { Err(Broken::Timeout) } else { Ok(left) }
        };
        self.write.set_write_timeout(Some(left()?)).map_err(Broken::Io)?;
        frame.send(&mut self.write).map_err(timeout_or_io)?;
        loop {
            self.read.get_ref().set_read_timeout(Some(left()?)).map_err(Broken::Io)?;
            let kind = wire::read_frame(&mut self.read, &mut self.buf).map_err(timeout_or_io)?;
            let answer = match kind {
                wire::REPLY => return Ok(()),
                wire::HOST_LOG | wire::HOST_CALL => serve_host_call(kind, &self.buf, host),
                _ => return Err(Broken::Io(io::Error::new(io::ErrorKind::InvalidData, "an unexpected frame"))),
            };
            self.write.set_write_timeout(Some(left()?)).map_err(Broken::Io)?;
            answer.send(&mut self.write).map_err(timeout_or_io)?;
        }
    }
}

pub(super) fn timeout_or_io(e: io::Error) -> Broken {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Broken::Timeout,
        _ => Broken::Io(e),
    }
}

/// Serves one host call of the child's, on the thread the call came in on. Never unwinds: a
/// panic is a refused call.
pub(super) fn serve_host_call(kind: u8, body: &[u8], host: &HostCtx) -> Frame {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| host_call(kind, body, host)))
        .unwrap_or_else(|_| Frame::reply(kiln_types::abi::STATUS_ERROR, 0, b"", b""))
}

fn host_call(kind: u8, body: &[u8], host: &HostCtx) -> Frame {
    let mut f = Fields::new(body);
    let bad = || Frame::reply(kiln_types::abi::STATUS_ERROR, 0, b"", b"");
    if kind == wire::HOST_LOG {
        let Ok((level, message, fields)) = (|| Ok::<_, io::Error>((f.u32()?, f.bytes()?, f.bytes()?)))() else {
            return bad();
        };
        return Frame::reply(host.log(level, message, fields), 0, b"", b"");
    }
    let Ok((op, args)) = (|| Ok::<_, io::Error>((f.bytes()?, f.bytes()?)))() else { return bad() };
    let (status, answer) = host.call(op, args);
    Frame::reply(status, 0, answer.as_deref().unwrap_or_default(), b"")
}
