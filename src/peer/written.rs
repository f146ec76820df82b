//! What is written to peers, counted in one place: where a message leaves for its peer.
//!
//! Every message a peer receives passes through its stream's writer once, whatever path it took
//! (routed here, refused by the edge, carried from another instance), so counting there counts
//! each exactly once, on the instance whose peer received it. The handles are looked up once,
//! on the first message written: the metrics recorder must be installed before serving.

use std::sync::OnceLock;

use metrics::Counter;

use crate::core::{Outbound, session};
use crate::metrics as names;
use crate::pb::{ErrorCode, RtcEvent};

struct Written {
    /// By the event the receiver got; only relays of another peer's message.
    relayed: Vec<Counter>,
    /// `ERROR`s, by code.
    errors: Vec<Counter>,
}

static WRITTEN: OnceLock<Written> = OnceLock::new();

fn handles() -> &'static Written {
    WRITTEN.get_or_init(|| Written {
        relayed: dense(RtcEvent::Reconnect as i32, |e| {
            let event = RtcEvent::try_from(e).expect("dense enum").as_str_name();
            metrics::counter!(names::MESSAGES_RELAYED, "event" => event)
        }),
        errors: dense(ErrorCode::TooManySessions as i32, |c| {
            let code = ErrorCode::try_from(c).expect("dense enum").as_str_name();
            metrics::counter!(names::ERRORS, "code" => code)
        }),
    })
}

fn dense(last: i32, handle: impl Fn(i32) -> Counter) -> Vec<Counter> {
    (0..=last).map(handle).collect()
}

/// Counts one message written to its peer.
pub(crate) fn count(msg: &Outbound) {
    if msg.event == RtcEvent::Error {
        if let Some(counter) = handles().errors.get(msg.error as usize) {
            counter.increment(1);
        }
    } else if session::is_relay(msg.event) {
        handles().relayed[msg.event as usize].increment(1);
    }
}
