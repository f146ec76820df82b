//! A real 3-node nats-server cluster on free loopback ports, killed on drop. It runs with the
//! shipped users and permissions (`nats/auth.conf`), unless started with a token instead.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::free_port;

/// The nats-server binary: `$NATS_SERVER`, else what `scripts/nats-server.sh` finds or installs.
pub fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return path.into();
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/nats-server.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/nats-server.sh");
    assert!(out.status.success(), "no nats-server could be found or installed");
    String::from_utf8(out.stdout).unwrap().trim().into()
}

struct Node {
    client_port: u16,
    config: PathBuf,
    child: Option<Child>,
}

/// The user of `nats/auth.conf` a distributor connects as.
pub const USER: &str = "distributor";
pub const PASSWORD: &str = "local-only-not-a-secret";

pub struct NatsCluster {
    binary: PathBuf,
    dir: PathBuf,
    nodes: Vec<Node>,
    token: Option<String>,
}

impl NatsCluster {
    /// Starts three routed nodes and waits until a message crosses between every two of them.
    pub async fn start() -> Self {
        Self::start_with(None, "1MB").await
    }

    /// Like [`Self::start`]; with `token`, clients must present it.
    pub async fn start_with_token(token: Option<&str>) -> Self {
        Self::start_with(token, "1MB").await
    }

    /// Like [`Self::start`], with a token if given, taking payloads of `max_payload` at most.
    pub async fn start_with(token: Option<&str>, max_payload: &str) -> Self {
        let binary = server_binary();
        // One folder per cluster: the tests of one binary start clusters at once.
        static CLUSTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("distributor-nats-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/nats/auth.conf");
        std::fs::copy(shipped, dir.join("auth.conf")).expect("the shipped nats/auth.conf");
        let mut cluster = NatsCluster { binary, dir, nodes: Vec::new(), token: token.map(str::to_owned) };
        // A port found free may be taken before the node binds it (by another test's server, or
        // as the source port of a connection): a node that exits is started again, on new ports.
        for _ in 0..3 {
            cluster.nodes = configure(&cluster.dir, token, max_payload);
            for i in 0..3 {
                cluster.spawn(i);
            }
            if cluster.routed().await {
                return cluster;
            }
            for i in 0..3 {
                cluster.kill(i);
            }
        }
        panic!("nats-server did not start three times (see the logs in {})", cluster.dir.display());
    }

    fn spawn(&mut self, i: usize) {
        let log = self.dir.join(format!("n{i}.log"));
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.nodes[i].config)
            .arg("-l")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.nodes[i].child = Some(child);
    }

    /// The `nats://` URL of node `i` alone.
    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// `nats://` URLs of the nodes, starting with node `first`.
    pub fn url_from(&self, first: usize) -> String {
        (0..3)
            .map(|k| format!("nats://127.0.0.1:{}", self.nodes[(first + k) % 3].client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self) -> String {
        self.url_from(0)
    }

    /// Kills node `i` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on the same ports.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        let port = self.nodes[i].client_port;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "nats-server n{i} did not come back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a message published on each node reaches a subscriber on each other node.
    pub async fn wait_routed(&mut self) {
        assert!(self.routed().await, "a nats-server exited");
    }

    /// Whether a node exited (it could not bind its ports, say).
    fn exited(&mut self) -> bool {
        self.nodes.iter_mut().any(|n| n.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_)))))
    }

    /// Waits until a message published on each node reaches a subscriber on each other node;
    /// `false` if a node exited meanwhile.
    async fn routed(&mut self) -> bool {
        // Generous: on a 2-core machine under load, a node can take over 15 s to accept.
        let deadline = Instant::now() + Duration::from_secs(30);
        let token = self.token.clone();
        let mut clients = Vec::new();
        for i in [0, 1, 2] {
            let port = self.nodes[i].client_port;
            let client = loop {
                if self.exited() {
                    return false;
                }
                let options = match &token {
                    Some(token) => async_nats::ConnectOptions::with_token(token.clone()),
                    None => async_nats::ConnectOptions::with_user_and_password(USER.into(), PASSWORD.into()),
                };
                if let Ok(client) = options.connect(format!("nats://127.0.0.1:{port}")).await {
                    break client;
                }
                assert!(Instant::now() < deadline, "nats-server on {port} does not accept clients");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            clients.push(client);
        }
        // Every node's interest must reach every other node: a message published on each node
        // arrives at a subscriber on each of the others (the full mesh of routes forms a pair
        // at a time; one pair routed says nothing of the others).
        for to in 0..3 {
            // Under `distributor.`, which the shipped user may use.
            let subject = format!("distributor.ready.{to}");
            let mut sub = clients[to].subscribe(subject.clone()).await.unwrap();
            clients[to].flush().await.unwrap();
            for from in (0..3).filter(|from| *from != to) {
                loop {
                    clients[from].publish(subject.clone(), from.to_string().into()).await.unwrap();
                    clients[from].flush().await.unwrap();
                    let heard = tokio::time::timeout(Duration::from_millis(100), async {
                        while let Some(msg) = sub.next().await {
                            if msg.payload == from.to_string().as_bytes() {
                                return;
                            }
                        }
                        std::future::pending::<()>().await
                    });
                    if heard.await.is_ok() {
                        break;
                    }
                    if self.exited() {
                        return false;
                    }
                    assert!(Instant::now() < deadline, "the NATS cluster did not form routes");
                }
            }
        }
        true
    }
}

/// Three nodes' configurations on ports free now, routed to each other.
fn configure(dir: &std::path::Path, token: Option<&str>, max_payload: &str) -> Vec<Node> {
    let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes = Vec::new();
    for (i, cluster_port) in cluster_ports.iter().enumerate() {
        let client_port = free_port();
        let routes: Vec<String> = cluster_ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let config = dir.join(format!("n{i}.conf"));
        let auth = match token {
            Some(t) => format!("authorization {{ token: \"{t}\" }}\n"),
            None => "include ./auth.conf\n".to_owned(),
        };
        std::fs::write(
            &config,
            format!(
                "server_name: n{i}\nhost: 127.0.0.1\nport: {client_port}\nmax_payload: {max_payload}\n{auth}\
                 cluster {{\n  name: test\n  host: 127.0.0.1\n  port: {cluster_port}\n  routes: [{}]\n}}\n",
                routes.join(", ")
            ),
        )
        .unwrap();
        nodes.push(Node { client_port, config, child: None });
    }
    nodes
}

impl NatsCluster {
    /// A distributor instance in this process, on NATS node 1 first, with two shard threads.
    pub async fn instance(&self, prefix: &str) -> super::TestServer {
        let nats = distributor::cluster::NatsConfig {
            url: self.url_from(1),
            prefix: format!("distributor.{prefix}"),
            user: Some(USER.into()),
            password: Some(PASSWORD.into()),
            ..Default::default()
        };
        let config = distributor::config::Config { shards: 2, nats: Some(nats), ..Default::default() };
        super::TestServer::with(config).await
    }

    /// A distributor instance as its own process (to be drained or killed), on NATS node 0
    /// first, with two shard threads and the flags `extra`.
    pub fn process(&self, prefix: &str, extra: &[&str]) -> super::Binary {
        let (url, prefix) = (self.url_from(0), format!("distributor.{prefix}"));
        let mut args = vec!["--nats-url", &url, "--nats-prefix", &prefix, "--shards", "2"];
        args.extend_from_slice(extra);
        super::Binary::start(
            &args,
            &[("DISTRIBUTOR_NATS_USER", USER), ("DISTRIBUTOR_NATS_PASSWORD", PASSWORD)],
        )
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
