//! Streaming calls through the gateway: a bidirectional RPC (Watch, LeaseKeepAlive) reads
//! consecutive JSON objects from the request body and answers one `{"result": ...}` line per
//! response message, as etcd's gateway does; a server-streaming RPC (Snapshot, Observe)
//! takes one JSON request.
//!
//! A service impl receives a client stream as `tonic::Streaming`, which only decodes gRPC
//! frames from an HTTP body. So the gateway hands it exactly that: each decoded JSON message
//! is re-encoded as a gRPC frame into an in-memory body. The service code is the same code
//! that serves gRPC clients, with no gateway-specific entry point to keep in sync.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use bytes::{BufMut as _, Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use http::{HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::BodyExt as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::json::{self, Limits, Splitter};
use super::routes::{Call, grpc_request};

/// Reads consecutive JSON messages from a request body.
struct Reader {
    body: Body,
    splitter: Splitter,
    limits: Limits,
}

impl Reader {
    fn new(body: Body, limits: Limits) -> Self {
        Reader { body, splitter: Splitter::default(), limits }
    }

    /// The next message, or `None` once the body ended cleanly.
    async fn next<T>(&mut self) -> Result<Option<T>, Status>
    where
        T: DeserializeOwned + prost::Message,
    {
        loop {
            if let Some(msg) = self.splitter.next::<T>().map_err(|e| json::bad_json(&e))? {
                json::check_size(&msg, self.limits)?;
                return Ok(Some(msg));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.splitter.push(data);
                    }
                    // One message may not exceed the body limit; anything past it is refused
                    // rather than buffered.
                    if self.splitter.buffered() > self.limits.max_body_bytes {
                        return Err(Status::resource_exhausted(format!(
                            "request message larger than max ({} bytes)",
                            self.limits.max_body_bytes
                        )));
                    }
                }
                Some(Err(e)) => {
                    return Err(Status::invalid_argument(format!("cannot read request body: {e}")));
                }
                None => {
                    self.splitter.finish().map_err(|e| json::bad_json(&e))?;
                    return Ok(None);
                }
            }
        }
    }
}

/// Encodes `msg` as one gRPC length-prefixed frame (uncompressed).
fn grpc_frame<T: prost::Message>(msg: &T) -> Result<Bytes, Status> {
    let len = msg.encoded_len();
    let prefix = u32::try_from(len).map_err(|_| json::too_large(len, u32::MAX as usize))?;
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(prefix);
    msg.encode(&mut buf).map_err(|e| Status::internal(format!("cannot encode request: {e}")))?;
    Ok(buf.freeze())
}

/// An HTTP body carrying the gRPC frames sent on `rx`; it ends when every sender is gone.
fn frame_body(rx: mpsc::Receiver<Bytes>) -> Body {
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|data| (Ok::<_, Infallible>(Frame::data(data)), rx))
    });
    Body::new(http_body_util::StreamBody::new(frames))
}

/// A streaming 200 response whose body is `lines`.
fn lines_response(lines: impl Stream<Item = Bytes> + Send + 'static) -> Response<Body> {
    let mut res = Response::new(Body::from_stream(lines.map(Ok::<_, Infallible>)));
    *res.status_mut() = StatusCode::OK;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// Aborts the request pump when the response is dropped (the client went away).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the response side of a streaming call sees, in order of arrival.
enum Event<R> {
    /// A message or error from the service.
    Response(Result<R, Status>),
    /// The service's stream ended.
    End,
    /// A later request message could not be decoded.
    RequestError(Status),
}

/// Turns a service's response stream into lines, ending with an error line on the first
/// error (from the service, or from decoding a later request message). `call` records the
/// outcome; `pump` lives as long as the response.
fn result_lines<Resp, St>(
    responses: St,
    request_error: Option<oneshot::Receiver<Status>>,
    call: Call,
    pump: Option<AbortOnDrop>,
) -> impl Stream<Item = Bytes> + Send + 'static
where
    Resp: Serialize + Send + 'static,
    St: Stream<Item = Result<Resp, Status>> + Send + 'static,
{
    let responses =
        responses.map(Event::Response).chain(futures::stream::once(async { Event::End }));
    // Yields the decode error if the pump reports one; ends quietly if the body ended well.
    let errors = futures::stream::iter(request_error)
        .filter_map(|rx| async move { rx.await.ok().map(Event::RequestError) });
    let events = Box::pin(futures::stream::select(responses, errors));
    futures::stream::unfold((events, Some(call), pump), |(mut events, mut call, pump)| async move {
        let finish = |call: &mut Option<Call>, code| {
            if let Some(c) = call.take() {
                c.finish(code);
            }
        };
        // After the final line `call` is gone: the stream is over.
        call.as_ref()?;
        match events.next().await? {
            Event::Response(Ok(msg)) => Some((json::result_line(&msg), (events, call, pump))),
            Event::Response(Err(status)) | Event::RequestError(status) => {
                finish(&mut call, status.code());
                Some((json::error_line(&status), (events, call, pump)))
            }
            Event::End => {
                finish(&mut call, tonic::Code::Ok);
                None
            }
        }
    })
}

/// Serves one bidirectional call: `call` gets the request stream decoded from `req`'s body.
///
/// A malformed or oversized first message is answered as a failed unary call (4xx), since
/// nothing has been sent yet; a bad later message ends the stream with an error line.
pub(super) async fn bidi<S, Req, Resp, St, F, Fut>(
    svc: Arc<S>,
    call: &F,
    method: super::routes::Method,
    limits: Limits,
    req: http::Request<Body>,
) -> Response<Body>
where
    Req: DeserializeOwned + prost::Message + Default + Send + 'static,
    Resp: Serialize + Send + 'static,
    St: Stream<Item = Result<Resp, Status>> + Send + 'static,
    F: Fn(Arc<S>, tonic::Request<tonic::Streaming<Req>>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<St>, Status>>,
{
    let (parts, body) = req.into_parts();
    let mut reader = Reader::new(body, limits);
    let first = match reader.next::<Req>().await {
        Ok(first) => first,
        Err(status) => return json::error_response(&status),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let (err_tx, err_rx) = oneshot::channel::<Status>();
    let pump = match first {
        Some(first) => {
            match grpc_frame(&first) {
                Ok(frame) => {
                    // The channel is empty and has room: this cannot fail.
                    let _ = tx.try_send(frame);
                }
                Err(status) => return json::error_response(&status),
            }
            Some(AbortOnDrop(tokio::spawn(pump::<Req>(reader, tx, err_tx))))
        }
        // The body ended without a message: the request stream is empty.
        None => None,
    };
    let streaming = tonic::Streaming::new_request(
        tonic_prost::ProstDecoder::<Req>::default(),
        frame_body(rx),
        None,
        Some(limits.max_message_bytes),
    );
    let recorder = Call::start(method);
    let responses = match call(svc, grpc_request(&parts.headers, streaming)).await {
        Ok(res) => res.into_inner(),
        Err(status) => {
            recorder.finish(status.code());
            return json::error_response(&status);
        }
    };
    let request_error = pump.as_ref().map(|_| err_rx);
    lines_response(result_lines(responses, request_error, recorder, pump))
}

/// Moves request messages after the first from the body to the service's request stream.
async fn pump<Req>(mut reader: Reader, tx: mpsc::Sender<Bytes>, err_tx: oneshot::Sender<Status>)
where
    Req: DeserializeOwned + prost::Message,
{
    loop {
        match reader.next::<Req>().await.and_then(|m| m.map(|m| grpc_frame(&m)).transpose()) {
            Ok(Some(frame)) => {
                if tx.send(frame).await.is_err() {
                    // The service stopped reading its request stream.
                    return;
                }
            }
            Ok(None) => return,
            Err(status) => {
                let _ = err_tx.send(status);
                return;
            }
        }
    }
}

/// Serves one server-streaming call: one JSON request, a stream of result lines.
pub(super) async fn server_stream<S, Req, Resp, St, F, Fut>(
    svc: Arc<S>,
    call: &F,
    method: super::routes::Method,
    limits: Limits,
    req: http::Request<Body>,
) -> Response<Body>
where
    Req: DeserializeOwned + prost::Message + Default + Send + 'static,
    Resp: Serialize + Send + 'static,
    St: Stream<Item = Result<Resp, Status>> + Send + 'static,
    F: Fn(Arc<S>, tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<St>, Status>>,
{
    let (parts, body) = req.into_parts();
    let msg =
        match json::read_body(body, limits).await.and_then(|b| json::decode::<Req>(&b, limits)) {
            Ok(msg) => msg,
            Err(status) => return json::error_response(&status),
        };
    let recorder = Call::start(method);
    let responses = match call(svc, grpc_request(&parts.headers, msg)).await {
        Ok(res) => res.into_inner(),
        Err(status) => {
            recorder.finish(status.code());
            return json::error_response(&status);
        }
    };
    lines_response(result_lines(responses, None, recorder, None))
}
