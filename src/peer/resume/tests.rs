//! Resumable peers: takeover, release, moves, drains.

use bytes::Bytes;
use futures::FutureExt;
use tokio_stream::StreamExt;

use super::*;
use crate::core::ConnId;
use crate::pb::RtcEvent;
use crate::peer::Conn;

fn candidate() -> Outbound {
    Outbound::relay(RtcEvent::IceCandidate, 7, 1, Bytes::from_static(b"c"))
}

/// Peer 7, resumable, held with one stream attached: its queue, that stream, what it writes.
fn held(peers: &Resumables<Outbound>) -> (Sink, Arc<Attachment<Outbound>>, Resumed<Outbound>) {
    let (sink, outbound) = Conn::open_numbered(ConnId { at: 1, instance: 1 }, 8, |m, _| m);
    let attachment = Attachment::new();
    peers.insert(7, sink.clone(), outbound, &attachment);
    let stream = Resumed::new(attachment.clone());
    (sink, attachment, stream)
}

#[test]
fn a_peer_is_let_go_only_with_no_session_nothing_owed_and_everything_received() {
    let peers = Resumables::default();
    let (sink, attachment, mut stream) = held(&peers);

    sink.try_deliver(candidate()).unwrap();
    assert_eq!(peers.release(7, 0), None, "a message queued");
    assert!(matches!(stream.next().now_or_never(), Some(Some(Ok(_)))), "written, numbered 1");
    assert_eq!(peers.release(7, 0), None, "the peer has not received 1");
    let permit = sink.try_reserve().unwrap();
    assert_eq!(peers.release(7, 1), None, "an answer owed to the peer");
    drop(permit);
    assert!(sink.open_session(0));
    assert_eq!(peers.release(7, 1), None, "a session held");
    assert!(sink.try_reserve().is_some(), "a release given up leaves the queue as it was");
    sink.close_session();
    sink.received(5);

    assert_eq!(peers.release(7, 1), Some(Released { next_seq: 2, last_received: 5 }));
    assert!(sink.is_ended() && attachment.is_taken_over(), "its queue and its stream end");
    assert!(sink.try_deliver(candidate()).is_err() && sink.try_reserve().is_none());
    assert!(!peers.holds(7) && peers.release(7, 1).is_none(), "let go once");
    assert!(matches!(peers.expire(7, 0), Some(Expired::Released(_))), "departs without expiring");
}

#[test]
fn a_moving_worker_takes_what_it_missed_and_what_was_queued_and_its_queue_ends() {
    let peers = Resumables::default();
    let (sink, attachment, mut stream) = held(&peers);
    assert!(sink.open_session(0));
    for _ in 0..3 {
        sink.try_deliver(candidate()).unwrap();
    }
    for _ in 0..2 {
        assert!(matches!(stream.next().now_or_never(), Some(Some(Ok(_)))), "written, numbered");
    }
    assert!(peers.begin_move(7, 5).is_none(), "it cannot have received what was not written");
    sink.received(4);
    let moving = peers.begin_move(7, 1).expect("kept, and little to take along");
    assert!(attachment.is_taken_over() && !sink.is_ended(), "its stream ends, its queue not yet");
    let taken = peers.finish_move(7, 1, &moving);
    // 2 (written, not received), then 3 (queued).
    assert_eq!((taken.messages.len(), taken.last_received), (2, 4));
    assert!(sink.is_ended() && !peers.holds(7));
    assert_eq!(sink.queued(), 0, "the queue gave its slots back");
}

#[test]
fn a_drain_tells_each_stream_once_and_a_resumed_one_again_once_it_holds_nothing() {
    let peers = Resumables::default();
    let (sink, _first, mut stream) = held(&peers);
    assert!(sink.open_session(0));
    let reconnect = |id| Outbound::relay(RtcEvent::Reconnect, id, 0, Bytes::new());
    assert_eq!(peers.reconnect(false, reconnect), [sink.id()], "every open stream at first");
    assert!(matches!(stream.next().now_or_never(), Some(Some(Ok(m))) if m.event == RtcEvent::Reconnect));
    assert!(peers.reconnect(false, reconnect).is_empty(), "once per stream");
    // It resumes on a new stream (through a tunnel), its session still held.
    let second = Attachment::new();
    let welcome = Outbound::relay(RtcEvent::Blank, 7, 0, Bytes::new());
    assert!(matches!(peers.take_over(7, 1, &second, welcome), Resume::Resumed(_)));
    assert!(peers.reconnect(true, reconnect).is_empty(), "it holds a session");
    sink.close_session();
    assert_eq!(peers.reconnect(true, reconnect), [sink.id()], "idle on its new stream: told again");
    assert!(peers.reconnect(true, reconnect).is_empty());
}

#[test]
fn a_peer_moved_here_numbers_on_and_its_welcome_says_resumed() {
    let (sink, mut outbound) =
        Conn::open_numbered(ConnId { at: 1, instance: 2 }, 8, |m, n: Numbering| (m.event, n));
    outbound.moved_from(Released { next_seq: 12, last_received: 4 });
    sink.deliver_owed(Outbound::relay(RtcEvent::Blank, 7, 0, Bytes::new()));
    sink.try_deliver(candidate()).unwrap();
    let mut written = Vec::new();
    while let Some(Some(Ok(m))) = outbound.next().now_or_never() {
        written.push(m);
    }
    let welcome = Numbering { seq: 4, resumed: true };
    assert_eq!(
        written,
        [(RtcEvent::Blank, welcome), (RtcEvent::IceCandidate, Numbering { seq: 12, resumed: false })]
    );
    assert!(outbound.numbers().unwrap().after(11).is_ok(), "a resume after 11 replays 12");
    assert!(outbound.numbers().unwrap().after(10).is_err(), "what was written elsewhere is not here");
}
