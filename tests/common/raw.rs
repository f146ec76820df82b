//! A client stream spoken over the h2 crate directly, without tonic: what another gRPC stack's
//! client does, down to the frames. Its `cancel` resets the HTTP/2 stream (`RST_STREAM` with
//! `CANCEL`, no half-close), as a client library does when its call is cancelled; tonic's own
//! client cannot send that while the request stream is open.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use distributor::pb::ClientRtcMessage;
use prost::Message;
use tokio::net::TcpStream;

use super::WAIT;

pub struct RawClient {
    /// The connection's handle: dropped, the connection would wind down.
    _connection: h2::client::SendRequest<Bytes>,
    ping: h2::PingPong,
    send: h2::SendStream<Bytes>,
    body: h2::RecvStream,
    buffer: BytesMut,
}

impl RawClient {
    /// Opens `ClientService/NegotiatePeerConnection` on its own connection to `addr`, with
    /// `metadata` as headers.
    pub async fn open(addr: std::net::SocketAddr, metadata: &[(&str, String)]) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (client, mut connection) = h2::client::handshake(tcp).await.expect("an HTTP/2 connection");
        let ping = connection.ping_pong().expect("the connection's ping");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut client = client.ready().await.expect("ready");
        let mut request = http::Request::post(format!(
            "http://{addr}/distributor.v1.ClientService/NegotiatePeerConnection"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
        for (name, value) in metadata {
            request = request.header(*name, value);
        }
        let (response, send) = client.send_request(request.body(()).unwrap(), false).expect("a stream");
        let response = tokio::time::timeout(WAIT, response).await.expect("headers in time").expect("headers");
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("grpc-status").is_none(), "refused: {:?}", response.headers());
        RawClient { _connection: client, ping, send, body: response.into_body(), buffer: BytesMut::new() }
    }

    /// Sends one message, gRPC-framed.
    pub fn send(&mut self, msg: &ClientRtcMessage) {
        let mut frame = BytesMut::with_capacity(5 + msg.encoded_len());
        frame.put_u8(0);
        frame.put_u32(msg.encoded_len() as u32);
        msg.encode(&mut frame).expect("room");
        self.send.send_data(frame.freeze(), false).expect("the stream takes it");
    }

    /// The next message; fails the test if none comes within [`WAIT`].
    pub async fn recv(&mut self) -> ClientRtcMessage {
        loop {
            if self.buffer.len() >= 5 {
                let len = u32::from_be_bytes(self.buffer[1..5].try_into().unwrap()) as usize;
                if self.buffer.len() >= 5 + len {
                    self.buffer.advance(5);
                    let frame = self.buffer.split_to(len);
                    return ClientRtcMessage::decode(frame.freeze()).expect("a message");
                }
            }
            let data = tokio::time::timeout(WAIT, self.body.data()).await.unwrap_or_else(|_| {
                panic!("no message within {WAIT:?} ({} bytes buffered)", self.buffer.len())
            });
            let data = data.expect("the stream is open").expect("readable");
            let _ = self.body.flow_control().release_capacity(data.len());
            self.buffer.extend_from_slice(&data);
        }
    }

    /// Returns once everything sent so far has reached the server: an HTTP/2 `PING` on the
    /// connection, answered after the frames before it were taken in (not necessarily read by
    /// the server's handler yet).
    pub async fn reached(&mut self) {
        let pong = self.ping.ping(h2::Ping::opaque());
        tokio::time::timeout(WAIT, pong).await.expect("a pong in time").expect("a pong");
    }

    /// Cancels the call: `RST_STREAM` with `CANCEL`, without a half-close first.
    pub fn cancel(mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}
