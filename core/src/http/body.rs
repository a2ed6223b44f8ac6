//! Reading request bodies without trusting the client: a body declared larger than allowed is
//! refused before a byte of it is read, and a body that stops arriving is given up on.

use super::error::json_error;
use crate::error_code::ErrorCode;
use poem::http::header;
use poem::{Request, Response};
use std::time::Duration;

/// Whether `req` declares a body (a `Content-Length` or a `Transfer-Encoding`): without either
/// it has none (RFC 9112 §6.3).
pub fn declared(req: &Request) -> bool {
    req.headers().contains_key(header::CONTENT_LENGTH) || req.headers().contains_key(header::TRANSFER_ENCODING)
}

/// The whole body of `req`, at most `limit` bytes, read within `timeout`. `Ok(None)` when the
/// request declares no body (RFC 9112 §6.3: then it has none, and reading would cost a poll of
/// the connection for nothing). `Err` is the answer to give instead.
pub async fn read(req: &mut Request, limit: usize, timeout: Duration) -> Result<Option<bytes::Bytes>, Response> {
    let declared =
        req.headers().get(header::CONTENT_LENGTH).map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));
    match declared {
        Some(None) => return Err(json_error(ErrorCode::BadRequest, "the Content-Length is not a number")),
        Some(Some(n)) if n > limit as u64 => {
            return Err(json_error(
                ErrorCode::BodyTooLarge,
                &format!("the body is {n} bytes; at most {limit} are accepted"),
            ));
        }
        Some(Some(_)) => {}
        None if !req.headers().contains_key(header::TRANSFER_ENCODING) => return Ok(None),
        None => {}
    }
    match tokio::time::timeout(timeout, req.take_body().into_bytes_limit(limit)).await {
        Ok(Ok(bytes)) => Ok(Some(bytes)),
        Ok(Err(poem::error::ReadBodyError::PayloadTooLarge)) => {
            Err(json_error(ErrorCode::BodyTooLarge, &format!("the body is larger than {limit} bytes")))
        }
        Ok(Err(e)) => Err(json_error(ErrorCode::BadRequest, &format!("the body could not be read: {e}"))),
        Err(_) => Err(json_error(ErrorCode::RequestTimeout, &format!("the body did not arrive within {timeout:?}"))),
    }
}
