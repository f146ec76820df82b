//! Where routing runs: N shards, each owning one [`Router`] and its share of workers, sessions
//! and client ids. Two ways to run them, chosen by `--shards`:
//!
//! - **Threads** (`--shards N`, N ≥ 1): N named OS threads fed by bounded crossbeam channels
//!   from the gRPC tasks. A thread blocks on `recv()` only when its channel is empty, then drains
//!   up to [`BATCH`] commands with one clock read, so a busy shard costs no wake-up per message.
//!   It exits when the last sender is dropped. A full channel pushes back on the sending gRPC
//!   task (which stops reading its stream, and HTTP/2 flow control pushes back on the peer).
//! - **Inline** (`--shards 0`): the gRPC task that decoded a message routes it itself, under the
//!   owning shard's lock ([`INLINE_SHARDS_PER_CORE`] shards per core keep contention low). No
//!   thread hand-off, so no wake-up per message: on a machine with few cores, where a wake-up
//!   costs more than the routing, this is faster (see BENCHMARKS.md).
//!
//! Either way a shard's commands are handled one at a time, in the order each sender sent them.

use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::core::{Command, Elsewhere, PeerId, PeerSink, Router};

/// Commands a shard thread handles per clock read and per turn of its loop.
pub const BATCH: usize = 256;
/// Inline mode: shards (locks) per core.
pub const INLINE_SHARDS_PER_CORE: usize = 8;

/// The shard threads have stopped (the distributor is shutting down, or a shard died).
#[derive(Debug, thiserror::Error)]
#[error("the routing shards have stopped")]
pub struct ShardsStopped;

pub struct Shards<P: PeerSink> {
    mode: Mode<P>,
    count: usize,
}

enum Mode<P: PeerSink> {
    Threads { senders: Vec<Sender<Command<P>>>, threads: Vec<JoinHandle<()>> },
    Inline { routers: Vec<Mutex<Router<P>>> },
}

impl<P: PeerSink + Send + 'static> Shards<P> {
    /// Starts `count` shard threads, each with a queue of `capacity` commands, or with `count`
    /// 0, inline shards; each router caps a client's sessions at `max_sessions` (0: no cap)
    /// and gets the [`Elsewhere`] `elsewhere` makes, if any.
    pub fn start(
        count: usize,
        capacity: usize,
        max_sessions: usize,
        elsewhere: impl Fn() -> Option<Box<dyn Elsewhere<P>>>,
    ) -> std::io::Result<Self> {
        let router = || Router::new(elsewhere()).with_session_cap(max_sessions);
        if count == 0 {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let count = cores * INLINE_SHARDS_PER_CORE;
            let routers = (0..count).map(|_| Mutex::new(router())).collect();
            return Ok(Shards { mode: Mode::Inline { routers }, count });
        }
        let mut senders = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let (tx, rx) = crossbeam_channel::bounded(capacity);
            let router = router();
            let thread = std::thread::Builder::new()
                .name(format!("distributor-shard-{index}"))
                .spawn(move || run_shard(router, rx))?;
            senders.push(tx);
            threads.push(thread);
        }
        Ok(Shards { mode: Mode::Threads { senders, threads }, count })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether routing runs on the caller (`--shards 0`).
    pub fn is_inline(&self) -> bool {
        matches!(self.mode, Mode::Inline { .. })
    }

    /// The shard that owns `worker`'s registration and all of its sessions.
    pub fn of_worker(&self, worker: PeerId) -> usize {
        spread(worker, self.count)
    }

    /// The shard that keeps the newest stream of `client`.
    pub fn of_client(&self, client: PeerId) -> usize {
        spread(client.rotate_left(17), self.count)
    }

    /// Queues `command` on `shard` (or handles it, inline), waiting without blocking the
    /// runtime while the shard's queue is full.
    pub async fn send(&self, shard: usize, mut command: Command<P>) -> Result<(), ShardsStopped> {
        let senders = match &self.mode {
            Mode::Inline { routers } => return inline(&routers[shard], command),
            Mode::Threads { senders, .. } => senders,
        };
        let mut attempts = 0u32;
        loop {
            match senders[shard].try_send(command) {
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

    /// Queues (or handles) `command` on `shard` if there is room; gives it back if not.
    pub fn try_send(&self, shard: usize, command: Command<P>) -> Result<(), Command<P>> {
        match &self.mode {
            Mode::Inline { routers } => {
                let _ = inline(&routers[shard], command);
                Ok(())
            }
            Mode::Threads { senders, .. } => senders[shard].try_send(command).map_err(|e| match e {
                TrySendError::Full(c) | TrySendError::Disconnected(c) => c,
            }),
        }
    }

    /// Queues the command `make` builds on every shard.
    pub async fn send_all(&self, make: impl Fn() -> Command<P>) -> Result<(), ShardsStopped> {
        for shard in 0..self.count {
            self.send(shard, make()).await?;
        }
        Ok(())
    }
}

fn inline<P: PeerSink>(router: &Mutex<Router<P>>, command: Command<P>) -> Result<(), ShardsStopped> {
    // A poisoned lock means a router panicked mid-command; its state may be torn.
    let mut router = router.lock().map_err(|_| ShardsStopped)?;
    router.handle(command, Instant::now);
    Ok(())
}

impl<P: PeerSink> Drop for Shards<P> {
    fn drop(&mut self) {
        if let Mode::Threads { senders, threads } = &mut self.mode {
            senders.clear();
            for thread in threads.drain(..) {
                // A shard that panicked has already printed why; there is nothing left to stop.
                let _ = thread.join();
            }
        }
    }
}

fn run_shard<P: PeerSink>(mut router: Router<P>, commands: Receiver<Command<P>>) {
    while let Ok(first) = commands.recv() {
        // One clock read per batch, and only if a command of it needs the time.
        let mut batch_now = None;
        let mut now = || *batch_now.get_or_insert_with(Instant::now);
        router.handle(first, &mut now);
        for command in commands.try_iter().take(BATCH - 1) {
            router.handle(command, &mut now);
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
