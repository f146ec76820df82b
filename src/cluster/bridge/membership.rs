//! Membership: the timer (resends, dead instances, heartbeats), claims and heartbeats from
//! other instances, and leaving the cluster.

use std::time::Instant;

use bytes::Bytes;
use prost::Message;

use super::{Bridge, LEAVE_WITHIN, Output, conn_id};
use crate::cluster::links::RETIRED_FOR;
use crate::cluster::liveness::HEARTBEAT_EVERY;
use crate::cluster::wire;
use crate::core::{Command, InstanceId, Role};
use crate::metrics as names;

impl Bridge {
    /// The timer: retries parked commands, gives up on dead instances, resends what was not
    /// acknowledged, and says this instance is alive every [`HEARTBEAT_EVERY`].
    pub fn tick(&mut self, now: Instant) {
        self.unpark();
        let mut dead = self.links.dead(now);
        dead.extend(self.liveness.dead(now));
        dead.sort_unstable();
        dead.dedup();
        for instance in dead {
            tracing::warn!(instance = format!("{instance:x}"), "instance unreachable: ending its sessions");
            self.instance_gone(instance, now);
        }
        self.links.prune(now);
        self.directory.prune(now);
        let released = self.order.expire(now);
        self.take_released(released, now);
        self.beats.retain(|_, (_, at)| now.saturating_duration_since(*at) < RETIRED_FOR);
        self.heard_claims.retain(|_, at| now.saturating_duration_since(*at) < RETIRED_FOR);
        if !self.connected {
            return;
        }
        let out = &mut self.out;
        self.links.resend(now, |instance, frame| out.push_back(Output::ToInstance(instance, frame)));
        if self.next_beat.is_none_or(|at| now >= at) {
            self.next_beat = Some(now + HEARTBEAT_EVERY);
            self.beat(false);
        }
    }

    fn beat(&mut self, leaving: bool) {
        let beat = wire::Heartbeat { instance: self.me, leaving };
        self.out.push_back(Output::Heartbeat(beat.encode_to_vec().into()));
    }

    /// NATS refused a frame for `instance` outright (larger than its `max_payload`, which a
    /// server reached after a reconnect may have made smaller): resending it would fail
    /// forever, so the link is given up, as for a dead instance: what it carried is refused and
    /// its sessions end; the next message starts a new link.
    pub fn publish_refused(&mut self, instance: InstanceId, now: Instant) {
        crate::warn_throttled!(
            instance = format!("{instance:x}"),
            "NATS refused a frame: giving up the link"
        );
        self.instance_gone(instance, now);
    }

    /// A claim from `<prefix>.claim`: a stream elsewhere is now the newest of its id.
    pub fn claim(&mut self, payload: Bytes, now: Instant) {
        let Ok(claim) = wire::Claim::decode(payload) else { return };
        let Some(conn) = claim.conn.map(conn_id) else { return };
        if claim.moved_from == self.me {
            self.heard_claims.insert((claim.worker, claim.id), now);
            for claimed in self.awaiting_claims.remove(&(claim.worker, claim.id)).unwrap_or_default() {
                let _ = claimed.send(());
            }
        }
        if !claim.worker && claim.moved_from != 0 {
            return self.client_moved(conn, claim.now_at, claim.moved_from);
        }
        if conn.instance == self.me {
            return;
        }
        // Streams opened here from now on are newer than this one, whatever the clocks say.
        self.clock.observe(conn.at);
        let (role, shard) = if claim.worker {
            if claim.moved_from != 0 {
                self.clients.repoint(claim.id, claim.moved_from, conn.instance);
            }
            let waiting = self.directory.claimed(claim.id, conn.instance);
            self.release(claim.id, Ok(conn.instance), waiting, now);
            (Role::Worker, self.shards.of_worker(claim.id))
        } else {
            (Role::Client, self.shards.of_client(claim.id))
        };
        self.dispatch(shard, Command::Evict { role, id: claim.id, newer: conn });
    }

    /// A heartbeat from `<prefix>.hb`, sent at `sent_at_ms` by its sender's clock.
    pub fn heartbeat(&mut self, payload: Bytes, sent_at_ms: u64, now: Instant) {
        let Ok(beat) = wire::Heartbeat::decode(payload) else { return };
        if beat.instance == self.me || beat.instance == 0 {
            return;
        }
        match self.beats.get(&beat.instance) {
            Some((last, _)) if *last >= sent_at_ms => {
                metrics::counter!(names::CLUSTER_REJECTED, "kind" => "heartbeat").increment(1);
                return;
            }
            _ => {
                self.beats.insert(beat.instance, (sent_at_ms, now));
            }
        }
        if beat.leaving {
            tracing::info!(instance = format!("{:x}", beat.instance), "instance left");
            self.instance_gone(beat.instance, now);
        } else {
            self.liveness.heard(beat.instance, now);
        }
    }

    /// Shutdown begins: what is in flight has [`LEAVE_WITHIN`] to be acknowledged.
    pub fn leave(&mut self, now: Instant) {
        self.leave_by = Some(now + LEAVE_WITHIN);
    }

    /// Whether a leaving instance may go: nothing left in flight, time is up, or NATS is gone.
    pub fn ready_to_leave(&self, now: Instant) -> bool {
        let Some(deadline) = self.leave_by else { return false };
        self.links.is_quiet() || now >= deadline || !self.connected
    }

    /// The last word: a heartbeat saying this instance leaves, so the others end its sessions
    /// at once.
    pub fn farewell(&mut self) {
        if self.connected {
            self.beat(true);
        }
    }
}
