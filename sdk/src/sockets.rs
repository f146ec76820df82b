//! A peer connection's UDP sockets: one per local address, each a host candidate. str0m says
//! which local address each datagram leaves from; each arriving datagram is handed to it with
//! the address it arrived on.

use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::task::Poll;

use tokio::io::ReadBuf;
use tokio::net::UdpSocket;

/// The addresses a peer connection's sockets bind: `ip` alone when given (and not
/// unspecified), else every interface address that is not loopback nor link-local, else
/// loopback (a machine with only `lo`). Read at each bind: a network change is seen by the next
/// peer connection, and by `rebind`.
pub fn host_addresses(ip: Option<IpAddr>) -> Vec<IpAddr> {
    if let Some(ip) = ip.filter(|ip| !ip.is_unspecified()) {
        return vec![ip];
    }
    let usable = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        // Link-local IPv6 needs a scope id in candidates, which SDP lines do not carry.
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    };
    let mut found: Vec<IpAddr> = if_addrs::get_if_addrs()
        .map(|ifs| ifs.into_iter().map(|i| i.ip()).filter(usable).collect())
        .unwrap_or_default();
    found.dedup();
    if found.is_empty() {
        found.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    found
}

/// The sockets, in the order of their addresses.
pub struct Sockets {
    all: Vec<(UdpSocket, SocketAddr)>,
}

impl Sockets {
    /// One socket per address, on a fresh port; addresses that cannot be bound are left out,
    /// as long as one can.
    pub async fn bind(ips: &[IpAddr]) -> io::Result<Sockets> {
        let mut all = Vec::with_capacity(ips.len());
        let mut failed = None;
        for ip in ips {
            match UdpSocket::bind(SocketAddr::new(*ip, 0)).await {
                Ok(socket) => {
                    let local = socket.local_addr()?;
                    all.push((socket, local));
                }
                Err(e) => failed = Some(e),
            }
        }
        match (all.is_empty(), failed) {
            (true, Some(e)) => Err(e),
            (true, None) => Err(io::Error::new(io::ErrorKind::AddrNotAvailable, "no address to bind")),
            (false, _) => Ok(Sockets { all }),
        }
    }

    /// The local addresses: the host candidates.
    pub fn locals(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.all.iter().map(|(_, local)| *local)
    }

    /// The first IPv4 socket (else the first): the one asked about by STUN.
    pub fn primary(&self) -> (&UdpSocket, SocketAddr) {
        let (socket, local) = self.all.iter().find(|(_, l)| l.is_ipv4()).unwrap_or(&self.all[0]);
        (socket, *local)
    }

    /// Sends from the socket bound to `from` (else the first of the same family). A failed send
    /// on UDP is a lost datagram, which ICE, DTLS and SCTP retransmit.
    pub async fn send(&self, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        let socket = self
            .all
            .iter()
            .find(|(_, local)| *local == from)
            .or_else(|| self.all.iter().find(|(_, local)| local.is_ipv4() == to.is_ipv4()));
        if let Some((socket, _)) = socket {
            let _ = socket.send_to(data, to).await;
        }
    }

    /// The next datagram on any socket: its length, where it came from, where it arrived.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, SocketAddr)> {
        poll_fn(|cx| {
            for (socket, local) in &self.all {
                let mut read = ReadBuf::new(buf);
                if let Poll::Ready(received) = socket.poll_recv_from(cx, &mut read) {
                    return Poll::Ready(received.map(|source| (read.filled().len(), source, *local)));
                }
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_address_is_used_alone_and_there_is_always_one() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(host_addresses(Some(ip)), vec![ip]);
        let found = host_addresses(None);
        assert!(!found.is_empty());
        assert!(found.iter().all(|ip| !ip.is_unspecified()), "{found:?}");
        assert_eq!(host_addresses(Some("0.0.0.0".parse().unwrap())), found);
    }

    #[tokio::test]
    async fn each_datagram_arrives_with_the_address_it_came_to() {
        let ips: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
        let sockets = Sockets::bind(&ips).await.unwrap();
        let locals: Vec<_> = sockets.locals().collect();
        assert_eq!(locals.len(), 2);
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 16];
        for (i, local) in locals.iter().enumerate() {
            peer.send_to(&[i as u8], local).await.unwrap();
            let (n, source, destination) = sockets.recv(&mut buf).await.unwrap();
            assert_eq!((n, buf[0], source, destination), (1, i as u8, peer.local_addr().unwrap(), *local));
            // And the answer leaves from the socket it is sent from.
            sockets.send(*local, source, b"x").await;
            let (_, from) = peer.recv_from(&mut buf).await.unwrap();
            assert_eq!(from, *local);
        }
    }
}
