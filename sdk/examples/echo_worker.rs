//! A worker that echoes every message on every data channel a client opens to it.
//!
//! ```sh
//! cargo run -p distributor-sdk --example echo_worker -- http://127.0.0.1:50051 7
//! ```
use distributor_sdk::Worker;

#[tokio::main]
async fn main() -> Result<(), distributor_sdk::Error> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let id = args.next().and_then(|id| id.parse().ok()).unwrap_or(7);
    let mut worker = Worker::builder(url).id(id).connect().await?;
    while let Some(connection) = worker.accept().await {
        tokio::spawn(async move {
            let (mut channel, _) = connection.split();
            while let Some(data) = channel.recv().await {
                if channel.send(data).await.is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}
