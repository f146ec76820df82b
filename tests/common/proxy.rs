//! A TCP proxy on loopback that cuts its first connection once the client has sent a given
//! number of bytes through it: a peer's connection lost mid-stream, at a chosen point.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    addr: SocketAddr,
    cuts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards to `upstream`; the first connection is cut (both ways, at once) once `cut_after`
    /// bytes went from the client to `upstream`. Later connections are left alone.
    pub async fn start(upstream: SocketAddr, cut_after: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let cuts = Arc::new(AtomicUsize::new(0));
        let counted = cuts.clone();
        let task = tokio::spawn(async move {
            let mut first = true;
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                let limit = if std::mem::take(&mut first) { Some(cut_after) } else { None };
                tokio::spawn(forward(client, server, limit, counted.clone()));
            }
        });
        Proxy { addr, cuts, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(client: TcpStream, server: TcpStream, limit: Option<usize>, cuts: Arc<AtomicUsize>) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 << 10];
        let mut sent = 0;
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let n = match limit {
                Some(limit) if sent + n >= limit => {
                    let _ = server_tx.write_all(&buf[..limit - sent]).await;
                    cuts.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                _ => n,
            };
            if server_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
            sent += n;
        }
    };
    let down = async {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
    };
    // Whichever way ends first ends both: the connection is gone.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
