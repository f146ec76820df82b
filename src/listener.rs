//! The accept loop: at most `max_connections` connections at once (more wait in the kernel's
//! listen backlog), and a pause when accepting fails for want of resources (out of file
//! descriptors, of memory) instead of the busy loop of retrying at once, which tonic does.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::PollSemaphore;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics as names;
use crate::warn_throttled;

/// The first pause after a failed accept; each failure in a row doubles it up to [`PAUSE_MAX`].
pub const PAUSE_MIN: Duration = Duration::from_millis(10);
pub const PAUSE_MAX: Duration = Duration::from_secs(1);

/// The connections a listener accepts, as tonic serves them.
pub struct Incoming {
    listener: TcpListener,
    limit: Arc<Semaphore>,
    max: usize,
    permits: PollSemaphore,
    permit: Option<OwnedSemaphorePermit>,
    pause: Option<Pin<Box<Sleep>>>,
    next_pause: Duration,
    open: metrics::Gauge,
}

impl Incoming {
    pub fn new(listener: TcpListener, max_connections: usize) -> Self {
        let limit = Arc::new(Semaphore::new(max_connections));
        Incoming {
            listener,
            permits: PollSemaphore::new(limit.clone()),
            limit,
            max: max_connections,
            permit: None,
            pause: None,
            next_pause: PAUSE_MIN,
            open: metrics::gauge!(names::CONNECTIONS),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.limit.available_permits()
    }
}

/// Errors of one connection that came and went before it was accepted: try the next.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = &mut this.pause {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            if this.permit.is_none() {
                match ready!(this.permits.poll_acquire(cx)) {
                    Some(permit) => this.permit = Some(permit),
                    None => return Poll::Ready(None),
                }
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, peer)) => {
                    this.next_pause = PAUSE_MIN;
                    // Signaling messages are small and latency-bound (BENCHMARKS.md).
                    let _ = stream.set_nodelay(true);
                    let permit = this.permit.take().expect("acquired above");
                    this.open.increment(1.0);
                    let slot = Slot { _permit: permit, open: this.open.clone() };
                    return Poll::Ready(Some(Ok(Connection { stream, peer, _slot: slot })));
                }
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    warn_throttled!(pause = ?this.next_pause, "accepting a connection failed: {e}");
                    this.pause = Some(Box::pin(tokio::time::sleep(this.next_pause)));
                    this.next_pause = (this.next_pause * 2).min(PAUSE_MAX);
                }
            }
        }
    }
}

/// A connection's place under the cap; given back when the connection closes.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: metrics::Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

/// One accepted connection, holding its place under the cap while it lives.
pub struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    _slot: Slot,
}

impl Connection {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The first bytes the peer sent, left for whoever reads the connection next.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.peek(buf).await
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_one_to_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Incoming::new(listener, 2);
        let _clients: Vec<TcpStream> = futures::future::join_all((0..3).map(|_| TcpStream::connect(addr)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let first = incoming.next().await.unwrap().unwrap();
        let _second = incoming.next().await.unwrap().unwrap();
        assert_eq!(incoming.open(), 2);
        let waiting = tokio::time::timeout(Duration::from_millis(100), incoming.next()).await;
        assert!(waiting.is_err(), "the third waits while two are open");
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        let _third = third.expect("accepted once one closed").unwrap().unwrap();
        assert_eq!(incoming.open(), 2);
    }
}
