//! A tower layer on the client port that runs every request as its caller: the auth token
//! from the `token` metadata (gRPC) or the `Authorization` header (the JSON gateway, and
//! the `authorization` metadata etcd also reads), and the CN of the verified client
//! certificate ([`ConnInfo`]). The server reads it through
//! [`crate::server::current_caller`], as etcd reads them from a request's context.

use std::pin::Pin;
use std::task::{Context, Poll};

use http::Request;
use tower_layer::Layer;
use tower_service::Service;

use super::tls::ConnInfo;
use crate::server::{Caller, with_caller, with_caller_sync};

/// Adds [`WithCaller`] around the client port's router.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallerLayer;

impl<S> Layer<S> for CallerLayer {
    type Service = WithCaller<S>;

    fn layer(&self, inner: S) -> WithCaller<S> {
        WithCaller { inner }
    }
}

/// The service [`CallerLayer`] builds.
#[derive(Debug, Clone)]
pub struct WithCaller<S> {
    inner: S,
}

/// The credentials `req` carries.
fn caller<B>(req: &Request<B>) -> Caller {
    let header =
        |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    Caller {
        token: header("token").or_else(|| header("authorization")),
        common_name: req.extensions().get::<ConnInfo>().and_then(|c| c.common_name.clone()),
    }
}

impl<S, B> Service<Request<B>> for WithCaller<S>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let who = caller(&req);
        let fut = with_caller_sync(who.clone(), || self.inner.call(req));
        Box::pin(with_caller(who, fut))
    }
}
