//! Where a peer's messages come from: its gRPC stream, with what tells its cancel from its
//! half-close, or the tunnel from another instance.

use std::future::Future;

use tonic::{Request, Status, Streaming};

use super::cancel::Cancelled;
use crate::cluster::tunnels::TunnelRx;

/// Where a peer's messages come from: its gRPC stream here, or, for a peer held here whose
/// stream is on another instance, the tunnel from there. A type parameter, not an enum: the
/// gRPC stream's reading is the per-message path, dispatched statically.
pub trait Inbound<M>: Send + 'static {
    /// Whether this is a tunnel from another instance (which never fronts for a third).
    const TUNNEL: bool;
    fn message(&mut self) -> impl Future<Output = Result<Option<M>, Status>> + Send + '_;
}

/// A peer's gRPC stream, with what tells its cancel from its half-close.
pub struct PeerInbound<M> {
    stream: Streaming<M>,
    cancelled: Option<Cancelled>,
}

impl<M> PeerInbound<M> {
    pub(super) fn new(request: Request<Streaming<M>>) -> Self {
        let cancelled = request.extensions().get::<Cancelled>().cloned();
        PeerInbound { stream: request.into_inner(), cancelled }
    }
}

impl<M: prost::Message + Default + Send + 'static> Inbound<M> for PeerInbound<M> {
    const TUNNEL: bool = false;
    async fn message(&mut self) -> Result<Option<M>, Status> {
        match self.stream.message().await {
            // tonic reads the client's reset as the end of the stream: it is a cut.
            Ok(None) if self.cancelled.as_ref().is_some_and(Cancelled::is_set) => {
                Err(Status::cancelled("the peer's client cancelled the stream"))
            }
            read => read,
        }
    }
}

impl<M: prost::Message + Default + 'static> Inbound<M> for TunnelRx {
    const TUNNEL: bool = true;
    fn message(&mut self) -> impl Future<Output = Result<Option<M>, Status>> + Send + '_ {
        self.recv()
    }
}
