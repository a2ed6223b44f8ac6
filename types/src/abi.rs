//! The C ABI between the kiln server and a plugin library.
//!
//! Everything here is `#[repr(C)]`: raw pointers, lengths and integers. No Rust-layout type
//! (`String`, `Vec`, trait objects) ever crosses the boundary, because the server and each plugin
//! are compiled separately and each carries its own copy of std and its own allocator.
//!
//! Ownership rules:
//! - [`KilnStr`] is a borrowed view, valid only for the duration of the call it is passed to.
//! - [`KilnBuf`] is memory allocated by the plugin. The server reads it and hands it back through
//!   the plugin's [`SYM_FREE_BUF`] export, which frees it with the plugin's own allocator.
//!
//! Any change to a type or a signature in this file must bump [`ABI_VERSION`]: the server checks
//! the version a library exports before it calls anything else in it.

use std::ffi::c_void;

/// Version of this interface. A library built against another version is refused on load.
/// History: 1 — first version; 2 — `kiln_configure` (config changes without a reload);
/// 3 — response headers as length-prefixed pairs, request header values as raw bytes, and the
/// description returned by `kiln_init` from the same route list the instance dispatches by
/// (`kiln_describe` is gone); 4 — the host table ([`KilnHost`]) passed to `kiln_init`; 5 —
/// request headers read through the host on demand ([`KilnHeaders`]) instead of copied into
/// pairs for every request, events ([`EventFn`], subscriptions in the description), and
/// services one plugin offers others ([`ServiceFn`], services in the description).
pub const ABI_VERSION: u32 = 5;

/// Symbol: `extern "C" fn() -> u32`, returns the [`ABI_VERSION`] the library was built with.
pub const SYM_ABI_VERSION: &[u8] = b"kiln_abi_version\0";
/// Symbol: `extern "C" fn() -> KilnStr`, the kiln-types crate version (a static string).
pub const SYM_TYPES_VERSION: &[u8] = b"kiln_types_version\0";
/// Symbol: [`InitFn`].
pub const SYM_INIT: &[u8] = b"kiln_init\0";
/// Symbol: [`HandleFn`].
pub const SYM_HANDLE: &[u8] = b"kiln_handle\0";
/// Symbol: [`CleanupFn`].
pub const SYM_CLEANUP: &[u8] = b"kiln_cleanup\0";
/// Symbol: [`ConfigureFn`].
pub const SYM_CONFIGURE: &[u8] = b"kiln_configure\0";
/// Symbol: [`EventFn`].
pub const SYM_EVENT: &[u8] = b"kiln_event\0";
/// Symbol: [`ServiceFn`].
pub const SYM_SERVICE: &[u8] = b"kiln_service\0";
/// Symbol: [`FreeBufFn`].
pub const SYM_FREE_BUF: &[u8] = b"kiln_free_buf\0";

/// The call succeeded.
pub const STATUS_OK: i32 = 0;
/// The plugin panicked; the buffer holds the panic message (UTF-8).
pub const STATUS_PANIC: i32 = 1;
/// The plugin returned an error; the buffer holds its message (UTF-8).
pub const STATUS_ERROR: i32 = 2;
/// `kiln_configure` only: the plugin does not apply config changes in place; reload it.
pub const STATUS_RELOAD: i32 = 3;
/// A host call made after the instance it belongs to was retired: nothing was done.
pub const STATUS_RETIRED: i32 = 4;

/// Levels of [`KilnHost::log`].
pub const LOG_ERROR: u32 = 1;
pub const LOG_WARN: u32 = 2;
pub const LOG_INFO: u32 = 3;
pub const LOG_DEBUG: u32 = 4;
pub const LOG_TRACE: u32 = 5;

/// Logs `message` at `level` (`LOG_*`), with `fields` (a JSON object, or empty), under the
/// plugin's name. [`STATUS_OK`], [`STATUS_RETIRED`] or [`STATUS_ERROR`] (bad arguments).
pub type HostLogFn = unsafe extern "C" fn(ctx: *const c_void, level: u32, message: KilnStr, fields: KilnStr) -> i32;

/// Called by the host to hand a result to the plugin: copies `bytes` into the plugin's own
/// buffer `out` (so the plugin allocates and frees what it keeps).
pub type WriteFn = unsafe extern "C" fn(out: *mut c_void, bytes: KilnStr);

/// A host service call: `op` names it (`storage.get`, …), `args` is a JSON object. The answer
/// (a JSON value for [`STATUS_OK`]; `{"code": …, "message": …}` for [`STATUS_ERROR`]) is handed
/// over through `write(out, …)` before the call returns. [`STATUS_RETIRED`] writes nothing.
pub type HostCallFn =
    unsafe extern "C" fn(ctx: *const c_void, op: KilnStr, args: KilnStr, out: *mut c_void, write: WriteFn) -> i32;

/// The host's side of the boundary: functions a plugin calls, and the context they take. kiln
/// passes one to `kiln_init` for each instance. The table and its context stay valid until the
/// process exits, so a call from a thread the plugin left running is safe; once the instance is
/// retired, every call answers [`STATUS_RETIRED`]. Host functions are thread-safe and never
/// unwind.
#[repr(C)]
#[derive(Debug)]
pub struct KilnHost {
    /// The ABI version the host speaks (equal to the plugin's, or the plugin was not loaded).
    pub abi: u32,
    pub ctx: *const c_void,
    pub log: HostLogFn,
    pub call: HostCallFn,
}

/// `extern "C" fn() -> u32`
pub type AbiVersionFn = unsafe extern "C" fn() -> u32;
/// `extern "C" fn() -> KilnStr`
pub type TypesVersionFn = unsafe extern "C" fn() -> KilnStr;
/// Creates an instance from `config` (JSON), with `host` (valid until the process exits) as the
/// host of every call into it. On success writes the instance pointer to
/// `instance_out` and the plugin's description (JSON, see [`crate::PluginDescription`]) to
/// `description_out`: its routes are the list the instance dispatches by, so a request's route
/// index always means the route described. On failure writes the message to `err_out`.
pub type InitFn = unsafe extern "C" fn(
    host: *const KilnHost,
    config: KilnStr,
    instance_out: *mut *mut c_void,
    description_out: *mut KilnBuf,
    err_out: *mut KilnBuf,
) -> i32;
/// Handles one request with the instance. Every view in `req` lives for the call; `method`,
/// `path`, `query` and the parameters are UTF-8. On [`STATUS_PANIC`] the message is in `out.body`.
pub type HandleFn = unsafe extern "C" fn(instance: *mut c_void, req: *const KilnRequest, out: *mut KilnResponse) -> i32;
/// Gives a live instance a new configuration (JSON): [`STATUS_OK`] applied, [`STATUS_RELOAD`]
/// reload instead, [`STATUS_ERROR`]/[`STATUS_PANIC`] refused (message in `err_out`).
pub type ConfigureFn = unsafe extern "C" fn(instance: *mut c_void, config: KilnStr, err_out: *mut KilnBuf) -> i32;
/// Marks a subscription number of [`EventFn`] as one the instance made at runtime (the rest of
/// the number is the id it chose), not an index into its described subscriptions.
pub const RUNTIME_SUBSCRIPTION: u32 = 1 << 31;

/// Hands an event to the instance's subscription number `subscription` (its index in the
/// description's `subscriptions`, or [`RUNTIME_SUBSCRIPTION`] with the id of one it made at
/// runtime): `topic`, and `data` as JSON text, both valid for the call.
/// [`STATUS_OK`] handled; [`STATUS_ERROR`]/[`STATUS_PANIC`] not (message in `err_out`).
pub type EventFn = unsafe extern "C" fn(
    instance: *mut c_void,
    subscription: u32,
    topic: KilnStr,
    data: KilnStr,
    err_out: *mut KilnBuf,
) -> i32;
/// Runs the instance's service number `service` (its index in the description's `services`)
/// with `args` (JSON, valid for the call). [`STATUS_OK`]: its answer (JSON) is in `out`;
/// [`STATUS_ERROR`]/[`STATUS_PANIC`]: the message is.
pub type ServiceFn = unsafe extern "C" fn(instance: *mut c_void, service: u32, args: KilnStr, out: *mut KilnBuf) -> i32;
/// Runs the plugin's cleanup and frees the instance. The pointer is invalid afterwards.
pub type CleanupFn = unsafe extern "C" fn(instance: *mut c_void, err_out: *mut KilnBuf) -> i32;
/// Frees a buffer the plugin returned. The host may call it from any thread, concurrently with
/// other calls, and after the instance's cleanup (a response body is freed once it has been
/// written to the client): it must only return the buffer to the allocator it came from, which
/// must outlive every instance (the process's global allocator, as the SDK does).
pub type FreeBufFn = unsafe extern "C" fn(buf: KilnBuf);

/// A borrowed byte string: valid for the duration of one call. Making one is safe; reading
/// through one ([`KilnStr::as_bytes`]) is where the promise is needed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnStr {
    pub ptr: *const u8,
    pub len: usize,
}

impl KilnStr {
    /// A view of `bytes`; the caller keeps `bytes` alive while the view is used.
    pub fn new(bytes: &[u8]) -> Self {
        Self { ptr: bytes.as_ptr(), len: bytes.len() }
    }

    /// A view of a static string (always valid).
    pub const fn from_static(s: &'static str) -> Self {
        Self { ptr: s.as_ptr(), len: s.len() }
    }

    /// The bytes this view points at.
    ///
    /// # Safety
    /// `ptr` must point at `len` initialized bytes that stay valid and unmodified for `'a`.
    pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: guaranteed by the caller; the zero-length case (where `ptr` may be null or
        // dangling) is handled above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A borrowed (name, value) pair: a path parameter or a header.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnPair {
    pub name: KilnStr,
    pub value: KilnStr,
}

/// One HTTP request, as the server hands it to a plugin. All views are valid during the call.
#[repr(C)]
#[derive(Debug)]
pub struct KilnRequest {
    /// Index of the matched route in the plugin's route list (as described by `kiln_init`).
    pub route: u32,
    /// HTTP method, upper case (UTF-8).
    pub method: KilnStr,
    /// Request path (UTF-8), without the query string.
    pub path: KilnStr,
    /// Raw query string (UTF-8), without the leading `?`; empty when absent.
    pub query: KilnStr,
    /// Path parameters of the matched route.
    pub params: *const KilnPair,
    pub params_len: usize,
    /// Request headers, read through the host when the handler asks: nothing is copied for a
    /// request whose handler reads none.
    pub headers: KilnHeaders,
    /// Request body.
    pub body: KilnStr,
}

/// Finds the first value of header `name` (ASCII case ignored): writes a view of it to `value`
/// and returns 1, or returns 0 when there is none. The view lives for the request's call.
pub type HeaderGetFn = unsafe extern "C" fn(ctx: *const c_void, name: KilnStr, value: *mut KilnStr) -> i32;
/// Receives one header from [`HeaderEachFn`]: `state` is the caller's, the views live for the
/// request's call. Must not unwind.
pub type HeaderVisitFn = unsafe extern "C" fn(state: *mut c_void, name: KilnStr, value: KilnStr);
/// Calls `visit(state, name, value)` for every header, in the request's order, before returning.
pub type HeaderEachFn = unsafe extern "C" fn(ctx: *const c_void, state: *mut c_void, visit: HeaderVisitFn);

/// The request's headers, as the host keeps them: names lower case (ASCII), values the raw bytes
/// the client sent (any bytes but CR, LF and NUL; not necessarily UTF-8). Valid for the call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnHeaders {
    pub ctx: *const c_void,
    pub get: HeaderGetFn,
    pub each: HeaderEachFn,
}

impl KilnHeaders {
    /// No headers.
    pub const NONE: KilnHeaders = KilnHeaders { ctx: std::ptr::null(), get: none_get, each: none_each };

    /// Headers over a slice of pairs (names in any case), for hosts that call handlers directly
    /// (tests, a statically linked baseline). `pairs` (a reference to the slice reference, so
    /// the context is one thin pointer) must outlive every use of the result.
    pub fn over_pairs(pairs: &&[KilnPair]) -> Self {
        Self { ctx: pairs as *const &[KilnPair] as *const c_void, get: pairs_get, each: pairs_each }
    }
}

unsafe extern "C" fn none_get(_: *const c_void, _: KilnStr, _: *mut KilnStr) -> i32 {
    0
}

unsafe extern "C" fn none_each(_: *const c_void, _: *mut c_void, _: HeaderVisitFn) {}

/// # Safety
/// `ctx` comes from [`KilnHeaders::over_pairs`], whose slice is alive, as are its views.
unsafe extern "C" fn pairs_get(ctx: *const c_void, name: KilnStr, value: *mut KilnStr) -> i32 {
    // SAFETY: `ctx` points at a live `&[KilnPair]` (the caller); `name` lives for the call.
    let (pairs, name) = unsafe { (*(ctx as *const &[KilnPair]), name.as_bytes()) };
    // SAFETY: every view in the pairs is alive (the caller).
    match pairs.iter().find(|p| unsafe { p.name.as_bytes() }.eq_ignore_ascii_case(name)) {
        Some(p) => {
            // SAFETY: `value` is valid for a write (HeaderGetFn's contract).
            unsafe { value.write(p.value) };
            1
        }
        None => 0,
    }
}

/// # Safety
/// As [`pairs_get`]; `visit` with `state` as [`HeaderEachFn`] says.
unsafe extern "C" fn pairs_each(ctx: *const c_void, state: *mut c_void, visit: HeaderVisitFn) {
    // SAFETY: `ctx` points at a live `&[KilnPair]` (the caller).
    let pairs = unsafe { *(ctx as *const &[KilnPair]) };
    for p in pairs {
        // SAFETY: the visitor takes the state it was given with views alive for the call.
        unsafe { visit(state, p.name, p.value) };
    }
}

/// A byte buffer allocated by the plugin (the parts of a `Vec<u8>`), freed by its `kiln_free_buf`.
#[repr(C)]
#[derive(Debug)]
pub struct KilnBuf {
    pub ptr: *mut u8,
    pub len: usize,
    pub cap: usize,
}

impl KilnBuf {
    /// The empty buffer: nothing to free.
    pub const EMPTY: KilnBuf = KilnBuf { ptr: std::ptr::null_mut(), len: 0, cap: 0 };

    /// Gives up ownership of `v` into a buffer; [`KilnBuf::into_vec`] takes it back.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let mut v = std::mem::ManuallyDrop::new(v);
        Self { ptr: v.as_mut_ptr(), len: v.len(), cap: v.capacity() }
    }

    /// Takes back a buffer made by [`KilnBuf::from_vec`].
    ///
    /// # Safety
    /// `self` must come from `from_vec` in the same library (same allocator), not be used again.
    pub unsafe fn into_vec(self) -> Vec<u8> {
        if self.ptr.is_null() {
            return Vec::new();
        }
        // SAFETY: the caller guarantees these are the parts of a Vec<u8> leaked by `from_vec`
        // with this library's allocator.
        unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) }
    }

    /// The bytes in the buffer.
    ///
    /// # Safety
    /// The buffer must be live (not yet freed).
    pub unsafe fn as_bytes(&self) -> &[u8] {
        if self.ptr.is_null() || self.len == 0 {
            return &[];
        }
        // SAFETY: a live buffer holds `len` initialized bytes at `ptr` (from a Vec).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A response written by the plugin. `headers` holds (name, value) pairs, each part prefixed by
/// its length (see [`encode_headers`]): a value can hold any byte without creating a header.
#[repr(C)]
#[derive(Debug)]
pub struct KilnResponse {
    pub status: u16,
    pub headers: KilnBuf,
    pub body: KilnBuf,
}

impl KilnResponse {
    /// A response with nothing allocated.
    pub const EMPTY: KilnResponse = KilnResponse { status: 0, headers: KilnBuf::EMPTY, body: KilnBuf::EMPTY };
}

/// Encodes header pairs for [`KilnResponse::headers`]: for each pair, the name's length (`u32`,
/// native byte order), the name, the value's length, the value.
pub fn encode_headers<'a, I>(pairs: I) -> Vec<u8>
where
    I: IntoIterator<Item = HeaderPair<'a>>,
    I::IntoIter: Clone,
{
    let pairs = pairs.into_iter();
    // Sized once: growing from empty would reallocate several times for a single header.
    let mut out = Vec::with_capacity(pairs.clone().map(|(n, v)| 8 + n.len() + v.len()).sum());
    for (name, value) in pairs {
        for part in [name, value] {
            // A part over 4 GiB cannot be a header; it is cut, and the host refuses the result.
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_ne_bytes());
            out.extend_from_slice(&part[..len as usize]);
        }
    }
    out
}

/// A (name, value) header pair, as bytes.
pub type HeaderPair<'a> = (&'a [u8], &'a [u8]);

/// Decodes what [`encode_headers`] wrote. `Err` names what is malformed.
pub fn decode_headers(raw: &[u8]) -> Result<Vec<HeaderPair<'_>>, String> {
    HeaderPairs::new(raw).collect()
}

/// The pairs [`encode_headers`] wrote, read in place one by one; a malformed part yields one
/// `Err` naming it, and ends the pairs.
#[derive(Debug, Clone)]
pub struct HeaderPairs<'a> {
    raw: &'a [u8],
}

impl<'a> HeaderPairs<'a> {
    pub fn new(raw: &'a [u8]) -> Self {
        Self { raw }
    }

    fn part(&mut self) -> Result<&'a [u8], &'static str> {
        let (len, rest) = self.raw.split_first_chunk::<4>().ok_or("a header length is cut short")?;
        let len = u32::from_ne_bytes(*len) as usize;
        let (value, rest) = rest.split_at_checked(len).ok_or("a header is cut short")?;
        self.raw = rest;
        Ok(value)
    }
}

impl<'a> Iterator for HeaderPairs<'a> {
    type Item = Result<HeaderPair<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.raw.is_empty() {
            return None;
        }
        let pair = self.part().and_then(|name| Ok((name, self.part()?)));
        if pair.is_err() {
            self.raw = &[];
        }
        Some(pair.map_err(str::to_string))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_pairs_round_trip_whatever_their_bytes() {
        let pairs: Vec<HeaderPair> =
            vec![(b"x-a", b"x\nset-cookie\nsession=attacker"), (b"", b""), (b"x-b", "José".as_bytes())];
        let encoded = encode_headers(pairs.iter().copied());
        assert_eq!(decode_headers(&encoded).unwrap(), pairs, "a separator in a value is just a byte");
        assert!(decode_headers(&encoded[..encoded.len() - 1]).is_err());
        assert!(decode_headers(&[1, 0]).is_err());
    }
}
