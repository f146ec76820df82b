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

pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("echo server on {}", listener.local_addr()?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(ClientServiceServer::new(Echo))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
