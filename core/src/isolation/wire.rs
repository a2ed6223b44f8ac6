//! The framing between kiln and a plugin host process: one frame is a little-endian `u32`
//! length (of what follows), a kind byte, a `u32` call id, the `u16` CPU the sender ran on when
//! it sent the frame, and a body of fixed-size integers and length-prefixed byte strings. The
//! id matters on the multiplexed connection (`hub`, `mux`), where calls, their host calls and
//! their replies interleave; elsewhere it is 0. The CPU tells the receiver whether polling for
//! the sender's next frame could pay (see `spin`). Both ends are this binary, so the format carries no version:
//! a child is always the same `kiln` as its parent.

use std::io::{self, Read, Write};

/// Parent → child: create the instance. `[config]`.
pub const INIT: u8 = 1;
/// Parent → child: one request. `[route u32][method][path][query][params][headers][body]`,
/// where params and headers are a `u32` count of (name, value) pairs.
pub const HANDLE: u8 = 2;
/// Parent → child: a [`HANDLE`] whose client sends its requests one after another (no other
/// request was in flight in kiln for a while): the child polls for the next call after its
/// reply (see `spin`).
pub const HANDLE_THEN_POLL: u8 = 7;
/// Parent → child: `[config]`.
pub const CONFIGURE: u8 = 3;
/// Parent → child: `[subscription u32][topic][data]`.
pub const EVENT: u8 = 4;
/// Parent → child: `[service u32][args]`.
pub const SERVICE: u8 = 5;
/// Parent → child: run the cleanup; the child exits after its reply.
pub const CLEANUP: u8 = 6;
/// Parent → child, the first frame of a connection: make it the multiplexed one (`hub`),
/// where requests and their host calls carry their call's id. No reply.
pub const MUX: u8 = 8;
/// Child → parent, during a call (or on the side connection): `[level u32][message][fields]`.
pub const HOST_LOG: u8 = 10;
/// Child → parent: `[op][args]`.
pub const HOST_CALL: u8 = 11;
/// Either way, the answer to the frame before: `[status i32][http u16][a][b]`.
pub const REPLY: u8 = 20;
/// A reply status of the child's: it could not take the call (no thread for it) and closes
/// the connection.
pub const STATUS_BUSY: i32 = -100;
/// The largest host call the parent reads from a child.
pub const MAX_HOST_FRAME: usize = 64 << 20;

/// The largest frame either side accepts (a request body is bounded by `--max-body` before).
pub const MAX_FRAME: usize = 1 << 30;

/// The header's length: the length, the kind, the id, the CPU.
const HEAD: usize = 11;

/// A frame's header, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub kind: u8,
    pub id: u32,
    /// The CPU its sender ran on ([`NO_CPU`] if unknown).
    pub cpu: u16,
}

/// The CPU of a frame whose sender did not know its own.
pub const NO_CPU: u16 = u16::MAX;

/// The CPU this thread runs on now ([`NO_CPU`] if unknown).
pub fn current_cpu() -> u16 {
    // SAFETY: sched_getcpu has no preconditions.
    u16::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(NO_CPU)
}

/// A frame being written: the header is filled in by [`Frame::send`].
#[derive(Debug)]
pub struct Frame {
    buf: Vec<u8>,
}

impl Frame {
    pub fn new(kind: u8) -> Self {
        Self::with_capacity(kind, 64)
    }

    pub fn with_capacity(kind: u8, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(HEAD + capacity);
        buf.extend_from_slice(&[0, 0, 0, 0, kind, 0, 0, 0, 0, 0, 0]);
        Self { buf }
    }

    /// The frame with call id `id` (0 unless set).
    pub fn tag(mut self, id: u32) -> Self {
        self.buf[5..9].copy_from_slice(&id.to_le_bytes());
        self
    }

    /// Its size in bytes, header included.
    pub fn size(&self) -> usize {
        self.buf.len()
    }

    /// Its kind.
    pub fn kind(&self) -> u8 {
        self.buf[4]
    }

    /// Makes it a frame of kind `kind`.
    pub fn set_kind(&mut self, kind: u8) {
        self.buf[4] = kind;
    }

    pub fn u16(mut self, v: u16) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(mut self, v: u32) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn i32(mut self, v: i32) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A byte string: its length (`u32`), then the bytes.
    pub fn bytes(mut self, v: &[u8]) -> Self {
        let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&v[..len as usize]);
        self
    }

    /// A count of pairs, then each pair.
    pub fn pairs<'a>(mut self, pairs: impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        self = self.u32(pairs.len() as u32);
        for (n, v) in pairs {
            self = self.bytes(n).bytes(v);
        }
        self
    }

    /// A reply: `[status][http][a][b]`.
    pub fn reply(status: i32, http: u16, a: &[u8], b: &[u8]) -> Self {
        Self::with_capacity(REPLY, 14 + a.len() + b.len()).i32(status).u16(http).bytes(a).bytes(b)
    }

    /// Writes the frame in one `write_all`.
    pub fn send(self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.into_bytes()?)
    }

    /// The frame's bytes, its length and the CPU filled in.
    pub fn into_bytes(mut self) -> io::Result<Vec<u8>> {
        let len = u32::try_from(self.buf.len() - 4).map_err(|_| invalid("a frame over 4 GiB"))?;
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.buf[9..HEAD].copy_from_slice(&current_cpu().to_le_bytes());
        Ok(self.buf)
    }
}

/// Reads one frame into `body` (replacing what it held) and returns its kind. An end of stream
/// before a frame is `UnexpectedEof`. The body grows as its bytes arrive: a length alone
/// allocates nothing.
pub fn read_frame(r: &mut impl Read, body: &mut Vec<u8>) -> io::Result<u8> {
    read_frame_within(r, body, MAX_FRAME).map(|head| head.kind)
}

/// [`read_frame`], refusing a frame over `max` bytes: its header.
pub fn read_frame_within(r: &mut impl Read, body: &mut Vec<u8>, max: usize) -> io::Result<Head> {
    let mut head = [0u8; HEAD];
    r.read_exact(&mut head)?;
    let want = body_len(&head, max)?;
    body.clear();
    if r.take(want).read_to_end(body)? as u64 != want {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "a frame cut short"));
    }
    Ok(parse_head(&head))
}

fn parse_head(head: &[u8; HEAD]) -> Head {
    Head {
        kind: head[4],
        id: u32::from_le_bytes([head[5], head[6], head[7], head[8]]),
        cpu: u16::from_le_bytes([head[9], head[10]]),
    }
}

/// The length of the body a frame's header announces (the length counts the kind and the id).
fn body_len(head: &[u8; HEAD], max: usize) -> io::Result<u64> {
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len < HEAD - 4 || len > max {
        return Err(invalid("a frame of an impossible length"));
    }
    Ok((len - (HEAD - 4)) as u64)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// The first frame of `pending`, if it holds all of it: its header, where its body lies, and
/// its whole length. A header that announces more than `max` bytes is an error.
pub fn split_frame(pending: &[u8], max: usize) -> io::Result<Option<(Head, std::ops::Range<usize>, usize)>> {
    let Some(head) = pending.first_chunk::<HEAD>() else { return Ok(None) };
    let body = body_len(head, max)? as usize;
    if pending.len() < HEAD + body {
        return Ok(None);
    }
    Ok(Some((parse_head(head), HEAD..HEAD + body, HEAD + body)))
}

/// Reads the fields of a frame's body in order.
#[derive(Debug)]
pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(body: &'a [u8]) -> Self {
        Self { rest: body }
    }

    fn take<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let (head, rest) = self.rest.split_first_chunk::<N>().ok_or_else(|| invalid("a frame cut short"))?;
        self.rest = rest;
        Ok(*head)
    }

    pub fn u16(&mut self) -> io::Result<u16> {
        self.take().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> io::Result<u32> {
        self.take().map(u32::from_le_bytes)
    }

    pub fn i32(&mut self) -> io::Result<i32> {
        self.take().map(i32::from_le_bytes)
    }

    pub fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let len = self.u32()? as usize;
        let (v, rest) = self.rest.split_at_checked(len).ok_or_else(|| invalid("a frame cut short"))?;
        self.rest = rest;
        Ok(v)
    }

    pub fn pairs(&mut self) -> io::Result<Vec<(&'a [u8], &'a [u8])>> {
        let n = self.u32()? as usize;
        // Each pair takes at least 8 bytes: a count beyond that is a lie, not an allocation.
        if n > self.rest.len() / 8 {
            return Err(invalid("a frame cut short"));
        }
        (0..n).map(|_| Ok((self.bytes()?, self.bytes()?))).collect()
    }

    /// A reply's fields.
    pub fn reply(&mut self) -> io::Result<Reply<'a>> {
        Ok(Reply { status: self.i32()?, http: self.u16()?, a: self.bytes()?, b: self.bytes()? })
    }
}

/// The fields of a [`REPLY`].
#[derive(Debug)]
pub struct Reply<'a> {
    pub status: i32,
    pub http: u16,
    pub a: &'a [u8],
    pub b: &'a [u8],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_lies_are_refused() {
        let mut out = Vec::new();
        let pairs = [(&b"a"[..], &b"1"[..]), (&b""[..], &b"\0\n"[..])];
        Frame::new(HANDLE).u32(7).bytes(b"GET").pairs(pairs.iter().copied()).send(&mut out).unwrap();
        Frame::reply(-1, 404, b"x", b"").tag(9).send(&mut out).unwrap();
        let (mut r, mut body) = (&out[..], Vec::new());
        assert_eq!(read_frame(&mut r, &mut body).unwrap(), HANDLE);
        let mut f = Fields::new(&body);
        assert_eq!((f.u32().unwrap(), f.bytes().unwrap()), (7, &b"GET"[..]));
        assert_eq!(f.pairs().unwrap(), pairs);
        assert!(f.u32().is_err(), "nothing is left");
        let head = read_frame_within(&mut r, &mut body, MAX_FRAME).unwrap();
        assert_eq!((head.kind, head.id, head.cpu), (REPLY, 9, current_cpu()));
        let reply = Fields::new(&body).reply().unwrap();
        assert_eq!((reply.status, reply.http, reply.a, reply.b), (-1, 404, &b"x"[..], &b""[..]));
        assert_eq!(read_frame(&mut r, &mut body).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let lie = Frame::new(HANDLE).u32(u32::MAX);
        let mut lie_out = Vec::new();
        lie.send(&mut lie_out).unwrap();
        read_frame(&mut &lie_out[..], &mut body).unwrap();
        assert!(Fields::new(&body).pairs().is_err(), "a count larger than the frame is refused");
        assert!(read_frame(&mut &[4u8, 0, 0, 0, 1, 0, 0, 0, 0][..], &mut body).is_err(), "a frame without its CPU");
    }
}
