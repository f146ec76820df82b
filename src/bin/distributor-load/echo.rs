//! The tonic ceiling: a bare bidi echo server on the distributor's proto, written the way the
//! tonic examples write one (a task per stream, a bounded channel, a ReceiverStream).

use std::net::SocketAddr;

use distributor::pb::ClientRtcMessage;
use distributor::pb::client_service_server::{ClientService, ClientServiceServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

struct Echo;

#[tonic::async_trait]
impl ClientService for Echo {
    type NegotiatePeerConnectionStream = ReceiverStream<Result<ClientRtcMessage, Status>>;

    async fn negotiate_peer_connection(
        &self,
        request: Request<Streaming<ClientRtcMessage>>,
    ) -> Result<Response<Self::NegotiatePeerConnectionStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Which server answers: the full stack, or h2 alone.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    Tonic,
    H2,
}

pub async fn serve(listen: SocketAddr, stack: Stack) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("echo server ({stack:?}) on {}", listener.local_addr()?);
    if stack == Stack::H2 {
        tokio::select! {
            served = bare_h2(listener) => return served,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(ClientServiceServer::new(Echo))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// The h2 crate with nothing above it: a task per connection and one per stream, each stream
/// answered with gRPC's headers and its request's bytes sent back as they come (gRPC's
/// length-prefixed messages survive any chunking), then `grpc-status: 0`.
async fn bare_h2(listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        tokio::spawn(async move {
            let Ok(mut connection) = h2::server::handshake(socket).await else { return };
            while let Some(Ok((request, respond))) = connection.accept().await {
                tokio::spawn(echo_h2(request.into_body(), respond));
            }
        });
    }
}

async fn echo_h2(mut body: h2::RecvStream, mut respond: h2::server::SendResponse<bytes::Bytes>) {
    let response = http::Response::builder().header("content-type", "application/grpc").body(());
    let response = response.expect("a static status and header");
    let Ok(mut send) = respond.send_response(response, false) else { return };
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
        if send.send_data(data, false).is_err() {
            return;
        }
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let _ = send.send_trailers(trailers);
}
