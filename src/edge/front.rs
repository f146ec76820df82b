//! One port for both fronts. Each accepted connection's first bytes say what it speaks: the
//! HTTP/2 preface (`PRI * HTTP/2.0`, which gRPC peers send first) goes to tonic; anything else
//! is HTTP/1.1, served by the WebSocket front's routes ([`super::websocket`]). So one
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
/// The first bytes of HTTP/2 with prior knowledge; no HTTP/1.1 method starts with "PR".
const PREFACE: &[u8; 2] = b"PR";

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
    let Ok(Some(first)) = tokio::time::timeout(FIRST_BYTES_WITHIN, first_two(&connection)).await else {
        return;
    };
    if &first == PREFACE {
        let _ = to_grpc.send(Ok(connection)).await;
        return;
    }
    let service = hyper_util::service::TowerToHyperService::new(web);
    let served = hyper::server::conn::http1::Builder::new()
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

/// The connection's first two bytes, without taking them; `None` if it closed first.
async fn first_two(connection: &Connection) -> Option<[u8; 2]> {
    let mut first = [0u8; 2];
    loop {
        match connection.peek(&mut first).await {
            Ok(0) | Err(_) => return None,
            Ok(2) => return Some(first),
            // One byte so far: the next comes in the same packet almost always.
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}
