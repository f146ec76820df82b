//! One port for both fronts. Each accepted connection's first byte says what it speaks: `P`,
//! the HTTP/2 preface's (`PRI * HTTP/2.0`, which gRPC peers send first), goes to tonic;
//! anything else is HTTP/1.1, served by the WebSocket front's routes ([`super::websocket`]),
//! which take `GET`s only (an HTTP/1.1 `POST`, `PUT` or `PATCH` also starts with `P`: tonic
//! ends its connection, where the routes would have answered 405). One byte is all there is
//! to wait for, so a peer that sends a byte and stalls costs a timer, not a busy wait. So one
//! `--listen` address (and one image, one `PORT`) serves gRPC peers and browsers.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{Edge, websocket};
use crate::listener::{Connection, Incoming};

/// How long a connection may take to send its first bytes before it is closed.
pub const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(10);
/// The first byte of HTTP/2 with prior knowledge (`PRI * HTTP/2.0`).
const PREFACE: u8 = b'P';

/// Accepts from `incoming` until `stop`: HTTP/2 connections come out of the returned stream
/// (for tonic), HTTP/1.1 ones are served here, each on a task of the edge's.
pub fn split(
    mut incoming: Incoming,
    edge: Arc<Edge>,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<Connection>> {
    let (to_grpc, grpc) = mpsc::channel(64);
    let web = websocket::routes(edge.clone());
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                next = incoming.next() => next,
            };
            match next {
                Some(Ok(connection)) => {
                    let (to_grpc, web, stop) = (to_grpc.clone(), web.clone(), stop.clone());
                    edge.tasks.spawn(route(connection, to_grpc, web, stop));
                }
                Some(Err(e)) => {
                    if to_grpc.send(Err(e)).await.is_err() {
                        break;
                    }
                }
                None => break,
            }
        }
    });
    ReceiverStream::new(grpc)
}

/// Hands one connection to the front its first bytes name.
async fn route(
    connection: Connection,
    to_grpc: mpsc::Sender<io::Result<Connection>>,
    web: axum::Router,
    stop: CancellationToken,
) {
    let mut first = [0u8; 1];
    let Ok(Ok(1)) = tokio::time::timeout(FIRST_BYTES_WITHIN, connection.peek(&mut first)).await else {
        return;
    };
    if first[0] == PREFACE {
        let _ = to_grpc.send(Ok(connection)).await;
        return;
    }
    let service = hyper_util::service::TowerToHyperService::new(web);
    // A request's headers must come within the same time as the first byte (slow headers hold
    // a connection under the cap, as a silent one would).
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(FIRST_BYTES_WITHIN)
        .serve_connection(hyper_util::rt::TokioIo::new(connection), service)
        .with_upgrades();
    tokio::pin!(served);
    tokio::select! {
        _ = served.as_mut() => {}
        _ = stop.cancelled() => {
            // A drain: requests under way finish, an idle connection closes (an upgraded
            // WebSocket lives on, ended with its peer's stream).
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
}
