//! The JSON side of the gateway: reading request bodies within limits, decoding protojson,
//! and answering with etcd's response and error shapes.
//!
//! Errors follow etcd 3.5's gateway (grpc-gateway v1): the HTTP status comes from the gRPC
//! code (`runtime.HTTPStatusFromCode`) and the body is `{"error":m,"code":c,"message":m}`.
//! An error in the middle of a stream, after the 200 has gone out, is one more line shaped
//! `{"error":{"grpc_code":c,"http_code":h,"message":m,"http_status":"..."}}`.

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Code, Status};

/// Size limits of gateway requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest decoded request message, as the gRPC receive limit
    /// (`--max-request-bytes` plus etcd's gRPC overhead allowance).
    pub max_message_bytes: usize,
    /// The largest JSON body read: base64 grows bytes by a third and JSON adds syntax, so
    /// this is twice the message limit. Larger bodies are refused before they are buffered.
    pub max_body_bytes: usize,
}

impl Limits {
    /// Limits for a gRPC receive limit of `max_message_bytes`.
    pub fn for_message_limit(max_message_bytes: usize) -> Limits {
        Limits { max_message_bytes, max_body_bytes: max_message_bytes.saturating_mul(2) }
    }
}

/// The HTTP status grpc-gateway v1 (etcd 3.5) answers for a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The body of a failed unary call.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    code: i32,
    message: &'a str,
}

/// The body of an error that ends a stream.
#[derive(Serialize)]
struct StreamErrorBody<'a> {
    error: StreamError<'a>,
}

#[derive(Serialize)]
struct StreamError<'a> {
    grpc_code: i32,
    http_code: u16,
    message: &'a str,
    http_status: &'a str,
}

/// A response with a JSON body.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// The response for a failed call: etcd's status and `{"error","code","message"}` body.
pub fn error_response(status: &Status) -> Response<Body> {
    let body = ErrorBody {
        error: status.message(),
        code: status.code() as i32,
        message: status.message(),
    };
    // Serializing two strings and an integer cannot fail; an empty body is the fallback.
    json_response(http_status(status.code()), serde_json::to_vec(&body).unwrap_or_default())
}

/// The response for a successful unary call: the message as protojson.
pub fn message_response<T: Serialize>(msg: &T) -> Response<Body> {
    match serde_json::to_vec(msg) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => error_response(&Status::internal(format!("cannot encode response: {e}"))),
    }
}

/// One line of a streaming response: `{"result": msg}` and a newline.
pub fn result_line<T: Serialize>(msg: &T) -> Bytes {
    #[derive(Serialize)]
    struct Line<'a, T> {
        result: &'a T,
    }
    match serde_json::to_vec(&Line { result: msg }) {
        Ok(mut line) => {
            line.push(b'\n');
            Bytes::from(line)
        }
        Err(e) => error_line(&Status::internal(format!("cannot encode response: {e}"))),
    }
}

/// The line that ends a stream with `status`.
pub fn error_line(status: &Status) -> Bytes {
    let http = http_status(status.code());
    let body = StreamErrorBody {
        error: StreamError {
            grpc_code: status.code() as i32,
            http_code: http.as_u16(),
            message: status.message(),
            http_status: http.canonical_reason().unwrap_or(""),
        },
    };
    let mut line = serde_json::to_vec(&body).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// A status for a body that is not valid protojson for the request type.
pub fn bad_json(e: &serde_json::Error) -> Status {
    Status::invalid_argument(e.to_string())
}

/// A status for a message past the gRPC receive limit, worded as grpc-go words it.
pub fn too_large(len: usize, max: usize) -> Status {
    Status::resource_exhausted(format!("grpc: received message larger than max ({len} vs. {max})"))
}

/// Reads the whole body, refusing more than `limits.max_body_bytes`.
///
/// # Errors
/// `ResourceExhausted` past the limit; `InvalidArgument` when the body cannot be read.
pub async fn read_body(body: Body, limits: Limits) -> Result<Bytes, Status> {
    let limited = http_body_util::Limited::new(body, limits.max_body_bytes);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Status::resource_exhausted(
            format!("request body larger than max ({} bytes)", limits.max_body_bytes),
        )),
        Err(e) => Err(Status::invalid_argument(format!("cannot read request body: {e}"))),
    }
}

/// Decodes one request message from `bytes`; an empty body is the empty message (as etcd's
/// gateway treats it), and the decoded message must fit the gRPC receive limit.
///
/// # Errors
/// `InvalidArgument` for malformed JSON or wrong types, `ResourceExhausted` when too large.
pub fn decode<T>(bytes: &[u8], limits: Limits) -> Result<T, Status>
where
    T: DeserializeOwned + prost::Message + Default,
{
    let msg = if bytes.iter().all(u8::is_ascii_whitespace) {
        T::default()
    } else {
        serde_json::from_slice(bytes).map_err(|e| bad_json(&e))?
    };
    check_size(&msg, limits)?;
    Ok(msg)
}

/// Refuses a message whose encoding exceeds the gRPC receive limit.
///
/// # Errors
/// `ResourceExhausted`.
pub fn check_size<T: prost::Message>(msg: &T, limits: Limits) -> Result<(), Status> {
    let len = msg.encoded_len();
    if len > limits.max_message_bytes {
        return Err(too_large(len, limits.max_message_bytes));
    }
    Ok(())
}

/// Splits a byte stream into consecutive JSON values, as a client of a streaming endpoint
/// sends them (`{...}{...}` or one per line), decoding each as `T`.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
}

impl Splitter {
    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Decodes the next complete value, or `None` when more bytes are needed.
    ///
    /// # Errors
    /// Malformed JSON or a value of the wrong shape.
    pub fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, serde_json::Error> {
        let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<T>();
        match values.next() {
            None => {
                // Only whitespace is left.
                self.buf.clear();
                Ok(None)
            }
            Some(Ok(value)) => {
                let used = values.byte_offset();
                self.buf.drain(..used.min(self.buf.len()));
                Ok(Some(value))
            }
            Some(Err(e)) if e.is_eof() => Ok(None),
            Some(Err(e)) => Err(e),
        }
    }

    /// Checks, once the input ended and [`Splitter::next`] returned `None`, that nothing but
    /// whitespace is left.
    ///
    /// # Errors
    /// The decoder's "EOF while parsing" error for a truncated value.
    pub fn finish(&self) -> Result<(), serde_json::Error> {
        if self.buf.iter().all(u8::is_ascii_whitespace) {
            Ok(())
        } else {
            serde_json::from_slice::<serde::de::IgnoredAny>(&self.buf).map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::etcdserverpb as pb;

    const LIMITS: Limits = Limits { max_message_bytes: 1024, max_body_bytes: 2048 };

    #[test]
    fn requests_accept_both_field_spellings_and_ignore_unknown_fields() {
        let a: pb::RangeRequest =
            decode(br#"{"key":"Zm9v","count_only":true,"bogus":[1]}"#, LIMITS).unwrap();
        let b: pb::RangeRequest = decode(br#"{"key":"Zm9v","countOnly":true}"#, LIMITS).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.key, b"foo");
        assert!(a.count_only);
    }

    #[test]
    fn int64_fields_accept_strings_and_numbers_and_enums_accept_names_and_numbers() {
        let a: pb::RangeRequest =
            decode(br#"{"key":"YQ==","revision":"7","sort_order":"DESCEND"}"#, LIMITS).unwrap();
        let b: pb::RangeRequest =
            decode(br#"{"key":"YQ==","revision":7,"sortOrder":2}"#, LIMITS).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.revision, 7);
    }

    #[test]
    fn responses_use_proto_names_strings_for_int64_and_omit_zero_values() {
        let res = pb::RangeResponse {
            header: Some(pb::ResponseHeader {
                cluster_id: u64::MAX,
                revision: 2,
                ..Default::default()
            }),
            kvs: vec![cairn_proto::mvccpb::KeyValue {
                key: b"foo".to_vec(),
                create_revision: 2,
                ..Default::default()
            }],
            more: false,
            count: 1,
        };
        let text = String::from_utf8(serde_json::to_vec(&res).unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"header":{"cluster_id":"18446744073709551615","revision":"2"},"kvs":[{"key":"Zm9v","create_revision":"2"}],"count":"1"}"#
        );
        let members = pb::MemberListResponse {
            header: None,
            members: vec![pb::Member {
                id: 1,
                peer_ur_ls: vec!["http://a:1".into()],
                ..Default::default()
            }],
        };
        let text = String::from_utf8(serde_json::to_vec(&members).unwrap()).unwrap();
        assert_eq!(text, r#"{"members":[{"ID":"1","peerURLs":["http://a:1"]}]}"#);
    }

    #[test]
    fn malformed_bodies_and_wrong_types_are_invalid_arguments() {
        for body in [
            &br#"{bad"#[..],
            br#"{"key":1}"#,
            br#"{"key":"!!!"}"#,
            br#"[]"#,
            br#"{"sort_order":"NOPE"}"#,
        ] {
            let err = decode::<pb::RangeRequest>(body, LIMITS).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(decode::<pb::RangeRequest>(b"  ", LIMITS).unwrap(), pb::RangeRequest::default());
    }

    #[test]
    fn messages_past_the_receive_limit_are_resource_exhausted() {
        let body = format!(r#"{{"key":"YQ==","value":"{}"}}"#, "QUFB".repeat(400));
        let err = decode::<pb::PutRequest>(body.as_bytes(), LIMITS).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(err.message().starts_with("grpc: received message larger than max ("));
        assert_eq!(http_status(err.code()), StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn the_splitter_yields_values_as_they_complete() {
        let mut s = Splitter::default();
        s.push(br#"{"ID":"1"}{"ID""#);
        let first: Option<pb::LeaseKeepAliveRequest> = s.next().unwrap();
        assert_eq!(first.unwrap().id, 1);
        assert!(s.next::<pb::LeaseKeepAliveRequest>().unwrap().is_none());
        s.push(b":2}\n");
        assert_eq!(s.next::<pb::LeaseKeepAliveRequest>().unwrap().unwrap().id, 2);
        assert!(s.next::<pb::LeaseKeepAliveRequest>().unwrap().is_none());
        assert!(s.finish().is_ok());
        s.push(b"{\"ID\":");
        assert!(s.next::<pb::LeaseKeepAliveRequest>().unwrap().is_none());
        assert!(s.finish().is_err());
        let mut s = Splitter::default();
        s.push(b"{oops}");
        assert!(s.next::<pb::LeaseKeepAliveRequest>().is_err());
    }

    #[test]
    fn errors_carry_etcds_http_status_and_body() {
        let status = Status::new(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision",
        );
        let res = error_response(&status);
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        let line = String::from_utf8(error_line(&Status::unimplemented("x")).to_vec()).unwrap();
        assert_eq!(
            line,
            "{\"error\":{\"grpc_code\":12,\"http_code\":501,\"message\":\"x\",\"http_status\":\"Not Implemented\"}}\n"
        );
    }
}
