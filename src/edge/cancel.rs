//! A peer's cancel told apart from its half-close.
//!
//! A gRPC client that cancels its call resets the HTTP/2 stream (`RST_STREAM` with `CANCEL`),
//! and tonic's server decoder reads that reset as the end of the request stream, exactly as it
//! reads a half-close (`END_STREAM`). For a resumable peer the two mean opposite things: a cut
//! detaches the peer (its sessions stay for the grace), a half-close is the peer leaving
//! (`PEER_GONE` at once). So a layer under tonic, [`WatchCancel`], watches every request body
//! and records a reset when the body reports one, before tonic turns it into an end; the edge
//! reads the record ([`Cancelled`]) where the stream ends. The record is set before the end is
//! seen, so the answer does not depend on which task runs first.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use tonic::Status;
use tonic::body::Body;

/// Whether a request's body ended with the client's reset (`CANCEL`): in the request's
/// extensions, set by [`WatchCancel`].
#[derive(Clone, Debug, Default)]
pub struct Cancelled(Arc<AtomicBool>);

impl Cancelled {
    /// The client reset the stream (rather than half-closing it).
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The tower layer under tonic's router: every request gets a [`Cancelled`] and a body that
/// sets it.
#[derive(Clone, Copy, Debug, Default)]
pub struct WatchCancelLayer;

impl<S> tower::Layer<S> for WatchCancelLayer {
    type Service = WatchCancel<S>;

    fn layer(&self, inner: S) -> WatchCancel<S> {
        WatchCancel(inner)
    }
}

/// See [`WatchCancelLayer`].
#[derive(Clone, Debug)]
pub struct WatchCancel<S>(S);

impl<S> tower::Service<http::Request<Body>> for WatchCancel<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let cancelled = Cancelled::default();
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(cancelled.clone());
        let body = Body::new(Watched { inner: body, cancelled });
        self.0.call(http::Request::from_parts(parts, body))
    }
}

/// A request body that records the client's reset.
struct Watched {
    inner: Body,
    cancelled: Cancelled,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(status))) = &polled
            && status.code() == tonic::Code::Cancelled
        {
            self.cancelled.0.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
