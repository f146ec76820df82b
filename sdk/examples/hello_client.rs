//! A client that opens a data channel to a worker, says hello, and prints the answer.
//!
//! ```sh
//! cargo run -p distributor-sdk --example hello_client -- http://127.0.0.1:50051 7
//! ```
use distributor_sdk::Client;

#[tokio::main]
async fn main() -> Result<(), distributor_sdk::Error> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let worker = args.next().and_then(|id| id.parse().ok()).unwrap_or(7);
    let client = Client::builder(url).connect().await?;
    let mut connection = client.open(worker).await?;
    println!("data channel open in {:?}", connection.times.channel);
    connection.channel.send("hello".into()).await?;
    if let Some(answer) = connection.channel.recv().await {
        println!("worker {worker} says {:?}", String::from_utf8_lossy(&answer));
    }
    Ok(())
}
