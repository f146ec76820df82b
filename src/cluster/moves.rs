//! A worker moving to another instance with its sessions, on the cluster wire (see
//! [`super::tunnels`]): its holder answers the resume ask with what the new home takes over
//! ([`MovedWorker`]), and the new home's claim says where it came from, so that the instances
//! of its clients move their sessions with it instead of ending them.

use super::bridge::{conn_id, wire_conn};
use super::tunnels::{MovedClient, MovedSession, MovedWorker};
use super::wire;
use crate::core::session::State;
use crate::core::{InstanceId, Outbound};
use crate::pb::{ErrorCode, RtcEvent};

fn held_to_wire(messages: &[Outbound]) -> Vec<wire::HeldMessage> {
    messages
        .iter()
        .map(|m| wire::HeldMessage {
            worker: m.worker,
            client: m.client,
            event: m.event as i32,
            payload: m.payload.clone(),
            error_code: m.error as i32,
        })
        .collect()
}

fn held_from_wire(messages: Vec<wire::HeldMessage>) -> Option<Vec<Outbound>> {
    let mut held = Vec::with_capacity(messages.len());
    for m in messages {
        held.push(Outbound {
            event: RtcEvent::try_from(m.event).ok()?,
            worker: m.worker,
            client: m.client,
            payload: m.payload,
            error: ErrorCode::try_from(m.error_code).unwrap_or(ErrorCode::Unspecified),
        });
    }
    Some(held)
}

pub fn client_to_wire(moved: &MovedClient) -> wire::MovedClient {
    wire::MovedClient {
        first_seq: moved.first_seq,
        last_received: moved.last_received,
        messages: held_to_wire(&moved.messages),
        conn: Some(wire_conn(moved.conn)),
        sessions: moved
            .sessions
            .iter()
            .map(|(worker, instance)| wire::ClientSession { worker: *worker, instance: *instance })
            .collect(),
        moves: moved.moves,
    }
}

pub fn client_from_wire(from: InstanceId, moved: wire::MovedClient) -> Option<MovedClient> {
    Some(MovedClient {
        from,
        conn: conn_id(moved.conn?),
        first_seq: moved.first_seq.max(1),
        last_received: moved.last_received,
        messages: held_from_wire(moved.messages)?,
        sessions: moved.sessions.into_iter().map(|s| (s.worker, s.instance)).collect(),
        moves: moved.moves,
    })
}

pub fn to_wire(moved: &MovedWorker) -> wire::Moved {
    let messages = held_to_wire(&moved.messages);
    let sessions = moved
        .sessions
        .iter()
        .map(|s| wire::MovedSession {
            client: s.client,
            conn: Some(wire_conn(s.conn)),
            state: state_number(s.state),
            at: if s.at == s.conn.instance { 0 } else { s.at },
        })
        .collect();
    wire::Moved { first_seq: moved.first_seq, last_received: moved.last_received, messages, sessions }
}

/// What `from` sent, or `None` if it cannot be taken over as it is (an event or a state this
/// instance does not know): the worker then starts afresh here, rather than half moved.
pub fn from_wire(from: InstanceId, moved: wire::Moved) -> Option<MovedWorker> {
    let messages = held_from_wire(moved.messages)?;
    let mut sessions = Vec::with_capacity(moved.sessions.len());
    for s in moved.sessions {
        let conn = conn_id(s.conn?);
        let at = if s.at == 0 { conn.instance } else { s.at };
        sessions.push(MovedSession { client: s.client, conn, at, state: state_of(s.state)? });
    }
    Some(MovedWorker {
        from,
        first_seq: moved.first_seq.max(1),
        last_received: moved.last_received,
        messages,
        sessions,
    })
}

fn state_number(state: State) -> i32 {
    match state {
        State::Offered => 1,
        State::Answered => 2,
        State::Accepted => 3,
    }
}

fn state_of(number: i32) -> Option<State> {
    match number {
        1 => Some(State::Offered),
        2 => Some(State::Answered),
        3 => Some(State::Accepted),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::core::ConnId;

    #[test]
    fn a_moved_worker_crosses_the_wire_unchanged_and_an_unknown_state_is_refused() {
        let moved = MovedWorker {
            from: 0xa,
            first_seq: 8,
            last_received: 3,
            messages: vec![
                Outbound::relay(RtcEvent::IceCandidate, 7, 1, Bytes::from_static(b"c")),
                Outbound::error(ErrorCode::PeerOverloaded, 7, 2, "slow"),
            ],
            sessions: State::ALL
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let conn = ConnId { at: 5 + i as u64, instance: 0xc };
                    // The first client moved from its stream's instance.
                    let at = if i == 0 { 0xd } else { conn.instance };
                    MovedSession { client: i as i64 + 1, conn, at, state: *s }
                })
                .collect(),
        };
        assert_eq!(from_wire(0xa, to_wire(&moved)), Some(moved.clone()));
        let mut unknown = to_wire(&moved);
        unknown.sessions[0].state = 9;
        assert_eq!(from_wire(0xa, unknown), None);
    }
}
