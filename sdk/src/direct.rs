//! Two peers of this SDK signaling directly, in-process, with no distributor between them: the
//! baseline the time to open through the distributor is measured against, with the same str0m
//! peers and the same negotiation.

use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::Error;
use crate::connection::{self, Connection, Side, ToPeer};
use crate::rtc::Net;
use crate::signaling::Signal;

/// Opens a connection between a client and a worker whose signals go straight to each other
/// (what a distributor does for one session, without its checks).
pub async fn pair(bind: IpAddr, within: Duration) -> Result<(Connection, Connection), Error> {
    const CLIENT: i64 = 2;
    const WORKER: i64 = 1;
    let (client_out, client_sent) = mpsc::channel(64);
    let (worker_out, worker_sent) = mpsc::channel(64);
    let (to_client, client_signals) = mpsc::unbounded_channel();
    let (to_worker, worker_signals) = mpsc::unbounded_channel();
    tokio::spawn(carry(client_sent, to_worker, CLIENT));
    tokio::spawn(carry(worker_sent, to_client, WORKER));
    let (client_opened, client) = oneshot::channel();
    let (worker_opened, worker) = oneshot::channel();
    let side = Side::Worker { worker: WORKER, client: CLIENT };
    let net = Net { bind: Some(bind), stun: None };
    tokio::spawn(connection::run(side, net, worker_out, worker_signals, worker_opened));
    tokio::spawn(connection::run(
        Side::Client { worker: WORKER },
        net,
        client_out,
        client_signals,
        client_opened,
    ));
    let opened = tokio::time::timeout(within, async { tokio::join!(client, worker) }).await;
    match opened {
        Ok((Ok(client), Ok(worker))) => Ok((client?, worker?)),
        Ok(_) => Err(Error::Closed),
        Err(_) => Err(Error::Timeout { what: "a direct data channel to open", after: within }),
    }
}

/// Hands what one side sends to the other, as the distributor would forward it.
async fn carry(mut sent: mpsc::Receiver<Signal>, to: mpsc::UnboundedSender<ToPeer>, from: i64) {
    while let Some(mut signal) = sent.recv().await {
        signal.event = signal.event.forwarded();
        if signal.client == 0 {
            signal.client = from;
        }
        if to.send(ToPeer::Signal(signal)).is_err() {
            return;
        }
    }
}
