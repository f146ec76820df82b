//! A server-reflexive address: what a STUN server sees of a peer connection's socket (an RFC
//! 5389 Binding, with the `stun_codec` crate). Asked once, from the socket itself, before the
//! connection runs: the mapping belongs to that socket.

use std::net::SocketAddr;
use std::time::Duration;

use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::rfc5389::attributes::{MappedAddress, XorMappedAddress};
use stun_codec::rfc5389::{Attribute, methods::BINDING};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};
use tokio::net::UdpSocket;

/// Waits for an answer before sending the request again: 250 ms, 500 ms, 750 ms (RFC 5389
/// starts at 500 ms; a peer connection should not wait that long for one candidate).
const TRIES: [Duration; 3] =
    [Duration::from_millis(250), Duration::from_millis(500), Duration::from_millis(750)];

/// A Binding request with a fresh transaction id.
pub fn request() -> (TransactionId, Vec<u8>) {
    let id = TransactionId::new(rand::random());
    let message = Message::<Attribute>::new(MessageClass::Request, BINDING, id);
    let bytes = MessageEncoder::new().encode_into_bytes(message).expect("a Binding request encodes");
    (id, bytes)
}

/// The address in a successful Binding response to `id`, if `bytes` is one.
pub fn mapped(bytes: &[u8], id: TransactionId) -> Option<SocketAddr> {
    let message = MessageDecoder::<Attribute>::new().decode_from_bytes(bytes).ok()?.ok()?;
    if message.class() != MessageClass::SuccessResponse || message.transaction_id() != id {
        return None;
    }
    let xor = message.get_attribute::<XorMappedAddress>().map(|a| a.address());
    xor.or_else(|| message.get_attribute::<MappedAddress>().map(|a| a.address()))
}

/// The address `server` sees `socket` from, or `None` if it does not answer within 1.5 s.
pub async fn reflexive(socket: &UdpSocket, server: SocketAddr) -> Option<SocketAddr> {
    let (id, request) = request();
    let mut buf = [0u8; 1500];
    for wait in TRIES {
        socket.send_to(&request, server).await.ok()?;
        let answered = tokio::time::timeout(wait, async {
            loop {
                let (len, from) = socket.recv_from(&mut buf).await.ok()?;
                if from == server
                    && let Some(mapped) = mapped(&buf[..len], id)
                {
                    return Some(mapped);
                }
            }
        })
        .await;
        if let Ok(mapped) = answered {
            return mapped;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(id: TransactionId, class: MessageClass, to: SocketAddr) -> Vec<u8> {
        let mut message = Message::<Attribute>::new(class, BINDING, id);
        message.add_attribute(XorMappedAddress::new(to));
        MessageEncoder::new().encode_into_bytes(message).unwrap()
    }

    #[test]
    fn the_mapped_address_of_the_answer_to_our_request_and_nothing_else() {
        let (id, request) = request();
        assert_eq!(&request[..2], &[0x00, 0x01], "a Binding request");
        let to: SocketAddr = "203.0.113.7:40000".parse().unwrap();
        assert_eq!(mapped(&reply(id, MessageClass::SuccessResponse, to), id), Some(to));
        let (other, _) = super::request();
        assert_eq!(mapped(&reply(other, MessageClass::SuccessResponse, to), id), None, "another transaction");
        assert_eq!(mapped(&reply(id, MessageClass::ErrorResponse, to), id), None, "an error response");
        assert_eq!(mapped(b"not stun at all", id), None);
    }
}
