//! Resumable streams at the edge (`x-resume-after`, see [`crate::peer::resume`]): how a stream
//! opens, attaches to its peer (taken over here, afresh, or moved here from another instance),
//! and what its end means (a detach for the grace period, or the peer's departure).

use std::future::Future;
use std::sync::Arc;

use tonic::Status;
use tonic::metadata::MetadataMap;

use super::{Edge, PeerStream};
use crate::core::{Outbound, PeerId};
use crate::metrics as names;
use crate::peer::resume::{Attachment, Expired, Released, Resumables, Resume, Resumed};
use crate::peer::{Close, Conn, Encode, Sink};

/// How a peer's stream was opened.
pub enum Opening<M> {
    /// As before resume existed: the stream is the peer.
    Plain(Sink),
    /// With `x-resume-after: after`: the peer may outlive this stream, `attachment`.
    Resumable { after: u64, attachment: Arc<Attachment<M>> },
}

/// A resumable stream attached to its peer.
pub struct Attached {
    pub sink: Sink,
    /// Whether it took over the peer's earlier stream (else it registers here: afresh, or
    /// moved from another instance).
    pub resumed: bool,
    /// An earlier stream of the peer that could not be resumed (what it missed is gone): it
    /// must end for good, its sessions' other sides hearing `PEER_GONE`.
    pub replaced: Option<Sink>,
}

/// The `x-resume-after` metadata: the last number a peer received, if it asks to resume.
pub fn resume_after(metadata: &MetadataMap) -> Result<Option<u64>, Status> {
    let Some(value) = metadata.get(RESUME_AFTER) else { return Ok(None) };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| Status::invalid_argument(format!("{RESUME_AFTER} must be a decimal number")))
}

pub use crate::pb::RESUME_AFTER;

impl Edge {
    /// Opens a peer's stream: resumable if it asks (`x-resume-after`) and resume is on.
    pub(super) fn opening<M>(
        &self,
        metadata: &MetadataMap,
        encode: Encode<M>,
    ) -> Result<(Opening<M>, PeerStream<M>), Status> {
        match resume_after(metadata)? {
            Some(after) if !self.resume_grace.is_zero() => {
                let attachment = Attachment::new();
                let stream = PeerStream::Resumable(Resumed::new(attachment.clone()));
                Ok((Opening::Resumable { after, attachment }, stream))
            }
            _ => {
                let (sink, outbound) = self.open(encode);
                Ok((Opening::Plain(sink), PeerStream::Plain(outbound)))
            }
        }
    }

    /// Attaches a resumable stream of `id` (received up to `after`) to its peer: takes the
    /// peer over if it is known here and what it missed is kept, else opens it afresh.
    pub(super) fn attach<M>(
        &self,
        peers: &Resumables<M>,
        id: PeerId,
        after: u64,
        attachment: &Arc<Attachment<M>>,
        welcome: Outbound,
        encode: Encode<M>,
    ) -> Attached {
        let outcome = match peers.take_over(id, after, attachment, welcome) {
            Resume::Resumed(sink) => {
                resumes("resumed").increment(1);
                return Attached { sink, resumed: true, replaced: None };
            }
            Resume::Unknown => None,
            Resume::TooOld(old) => {
                old.end(Close::Now(Status::aborted("this peer reconnected on a newer stream")));
                self.forget(old.id());
                Some(old)
            }
        };
        if after > 0 {
            resumes("unknown").increment(1);
        }
        let conn = self.conn_clock.next(self.instance);
        let (sink, outbound) = Conn::open_numbered(conn, self.peer_queue, encode);
        self.track(&sink);
        peers.insert(id, sink.clone(), outbound, attachment);
        Attached { sink, resumed: false, replaced: outcome }
    }

    /// Opens a resumable peer that another instance let go to this one (see [`Released`]):
    /// numbered on from there, its welcome says `resumed`, and it registers here as a new peer
    /// does. A client that moved with its sessions keeps its stream's id (`kept`).
    pub(super) fn adopt<M>(
        &self,
        peers: &Resumables<M>,
        id: PeerId,
        attachment: &Arc<Attachment<M>>,
        encode: Encode<M>,
        (released, kept): (Released, Option<crate::core::ConnId>),
    ) -> Attached {
        resumes("resumed").increment(1);
        let conn = kept.unwrap_or_else(|| self.conn_clock.next(self.instance));
        let (sink, mut outbound) = Conn::open_numbered(conn, self.peer_queue, encode);
        outbound.moved_from(released);
        self.track(&sink);
        peers.insert(id, sink.clone(), outbound, attachment);
        Attached { sink, resumed: false, replaced: None }
    }

    /// A resumable peer's stream ended without the peer leaving: it stays detached for
    /// `resume_grace`, then `depart` runs, unless a newer stream took it over.
    fn detach<M: Send + 'static, F: Future<Output = ()> + Send + 'static>(
        self: &Arc<Self>,
        peers: fn(&Edge) -> &Resumables<M>,
        id: PeerId,
        sink: &Sink,
        attachment: &Arc<Attachment<M>>,
        depart: impl FnOnce(Arc<Edge>, Sink) -> F + Send + 'static,
    ) {
        let Some(generation) = peers(self).detach(id, attachment) else { return };
        tracing::debug!(id, conn = %sink.id(), "resumable peer detached");
        let (edge, sink, grace) = (self.clone(), sink.clone(), self.resume_grace);
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                _ = edge.shutdown.cancelled() => {}
                _ = sink.ended() => {}
            }
            let sink = match peers(&edge).expire(id, generation) {
                Some(Expired::Expired(sink)) => {
                    resumes("expired").increment(1);
                    Some(sink)
                }
                Some(Expired::Released(sink)) => Some(sink),
                None => None,
            };
            if let Some(sink) = sink {
                sink.end(Close::Now(Status::aborted("the peer did not resume in time")));
                edge.forget(sink.id());
                depart(edge.clone(), sink).await;
            }
        });
    }

    /// A peer's stream ended: a resumable peer that did not leave is detached (unless a newer
    /// stream took it over); any other is gone, and `depart` tells the shards.
    pub(super) async fn finish<M: Send + 'static, F: Future<Output = ()> + Send + 'static>(
        self: &Arc<Self>,
        peers: fn(&Edge) -> &Resumables<M>,
        id: PeerId,
        sink: Sink,
        attachment: Option<Arc<Attachment<M>>>,
        depart: impl FnOnce(Arc<Edge>, Sink) -> F + Send + 'static,
    ) {
        match attachment {
            Some(attachment) if !sink.is_ended() => {
                if !attachment.is_taken_over() {
                    self.detach(peers, id, &sink, &attachment, depart);
                }
            }
            Some(attachment) => {
                peers(self).remove(id, &attachment);
                self.forget(sink.id());
                depart(self.clone(), sink).await;
            }
            None => depart(self.clone(), sink).await,
        }
    }

    /// Samples the resumable peers' gauges: detached peers, messages held for them.
    pub fn sample_resumes(&self) {
        let (clients, held_c) = self.clients.detached();
        let (workers, held_w) = self.workers.detached();
        metrics::gauge!(names::DETACHED_PEERS).set((clients + workers) as f64);
        metrics::gauge!(names::HELD_MESSAGES).set((held_c + held_w) as f64);
    }
}

fn resumes(outcome: &'static str) -> metrics::Counter {
    metrics::counter!(names::RESUMES, "outcome" => outcome)
}
