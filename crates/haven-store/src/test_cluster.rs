//! A real Redis Cluster for tests: three primaries and three replicas, each a
//! `redis-server` process (Debian's `redis-server`; `.ci/run` installs it) on a
//! free loopback port (never 6379), without persistence, in a temporary
//! directory. Dropping it kills every node.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)] // reason: test support; a failure is a failed test.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One node of the cluster.
pub struct Node {
    pub port: u16,
    child: Option<Child>,
    command: Vec<String>,
}

/// The cluster; see the module documentation.
pub struct TestCluster {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    // Bind to learn a free port, then release it for redis-server. Ports of
    // the cluster bus (port + 10000) must be free too.
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if port < 55_000 && port != 6379 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

fn redis_server() -> PathBuf {
    for dir in std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        let candidate = dir.join("redis-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "redis-server is not installed; the Redis tests need it: \
         apt-get install -y redis-server redis-tools (.ci/run does this)"
    );
}

fn spawn(command: &[String]) -> Child {
    Command::new(&command[0])
        .args(&command[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts")
}

fn cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs (apt-get install -y redis-tools)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl TestCluster {
    /// Starts six nodes and joins them into a cluster with one replica per primary.
    pub fn start() -> Self {
        let server = redis_server();
        // A port found free can be taken by another test's cluster before its
        // redis-server binds it: then start again on other ports.
        for _ in 0..3 {
            if let Some(cluster) = Self::try_start(&server) {
                return cluster;
            }
        }
        panic!("three attempts to start a redis cluster failed");
    }

    fn try_start(server: &std::path::Path) -> Option<Self> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut nodes: Vec<Node> = Vec::new();
        for _ in 0..6 {
            let port = free_port();
            let command: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &format!("nodes-{port}.conf"),
                "--cluster-node-timeout",
                "1000",
                "--save",
                "",
                "--appendonly",
                "no",
                // Nothing on disk (the relay refuses a cluster that would):
                // full syncs go over the socket both ways.
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-load",
                "on-empty-db",
                // Replicas sync at once instead of after the default 5 s.
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
                dir.path().to_str().expect("a UTF-8 path"),
            ]
            .iter()
            .map(ToString::to_string)
            .collect();
            let command = [vec![server.to_string_lossy().into_owned()], command].concat();
            nodes.push(Node {
                port,
                child: Some(spawn(&command)),
                command,
            });
        }
        let mut cluster = Self { nodes, _dir: dir };
        for node in &mut cluster.nodes {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !cli(node.port, &["PING"]).contains("PONG") {
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // Answered, but by our own process? One that lost the port has exited.
            if !matches!(node.child.as_mut().map(Child::try_wait), Some(Ok(None))) {
                return None;
            }
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addresses.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        cli(cluster.nodes[0].port, &create);
        cluster.wait_until_ok();
        Some(cluster)
    }

    /// Seed URLs for a client.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// Waits until every running node reports the cluster healthy and every
    /// primary has its replica connected.
    pub fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let healthy = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                let info = cli(n.port, &["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok")
            }) && self.primaries().iter().all(|port| {
                let info = cli(*port, &["INFO", "replication"]);
                info.contains("connected_slaves:1") && info.contains("state=online")
            });
            if healthy {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the redis cluster did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ports of the running primaries.
    pub fn primaries(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .filter(|n| cli(n.port, &["ROLE"]).starts_with("master"))
            .map(|n| n.port)
            .collect()
    }

    /// Starts the node on `port` again after [`TestCluster::kill`], as an
    /// orchestrator would: it rejoins from its cluster file (as a replica if
    /// its replica was promoted meanwhile).
    pub fn restart(&mut self, port: u16) {
        for node in &mut self.nodes {
            if node.port == port && node.child.is_none() {
                node.child = Some(spawn(&node.command));
            }
        }
    }

    /// Ports of the running replicas.
    pub fn replicas(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .filter(|n| cli(n.port, &["ROLE"]).starts_with("slave"))
            .map(|n| n.port)
            .collect()
    }

    /// Runs `redis-cli` with `args` against the node on `port`; its output.
    pub fn command(&self, port: u16, args: &[&str]) -> String {
        cli(port, args)
    }

    /// Kills the node on `port` (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        for node in &mut self.nodes {
            if node.port == port
                && let Some(mut child) = node.child.take()
            {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
