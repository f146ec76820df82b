//! A moved client's messages, taken in the order it sent them though they come by two links.
//!
//! A client that moves from instance A to B keeps its stream's id, and its sessions with
//! workers on a third instance C go on. What it sent from A goes over the link A→C; what it
//! sends from B, over B→C, and could overtake it (an `ICE_CANDIDATE` before the `OFFER` it
//! belongs to would be refused). So A, when the client leaves it, sends C a
//! [`wire::ClientLeft`](crate::cluster::wire::ClientLeft) after everything the client sent C from there, and B marks what the
//! client sends C for a while ([`Stamp`]): C holds a marked message until A's `ClientLeft` has
//! come, then takes it, in order. Moves count from 0, so a client moving on from B before C
//! heard from A, or coming back to A, is ordered as well. The same record tells B itself, where
//! the client's messages to B's workers are routed locally: B starts reading the client's new
//! stream once A's `ClientLeft` has come ([`ClientOrder::start_after_left`]).
//!
//! Nothing waits long for a `ClientLeft`: it comes within a link's give-up time (3 s) or its
//! sender is known gone ([`ClientOrder::instance_gone`]), and past [`LEFT_WITHIN`] what waited
//! is taken as it is, out of order but not lost ([`ClientOrder::expire`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Bridge, conn_id, malformed};
use crate::cluster::clients::{STAMP_FOR, Stamp};
use crate::cluster::wire::record::Kind;
use crate::core::{ConnId, InstanceId};

/// How long a message waits for its client's old home's `ClientLeft`, at most.
pub const LEFT_WITHIN: Duration = Duration::from_secs(5);

/// How long this instance remembers which `ClientLeft`s of a client came, after the last one
/// or the last message that needed one: past the time a moved client marks its messages.
const REMEMBER_FOR: Duration = STAMP_FOR.saturating_mul(2);

/// A record of a client's to take once its old home's `ClientLeft` has come, as it came.
struct Waiting {
    from: InstanceId,
    stamp: Stamp,
    record: Kind,
}

#[derive(Default)]
struct Order {
    /// The moves whose old home's `ClientLeft` came (or which this instance stopped waiting for).
    left: Vec<u32>,
    waiting: Vec<Waiting>,
    /// When the first of `waiting` came.
    since: Option<Instant>,
    touched: Option<Instant>,
}

impl Order {
    fn has_left(&self, moves: u32) -> bool {
        self.left.contains(&moves)
    }

    /// Whether a record stamped `stamp` waits behind `earlier` (those that came before it and
    /// still wait): for its old home's `ClientLeft`, for a record sent before its client's
    /// last move, or for one sent from the same instance before it.
    fn waits(&self, stamp: Stamp, earlier: &[Waiting]) -> bool {
        let moves = stamp.moves;
        let before = moves.checked_sub(1);
        (stamp.after_left_of != 0 && before.is_some_and(|m| !self.has_left(m)))
            || self.waiting.iter().any(|w| w.stamp.moves < moves)
            || earlier.iter().any(|w| w.stamp.moves == moves)
    }

    /// What no longer waits, in order.
    fn release(&mut self, out: &mut Vec<(InstanceId, Kind)>) {
        while let Some(i) =
            (0..self.waiting.len()).find(|&i| !self.waits(self.waiting[i].stamp, &self.waiting[..i]))
        {
            let w = self.waiting.remove(i);
            out.push((w.from, w.record));
        }
        if self.waiting.is_empty() {
            self.since = None;
        }
    }
}

/// A client that moved here, whose new stream is read once its old home's `ClientLeft` came.
struct Starting {
    moves: u32,
    from: InstanceId,
    by: Instant,
    start: oneshot::Sender<()>,
}

#[derive(Default)]
pub(super) struct ClientOrder {
    by_conn: HashMap<ConnId, Order>,
    starting: HashMap<ConnId, Starting>,
}

/// What to take now, each record with the instance it came from, in order.
pub(super) type Released = Vec<(InstanceId, Kind)>;

impl ClientOrder {
    /// A record for the client stream `conn` (a message or its departure) from `from`, which
    /// says `stamp` of the client's moves: returned to take now, or held.
    pub fn arrive(
        &mut self,
        from: InstanceId,
        conn: ConnId,
        stamp: Stamp,
        record: Kind,
        now: Instant,
    ) -> Option<Kind> {
        // Nothing waits for a client that never moved, nor for one this instance holds nothing
        // of when its message needs no `ClientLeft`.
        if stamp.moves == 0 || (stamp.after_left_of == 0 && !self.by_conn.contains_key(&conn)) {
            return Some(record);
        }
        let order = self.by_conn.entry(conn).or_default();
        order.touched = Some(now);
        if !order.waits(stamp, &order.waiting) {
            return Some(record);
        }
        order.since.get_or_insert(now);
        order.waiting.push(Waiting { from, stamp, record });
        None
    }

    /// The `ClientLeft` of `conn`'s move `moves` came (or will never come): what waited for it.
    pub fn left(&mut self, conn: ConnId, moves: u32, now: Instant) -> Released {
        let order = self.by_conn.entry(conn).or_default();
        order.touched = Some(now);
        if !order.has_left(moves) {
            order.left.push(moves);
        }
        let mut out = Vec::new();
        order.release(&mut out);
        if let Some(starting) = self.starting.remove(&conn) {
            if starting.moves == moves + 1 {
                let _ = starting.start.send(());
            } else {
                self.starting.insert(conn, starting);
            }
        }
        out
    }

    /// The client `conn` moved here from `from` (its `moves`-th move): `start` once `from`'s
    /// `ClientLeft` has come here (at once if it has), or [`LEFT_WITHIN`] has passed.
    pub fn start_after_left(
        &mut self,
        conn: ConnId,
        moves: u32,
        from: InstanceId,
        start: oneshot::Sender<()>,
        now: Instant,
    ) {
        if moves == 0 || self.by_conn.get(&conn).is_some_and(|o| o.has_left(moves - 1)) {
            let _ = start.send(());
            return;
        }
        self.starting.insert(conn, Starting { moves, from, by: now + LEFT_WITHIN, start });
    }

    /// `instance` is gone: no `ClientLeft` will come from it; what waited for one is taken.
    pub fn instance_gone(&mut self, instance: InstanceId) -> Released {
        let mut out = Vec::new();
        for order in self.by_conn.values_mut() {
            let gone: Vec<u32> = order
                .waiting
                .iter()
                .filter(|w| w.stamp.after_left_of == instance)
                .map(|w| w.stamp.moves - 1)
                .collect();
            if gone.is_empty() {
                continue;
            }
            order.left.extend(gone);
            order.release(&mut out);
        }
        self.start_where(|s| s.from == instance);
        out
    }

    /// Starts the streams waiting that `due` says may wait no more.
    fn start_where(&mut self, due: impl Fn(&Starting) -> bool) {
        let due: Vec<ConnId> = self.starting.iter().filter(|(_, s)| due(s)).map(|(conn, _)| *conn).collect();
        for conn in due {
            if let Some(starting) = self.starting.remove(&conn) {
                let _ = starting.start.send(());
            }
        }
    }

    /// What waited past [`LEFT_WITHIN`] is taken (oldest moves first, each in the order it
    /// came), and what is remembered past its use is forgotten.
    pub fn expire(&mut self, now: Instant) -> Released {
        let mut out = Vec::new();
        for (conn, order) in &mut self.by_conn {
            if order.since.is_some_and(|since| now.saturating_duration_since(since) >= LEFT_WITHIN) {
                crate::warn_throttled!(
                    conn = %conn,
                    "a moved client's old instance did not say it left: its messages are taken as they came"
                );
                order.left.extend(order.waiting.iter().filter_map(|w| w.stamp.moves.checked_sub(1)));
                let before = out.len();
                order.release(&mut out);
                metrics::counter!(crate::metrics::OUT_OF_ORDER).increment((out.len() - before) as u64);
            }
        }
        self.by_conn.retain(|_, order| {
            !order.waiting.is_empty()
                || order.touched.is_some_and(|t| now.saturating_duration_since(t) < REMEMBER_FOR)
        });
        self.start_where(|s| now >= s.by);
        out
    }

    /// The client stream `conn` ended: what still waited is taken, and nothing is remembered.
    pub fn forget(&mut self, conn: ConnId) -> Released {
        self.starting.remove(&conn);
        let Some(mut order) = self.by_conn.remove(&conn) else { return Vec::new() };
        order.left.extend(order.waiting.iter().filter_map(|w| w.stamp.moves.checked_sub(1)));
        let mut out = Vec::new();
        order.release(&mut out);
        out
    }

    #[cfg(test)]
    pub fn remembered(&self) -> usize {
        self.by_conn.len()
    }
}

impl Bridge {
    /// A record from `from`: taken now, or, if it is a moved client's and something it sent
    /// before its move has not come yet, once that has (see above).
    pub(super) fn record(&mut self, from: InstanceId, kind: Kind, now: Instant) {
        let follows = match &kind {
            Kind::ClientSignal(s) if s.moves > 0 => s.conn.map(|c| (c, s.moves, s.after_left_of)),
            Kind::ClientGone(g) if g.moves > 0 => g.conn.map(|c| (c, g.moves, g.after_left_of)),
            Kind::ClientLeft(l) => {
                let Some(conn) = l.conn.map(conn_id) else {
                    return malformed(from, "a client's departure names no stream");
                };
                let released = self.order.left(conn, l.moves, now);
                return self.take_released(released, now);
            }
            _ => None,
        };
        if let Some((conn, moves, after_left_of)) = follows {
            let stamp = Stamp { moves, after_left_of };
            if let Some(kind) = self.order.arrive(from, conn_id(conn), stamp, kind, now) {
                self.take(from, kind, now);
            }
            return;
        }
        self.take(from, kind, now)
    }

    /// Takes the records a moved client's old home's departure released, in order.
    pub(super) fn take_released(&mut self, released: Released, now: Instant) {
        for (from, kind) in released {
            self.take(from, kind, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::wire;

    const A: InstanceId = 0xa;
    const B: InstanceId = 0xb;
    const E: InstanceId = 0xe;
    const CONN: ConnId = ConnId { at: 1, instance: A };

    fn signal(worker: i64) -> Kind {
        Kind::ClientSignal(wire::ClientSignal { worker, ..Default::default() })
    }

    fn workers(released: Released) -> Vec<(InstanceId, i64)> {
        released
            .into_iter()
            .map(|(from, kind)| match kind {
                Kind::ClientSignal(s) => (from, s.worker),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn after(moves: u32, of: InstanceId) -> Stamp {
        Stamp { moves, after_left_of: of }
    }

    #[test]
    fn what_a_client_sends_after_moving_waits_for_its_old_home_s_departure() {
        let (mut order, t0) = (ClientOrder::default(), Instant::now());
        assert!(order.arrive(A, CONN, Stamp::default(), signal(1), t0).is_some(), "never moved: at once");
        assert!(order.arrive(B, CONN, after(1, A), signal(2), t0).is_none());
        assert!(order.arrive(B, CONN, after(1, A), signal(3), t0).is_none(), "behind the one before it");
        // A's last message, then its departure, on A's link.
        assert!(order.arrive(A, CONN, Stamp::default(), signal(4), t0).is_some());
        assert_eq!(workers(order.left(CONN, 0, t0)), [(B, 2), (B, 3)]);
        assert!(order.arrive(B, CONN, after(1, A), signal(5), t0).is_some(), "A left: at once");
    }

    #[test]
    fn moves_in_a_row_are_taken_in_their_order_whichever_departure_comes_first() {
        let (mut order, t0) = (ClientOrder::default(), Instant::now());
        // From E (its second move, after B), then from B (after A): E's waits for B's.
        assert!(order.arrive(E, CONN, after(2, B), signal(20), t0).is_none());
        assert!(order.arrive(B, CONN, after(1, A), signal(10), t0).is_none());
        assert!(order.left(CONN, 1, t0).is_empty(), "B's messages still wait for A");
        assert_eq!(workers(order.left(CONN, 0, t0)), [(B, 10), (E, 20)]);
        // A message from B's time that was not marked (B no longer marks) never waits.
        assert!(order.arrive(B, CONN, Stamp { moves: 1, after_left_of: 0 }, signal(11), t0).is_some());
    }

    #[test]
    fn nothing_waits_past_its_bound_or_for_an_instance_that_is_gone() {
        let (mut order, t0) = (ClientOrder::default(), Instant::now());
        assert!(order.arrive(B, CONN, after(1, A), signal(1), t0).is_none());
        assert!(order.expire(t0 + LEFT_WITHIN / 2).is_empty());
        assert_eq!(workers(order.expire(t0 + LEFT_WITHIN)), [(B, 1)]);
        assert!(order.arrive(B, CONN, after(1, A), signal(2), t0).is_some(), "no longer waited for");

        let other = ConnId { at: 2, instance: A };
        assert!(order.arrive(B, other, after(1, A), signal(3), t0).is_none());
        assert!(order.instance_gone(E).is_empty());
        assert_eq!(workers(order.instance_gone(A)), [(B, 3)]);

        let third = ConnId { at: 3, instance: A };
        assert!(order.arrive(B, third, after(1, A), signal(4), t0).is_none());
        assert_eq!(workers(order.forget(third)), [(B, 4)], "a departure takes what waited, not drops it");
        // What is remembered goes once its use is past.
        assert_eq!(order.remembered(), 2);
        assert!(order.expire(t0 + REMEMBER_FOR).is_empty());
        assert_eq!(order.remembered(), 0);
    }

    #[test]
    fn a_moved_client_s_stream_is_read_once_its_old_home_s_departure_came() {
        let (mut order, t0) = (ClientOrder::default(), Instant::now());
        let (start, mut started) = oneshot::channel();
        order.start_after_left(CONN, 1, A, start, t0);
        assert!(started.try_recv().is_err());
        assert!(order.left(CONN, 0, t0).is_empty());
        assert_eq!(started.try_recv(), Ok(()));
        // It came first: at once.
        let (start, mut started) = oneshot::channel();
        order.start_after_left(CONN, 1, A, start, t0);
        assert_eq!(started.try_recv(), Ok(()));
        // Or once the bound has passed, or the old home is gone.
        let other = ConnId { at: 2, instance: A };
        let (start, mut started) = oneshot::channel();
        order.start_after_left(other, 1, A, start, t0);
        order.expire(t0 + LEFT_WITHIN);
        assert_eq!(started.try_recv(), Ok(()));
        let (start, mut started) = oneshot::channel();
        order.start_after_left(other, 3, B, start, t0);
        order.instance_gone(B);
        assert_eq!(started.try_recv(), Ok(()));
    }
}
