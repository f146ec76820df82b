//! The negotiation state machine of one session, the pair (client, worker).
//!
//! ```text
//! none --client OFFER--> offered --worker ANSWER--> answered --client ACCEPT_ANSWER--> accepted
//! ```
//! A client `OFFER` in any state renegotiates (back to `offered`). Client candidates are allowed
//! from `offered` on (trickle ICE); worker candidates only once the worker has answered.
//! Everything else is refused with `INVALID_TRANSITION`. Pure and clock-free: the router owns the
//! state and calls [`step`] for every relayable message.

use crate::core::Role;
use crate::pb::RtcEvent;

/// Where a session's negotiation stands. A session that does not exist is `None` in [`step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Offered,
    Answered,
    Accepted,
}

impl State {
    pub const ALL: [State; 3] = [State::Offered, State::Answered, State::Accepted];

    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Offered => "offered",
            State::Answered => "answered",
            State::Accepted => "accepted",
        }
    }
}

/// Why a message was refused: the human-readable reason sent back in the `ERROR`.
pub type Refusal = &'static str;

/// The state a session moves to when `from` sends `event` in `state`, or why it may not.
pub fn step(state: Option<State>, from: Role, event: RtcEvent) -> Result<State, Refusal> {
    use RtcEvent::*;
    use State::*;
    match (from, event, state) {
        (Role::Client, Offer, _) => Ok(Offered),
        (Role::Client, AcceptAnswer, Some(Answered)) => Ok(Accepted),
        (Role::Client, AcceptAnswer, Some(Accepted)) => Err("the answer was already accepted"),
        (Role::Client, AcceptAnswer, _) => Err("ACCEPT_ANSWER before the worker's ANSWER"),
        (Role::Client, LocalIceCandidate, Some(s)) => Ok(s),
        (Role::Client, LocalIceCandidate, None) => Err("no session with this worker: send OFFER first"),
        (Role::Client, Answer, _) => Err("only a worker may send ANSWER"),
        (Role::Worker, Answer, Some(Offered)) => Ok(Answered),
        (Role::Worker, Answer, Some(_)) => Err("this offer was already answered"),
        (Role::Worker, LocalIceCandidate, Some(s @ (Answered | Accepted))) => Ok(s),
        (Role::Worker, LocalIceCandidate, Some(Offered)) => {
            Err("worker candidates are allowed only after its ANSWER")
        }
        (Role::Worker, Answer | LocalIceCandidate, None) => Err("no session with this client"),
        (Role::Worker, Offer, _) => Err("only a client may send OFFER"),
        (Role::Worker, AcceptAnswer, _) => Err("only a client may send ACCEPT_ANSWER"),
        (_, IceCandidate, _) => Err("ICE_CANDIDATE is sent by the distributor; send LOCAL_ICE_CANDIDATE"),
        (_, Error | PeerGone | Reconnect, _) => {
            Err("ERROR, PEER_GONE and RECONNECT are sent by the distributor only")
        }
        (_, Blank, _) => Err("BLANK is only a worker's first message"),
        (_, Ping, _) => Err("PING is answered by the distributor, never relayed"),
    }
}

/// Whether `from` may ever send `event` to the other side, whatever the session's state.
/// Checked before the addressed peer is looked up, so that a malformed request is named as such.
pub fn is_relayable(from: Role, event: RtcEvent) -> bool {
    matches!(
        (from, event),
        (Role::Client, RtcEvent::Offer | RtcEvent::AcceptAnswer | RtcEvent::LocalIceCandidate)
            | (Role::Worker, RtcEvent::Answer | RtcEvent::LocalIceCandidate)
    )
}

/// Whether a peer receiving `event` receives another peer's message relayed (an event
/// [`RtcEvent::forwarded`] makes). A relay that cannot be delivered is owed an `ERROR` to its sender;
/// what the distributor says itself (`BLANK`, `PING`, `ERROR`, `PEER_GONE`) is owed nothing.
pub fn is_relay(event: RtcEvent) -> bool {
    matches!(event, RtcEvent::Offer | RtcEvent::Answer | RtcEvent::AcceptAnswer | RtcEvent::IceCandidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use RtcEvent::*;
    use State::*;

    const EVENTS: [RtcEvent; 10] = [
        Offer,
        Answer,
        AcceptAnswer,
        IceCandidate,
        LocalIceCandidate,
        Blank,
        Ping,
        Error,
        PeerGone,
        Reconnect,
    ];
    const STATES: [Option<State>; 4] = [None, Some(Offered), Some(Answered), Some(Accepted)];

    /// The whole table, written out: every (role, state, event) triple and its outcome.
    fn expected(from: Role, state: Option<State>, event: RtcEvent) -> Option<State> {
        match from {
            Role::Client => match (event, state) {
                (Offer, _) => Some(Offered),
                (AcceptAnswer, Some(Answered)) => Some(Accepted),
                (LocalIceCandidate, Some(s)) => Some(s),
                _ => None,
            },
            Role::Worker => match (event, state) {
                (Answer, Some(Offered)) => Some(Answered),
                (LocalIceCandidate, Some(Answered)) => Some(Answered),
                (LocalIceCandidate, Some(Accepted)) => Some(Accepted),
                _ => None,
            },
        }
    }

    #[test]
    fn every_state_event_pair() {
        let mut allowed = 0;
        for from in [Role::Client, Role::Worker] {
            for state in STATES {
                for event in EVENTS {
                    let got = step(state, from, event);
                    assert_eq!(got.ok(), expected(from, state, event), "{from:?} {event:?} in {state:?}");
                    if let Err(reason) = got {
                        assert!(!reason.is_empty());
                    } else {
                        allowed += 1;
                        assert!(is_relayable(from, event), "{from:?} {event:?} allowed but not relayable");
                    }
                }
            }
        }
        // client: OFFER x4, ACCEPT_ANSWER x1, candidates x3; worker: ANSWER x1, candidates x2.
        assert_eq!(allowed, 11);
    }

    #[test]
    fn full_negotiation_path() {
        let s = step(None, Role::Client, Offer).unwrap();
        let s = step(Some(s), Role::Client, LocalIceCandidate).unwrap();
        assert_eq!(s, Offered);
        let s = step(Some(s), Role::Worker, Answer).unwrap();
        let s = step(Some(s), Role::Worker, LocalIceCandidate).unwrap();
        let s = step(Some(s), Role::Client, AcceptAnswer).unwrap();
        assert_eq!(s, Accepted);
        assert_eq!(step(Some(s), Role::Client, Offer), Ok(Offered), "renegotiation");
    }

    #[test]
    fn relays_are_exactly_what_relayable_messages_arrive_as() {
        for event in EVENTS {
            let arrives_as_relay = [Role::Client, Role::Worker]
                .into_iter()
                .any(|from| EVENTS.iter().any(|sent| is_relayable(from, *sent) && sent.forwarded() == event));
            assert_eq!(is_relay(event), arrives_as_relay, "{event:?}");
        }
    }

    #[test]
    fn local_candidates_arrive_as_remote_candidates() {
        assert_eq!(LocalIceCandidate.forwarded(), IceCandidate);
        assert_eq!(Offer.forwarded(), Offer);
        assert_eq!(AcceptAnswer.forwarded(), AcceptAnswer);
    }
}
