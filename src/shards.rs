//! The shard threads: N named OS threads, each owning one [`Router`], fed by bounded crossbeam
//! channels from the gRPC tasks.
//!
//! A thread blocks on `recv()` only when its channel is empty, then drains up to [`BATCH`]
//! commands with one clock read, so a busy shard costs no wake-up per message. It exits when the
//! last sender is dropped. A full channel pushes back on the sending gRPC task (which stops
//! reading its stream, and HTTP/2 flow control pushes back on the peer); nothing is dropped.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::core::{Command, Elsewhere, PeerId, PeerSink, Router};

/// Commands a shard handles per clock read and per turn of its loop.
pub const BATCH: usize = 256;

/// The shard threads have stopped (the distributor is shutting down, or a shard died).
#[derive(Debug, thiserror::Error)]
#[error("the routing shards have stopped")]
pub struct ShardsStopped;

pub struct Shards<P: PeerSink> {
    senders: Vec<Sender<Command<P>>>,
    threads: Vec<JoinHandle<()>>,
}

impl<P: PeerSink + Send + 'static> Shards<P> {
    /// Starts `count` shard threads (at least one), each with a queue of `capacity` commands,
    /// and each with the [`Elsewhere`] `elsewhere` makes, if any.
    pub fn start(
        count: usize,
        capacity: usize,
        elsewhere: impl Fn() -> Option<Box<dyn Elsewhere<P>>>,
    ) -> std::io::Result<Self> {
        let count = count.max(1);
        let mut senders = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let (tx, rx) = crossbeam_channel::bounded(capacity);
            let router = Router::new(elsewhere());
            let thread = std::thread::Builder::new()
                .name(format!("distributor-shard-{index}"))
                .spawn(move || run_shard(router, rx))?;
            senders.push(tx);
            threads.push(thread);
        }
        Ok(Shards { senders, threads })
    }

    pub fn len(&self) -> usize {
        self.senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// The shard that owns `worker`'s registration and all of its sessions.
    pub fn of_worker(&self, worker: PeerId) -> usize {
        spread(worker, self.senders.len())
    }

    /// The shard that keeps the newest stream of `client`.
    pub fn of_client(&self, client: PeerId) -> usize {
        spread(client.rotate_left(17), self.senders.len())
    }

    /// Queues `command` on `shard`, waiting (without blocking the runtime) while it is full.
    pub async fn send(&self, shard: usize, mut command: Command<P>) -> Result<(), ShardsStopped> {
        let mut attempts = 0u32;
        loop {
            match self.senders[shard].try_send(command) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(_)) => return Err(ShardsStopped),
                Err(TrySendError::Full(back)) => {
                    command = back;
                    attempts += 1;
                    if attempts < 16 {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
    }

    /// Queues `command` on `shard` if there is room; gives it back if not.
    pub fn try_send(&self, shard: usize, command: Command<P>) -> Result<(), Command<P>> {
        self.senders[shard].try_send(command).map_err(|e| match e {
            TrySendError::Full(c) | TrySendError::Disconnected(c) => c,
        })
    }

    /// Queues the command `make` builds on every shard.
    pub async fn send_all(&self, make: impl Fn() -> Command<P>) -> Result<(), ShardsStopped> {
        for shard in 0..self.senders.len() {
            self.send(shard, make()).await?;
        }
        Ok(())
    }
}

impl<P: PeerSink> Drop for Shards<P> {
    fn drop(&mut self) {
        self.senders.clear();
        for thread in self.threads.drain(..) {
            // A shard that panicked has already printed why; there is nothing left to stop.
            let _ = thread.join();
        }
    }
}

fn run_shard<P: PeerSink>(mut router: Router<P>, commands: Receiver<Command<P>>) {
    while let Ok(first) = commands.recv() {
        let now = Instant::now();
        router.handle(first, now);
        for command in commands.try_iter().take(BATCH - 1) {
            router.handle(command, now);
        }
    }
}

/// Maps an id onto `0..n` evenly, whatever pattern the ids follow (sequential, strided...).
fn spread(id: PeerId, n: usize) -> usize {
    let mixed = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_covers_every_shard_evenly() {
        for n in [1, 2, 3, 4, 8] {
            let mut counts = vec![0usize; n];
            for id in 1..=10_000i64 {
                counts[spread(id, n)] += 1;
            }
            let expected = 10_000 / n;
            for c in counts {
                assert!(c > expected * 8 / 10 && c < expected * 12 / 10, "n={n} {c} vs {expected}");
            }
        }
        assert!(spread(-5, 3) < 3);
        assert!(spread(i64::MIN, 7) < 7);
    }
}
