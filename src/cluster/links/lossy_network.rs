//! The links of two instances over a network that loses, duplicates and reorders frames at
//! random: every record pushed is handed on once and in order, or given back to its sender as
//! lost when its link is given up (the one case in which it may also arrive).

use std::collections::VecDeque;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::cluster::link::GIVE_UP_AFTER;

const A: InstanceId = 0xa;
const B: InstanceId = 0xb;

#[derive(Debug, Clone)]
enum Step {
    /// A pushes this many records and flushes.
    Send(u8),
    /// The oldest frame in flight one way is lost, duplicated, delivered late, or delivered.
    Net { to_b: bool, fate: u8 },
    /// Time passes (ms), and both sides tick their resends.
    Wait(u16),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u8..5).prop_map(Step::Send),
        (any::<bool>(), 0u8..10).prop_map(|(to_b, fate)| Step::Net { to_b, fate }),
        (1u16..400).prop_map(Step::Wait),
    ]
}

struct World {
    a: Links<u32>,
    b: Links<u32>,
    to_b: VecDeque<Bytes>,
    to_a: VecDeque<Bytes>,
    now: Instant,
    next: u32,
    delivered: Vec<u32>,
    lost: Vec<u32>,
}

impl World {
    fn flush(&mut self) {
        let (to_b, to_a, now) = (&mut self.to_b, &mut self.to_a, self.now);
        self.a.flush(now, |_, f| to_b.push_back(f));
        self.b.flush(now, |_, f| to_a.push_back(f));
    }

    fn arrive(&mut self, to_b: bool, frame: Bytes) {
        let frame = wire::Frame::decode(frame).expect("our own frames decode");
        if to_b {
            let (records, _) = self.b.receive(frame, self.now);
            for r in records {
                match r.kind {
                    Some(Kind::ClientGone(g)) => self.delivered.push(g.client as u32),
                    other => panic!("unexpected {other:?}"),
                }
            }
        } else {
            self.a.receive(frame, self.now);
        }
    }

    fn tick(&mut self) {
        for instance in self.a.dead(self.now) {
            self.lost.extend(self.a.forget(instance, self.now));
        }
        let (to_b, to_a, now) = (&mut self.to_b, &mut self.to_a, self.now);
        self.a.resend(now, |_, f| to_b.push_back(f));
        self.b.resend(now, |_, f| to_a.push_back(f));
        self.flush();
    }

    fn run(&mut self, step: Step) {
        match step {
            Step::Send(n) => {
                for _ in 0..n {
                    let kind =
                        Kind::ClientGone(wire::ClientGone { client: self.next as i64, ..Default::default() });
                    self.a.push(B, kind, self.next);
                    self.next += 1;
                }
                self.flush();
            }
            Step::Net { to_b, fate } => {
                let queue = if to_b { &mut self.to_b } else { &mut self.to_a };
                let Some(frame) = queue.pop_front() else { return };
                match fate {
                    0 | 1 => {}                  // lost
                    2 => queue.push_back(frame), // reordered: late
                    3 => {
                        queue.push_back(frame.clone()); // duplicated
                        self.arrive(to_b, frame);
                    }
                    _ => self.arrive(to_b, frame),
                }
                self.flush();
            }
            Step::Wait(ms) => {
                self.now += Duration::from_millis(ms as u64);
                self.tick();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(256)))]

    #[test]
    fn exactly_once_in_order_or_given_back(steps in proptest::collection::vec(step(), 1..200)) {
        let now = Instant::now();
        let mut w = World {
            a: Links::new(A), b: Links::new(B), to_b: VecDeque::new(), to_a: VecDeque::new(),
            now, next: 0, delivered: Vec::new(), lost: Vec::new(),
        };
        for step in steps {
            w.run(step);
        }
        // Then the network heals: everything still in flight arrives, resends included.
        for _ in 0..50 {
            while let Some(f) = w.to_b.pop_front() { w.arrive(true, f); }
            w.flush();
            while let Some(f) = w.to_a.pop_front() { w.arrive(false, f); }
            w.now += Duration::from_millis(300).min(GIVE_UP_AFTER / 4);
            w.tick();
        }
        prop_assert!(w.a.is_quiet(), "everything acknowledged or given back");
        // Handed on at most once, in order.
        prop_assert!(w.delivered.windows(2).all(|p| p[0] < p[1]), "once, in order: {:?}", w.delivered);
        // Every record is handed on or given back. Only a record given back (its link given
        // up while the frame was still on its way: docs/cluster.md, "Outcomes") may be both.
        let mut seen = w.delivered.clone();
        seen.extend(&w.lost);
        seen.sort_unstable();
        seen.dedup();
        prop_assert_eq!(seen, (0..w.next).collect::<Vec<_>>(), "delivered {:?} lost {:?}", w.delivered, w.lost);
        if w.lost.is_empty() {
            prop_assert_eq!(w.delivered.len() as u32, w.next, "exactly once while the link lives");
        }
    }
}
