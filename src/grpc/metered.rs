//! A tower layer on the client port that records go-grpc-prometheus's server metrics
//! (`grpc_server_started_total`, `grpc_server_handled_total`, `grpc_server_handling_seconds`)
//! and etcd's `etcd_network_client_grpc_{sent,received}_bytes_total` for every gRPC call.
//!
//! It sees raw HTTP: a gRPC call is a request whose content type starts with
//! `application/grpc` and whose path names one of etcd's methods (anything else, such as
//! the JSON gateway sharing the port, passes through unmeasured). The status code is read
//! where gRPC puts it: the response headers of a trailers-only response (an error before
//! any message), otherwise the trailers that end the body. A call whose body is dropped
//! before its trailers (the client went away) is counted as `Canceled`, which is what the
//! handler of such a call returns in etcd.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tower_layer::Layer;
use tower_service::Service;

use crate::metrics::{self, GrpcType, Metrics};

/// Adds [`Metered`] around the client port's router.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsLayer;

impl<S> Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Metered<S> {
        Metered { inner }
    }
}

/// The service [`MetricsLayer`] builds.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
}

/// One gRPC call being measured.
#[derive(Debug)]
struct Call {
    metrics: &'static Metrics,
    kind: GrpcType,
    service: String,
    method: String,
    start: Instant,
}

impl Call {
    /// Recognises an etcd gRPC call by content type and path.
    fn classify<B>(metrics: &'static Metrics, req: &Request<B>) -> Option<Call> {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if !grpc {
            return None;
        }
        let (service, method) = req.uri().path().strip_prefix('/')?.split_once('/')?;
        let kind = metrics.registered_grpc_method(service, method)?;
        Some(Call {
            metrics,
            kind,
            service: service.to_owned(),
            method: method.to_owned(),
            start: Instant::now(),
        })
    }

    fn finish(self, code: i32) {
        self.metrics.grpc_handled(
            self.kind,
            &self.service,
            &self.method,
            code,
            self.start.elapsed(),
        );
    }
}

/// The gRPC status code in `headers`, if they carry one.
fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

impl<S, ResBody> Service<Request<tonic::body::Body>> for Metered<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let call = metrics::get().and_then(|m| Call::classify(m, &req));
        let req = match &call {
            Some(call) => {
                call.metrics.grpc_started(call.kind, &call.service, &call.method);
                let m = call.metrics;
                req.map(|body| tonic::body::Body::new(CountedBody { inner: body, metrics: m }))
            }
            None => req,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            let (parts, body) = res.into_parts();
            let call = match (call, grpc_status(&parts.headers)) {
                // Trailers-only response: the call ended with this status.
                (Some(call), Some(code)) => {
                    call.finish(code);
                    None
                }
                (call, _) => call,
            };
            let counting = call.as_ref().map(|c| c.metrics);
            Ok(Response::from_parts(parts, MeteredBody { inner: body, call, counting }))
        })
    }
}

/// A request body that counts the bytes it yields as received from gRPC clients.
struct CountedBody {
    inner: tonic::body::Body,
    metrics: &'static Metrics,
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.metrics.network.client_grpc_received_bytes_total.inc_by(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that counts sent bytes and records the call's status when it ends.
pub struct MeteredBody<B> {
    inner: B,
    /// The call still waiting for its status; `None` once recorded or when not measured.
    call: Option<Call>,
    /// Where sent bytes are counted; `None` for non-gRPC responses.
    counting: Option<&'static Metrics>,
}

impl<B> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody").field("call", &self.call).finish()
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.finish(tonic::Code::Cancelled as i32);
        }
    }
}

impl<B> HttpBody for MeteredBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(m)) = (frame.data_ref(), self.counting) {
                    m.network.client_grpc_sent_bytes_total.inc_by(data.len() as u64);
                }
                if let Some(code) = frame.trailers_ref().and_then(grpc_status)
                    && let Some(call) = self.call.take()
                {
                    call.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = self.call.take() {
                    call.finish(tonic::Code::Internal as i32);
                }
            }
            Poll::Ready(None) => {
                // A gRPC body always ends with trailers; one that does not is malformed.
                if let Some(call) = self.call.take() {
                    call.finish(tonic::Code::Unknown as i32);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
