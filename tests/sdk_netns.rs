//! The SDK's automatic ICE restart, on a network that really goes away: the worker runs as its
//! own process in a network namespace created here, joined to this one by a veth pair; the
//! link is taken down long enough for ICE to lose its pair, then brought back. The client must
//! restart ICE through the distributor by itself, and its data channel must work again after.
//!
//! The worker binds every address of its namespace (no `--bind`), one of which the client has
//! no route to: ICE must find the pair that works among its host candidates.
//!
//! Needs root and `ip netns` (iproute2): without them it reports itself skipped, with the reason.
mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use distributor::config::Config;
use distributor_sdk::{Client, PeerEvent};

const HOST: Ipv4Addr = Ipv4Addr::new(10, 233, 77, 1);
const INSIDE: Ipv4Addr = Ipv4Addr::new(10, 233, 77, 2);
const UNREACHABLE: Ipv4Addr = Ipv4Addr::new(10, 233, 78, 2);

/// A namespace and a veth pair, removed when dropped (the veth goes with the namespace).
struct Net {
    ns: String,
    host_if: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Net {
    fn create() -> Result<Net, String> {
        let tag = std::process::id() % 100_000;
        let net = Net { ns: format!("dsdk{tag}"), host_if: format!("dsh{tag}") };
        let inside_if = format!("dsn{tag}");
        ip(&["netns", "add", &net.ns])?;
        ip(&["link", "add", &net.host_if, "type", "veth", "peer", "name", &inside_if])?;
        ip(&["link", "set", &inside_if, "netns", &net.ns])?;
        ip(&["addr", "add", &format!("{HOST}/30"), "dev", &net.host_if])?;
        ip(&["link", "set", &net.host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &net.ns, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{INSIDE}/30"), "dev", &inside_if])?;
        // A second address the host has no route to: a host candidate that cannot work.
        inside(&["addr", "add", &format!("{UNREACHABLE}/24"), "dev", &inside_if])?;
        inside(&["link", "set", &inside_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(net)
    }

    fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]).expect("set the veth");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_lost_on_a_network_that_goes_away_is_restarted_by_the_client() {
    let net = match Net::create() {
        Ok(net) => net,
        Err(why) => return common::skipped(&format!("no network namespace here ({why})")),
    };
    // The distributor on the host side of the veth, where both peers reach it.
    let listener = tokio::net::TcpListener::bind((HOST, 0)).await.expect("bind the veth address");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = Config { shards: 2, allow_open: true, ..Config::default() };
    let server = tokio::spawn(distributor::server::run(listener, config, async {
        let _ = stopped.await;
    }));

    let worker = Command::new("ip")
        .args(["netns", "exec", &net.ns, env!("CARGO_BIN_EXE_distributor")])
        // No --bind: a socket and a host candidate on each of the namespace's addresses.
        .args(["worker", "--id", "7", "--connect", &url])
        .stderr(Stdio::null())
        .spawn()
        .expect("start the worker in the namespace");
    let _worker = Killed(worker);

    let client = Client::builder(&url).bind(IpAddr::V4(HOST)).connect().await.unwrap();
    let started = Instant::now();
    let mut connection = loop {
        // The worker registers once its process is up.
        match client.open(7).await {
            Ok(connection) => break connection,
            Err(e) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = e;
            }
            Err(e) => panic!("no data channel to the worker in the namespace: {e}"),
        }
    };
    connection.channel.send(Bytes::from_static(b"before")).await.unwrap();
    assert_eq!(connection.channel.recv().await.as_deref(), Some(&b"before"[..]));

    // The network goes away: ICE loses its pair; the client restarts ICE (its OFFER waits at
    // the distributor for the worker, whose TCP connection survives the outage).
    net.link(false);
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut brought_back = false;
    loop {
        let event = tokio::time::timeout_at(deadline, connection.event()).await;
        let Ok(Some(event)) = event else { panic!("no renegotiation in time; events: {seen:?}") };
        if matches!(event, PeerEvent::Disconnected) && !brought_back {
            // Past the 3 s before a restart, then the network comes back.
            tokio::time::sleep(Duration::from_secs(4)).await;
            net.link(true);
            brought_back = true;
        }
        seen.push(format!("{event:?}"));
        if matches!(event, PeerEvent::Renegotiated) {
            break;
        }
    }
    assert!(brought_back, "ICE never said it was disconnected: {seen:?}");
    // The same data channel works again.
    connection.channel.send(Bytes::from_static(b"after")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(15), connection.channel.recv()).await;
    assert_eq!(echoed.expect("an echo in time").as_deref(), Some(&b"after"[..]), "events: {seen:?}");
    let _ = stop.send(());
    let _ = server.await;
}
