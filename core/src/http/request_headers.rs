//! A request's headers as a plugin reads them: the host functions of [`KilnHeaders`] over the
//! request's own header map, so nothing is copied for a handler that reads no header.

use kiln_types::abi::{HeaderVisitFn, KilnHeaders, KilnStr};
use poem::http::HeaderMap;
use std::ffi::c_void;

/// The headers of `map`, for one call: `map` must outlive it (the caller borrows it across the
/// call, which is what [`KilnHeaders`] promises the plugin).
pub fn over(map: &HeaderMap) -> KilnHeaders {
    KilnHeaders { ctx: map as *const HeaderMap as *const c_void, get, each }
}

/// # Safety
/// `ctx` comes from [`over`] and its map is alive; `name` is a live view; `value` is valid for
/// a write. Never unwinds: nothing in it panics.
unsafe extern "C" fn get(ctx: *const c_void, name: KilnStr, value: *mut KilnStr) -> i32 {
    // SAFETY: the caller's contract (above).
    let (map, name) = unsafe { (&*(ctx as *const HeaderMap), name.as_bytes()) };
    // A name that is not UTF-8 is no header name. `get` by `&str` matches any case without
    // allocating.
    let Some(found) = std::str::from_utf8(name).ok().and_then(|n| map.get(n)) else {
        return 0;
    };
    // SAFETY: as above; the view points into the map, which lives for the call.
    unsafe { value.write(KilnStr::new(found.as_bytes())) };
    1
}

/// # Safety
/// `ctx` comes from [`over`] and its map is alive; `visit` takes `state` (the plugin's).
unsafe extern "C" fn each(ctx: *const c_void, state: *mut c_void, visit: HeaderVisitFn) {
    // SAFETY: the caller's contract (above).
    let map = unsafe { &*(ctx as *const HeaderMap) };
    for (name, value) in map {
        // SAFETY: the views point into the map, alive for the call; `visit` does not unwind
        // (HeaderVisitFn's contract).
        unsafe { visit(state, KilnStr::new(name.as_str().as_bytes()), KilnStr::new(value.as_bytes())) };
    }
}
