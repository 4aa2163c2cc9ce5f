//! Child processes under measurement: starting them on a free loopback port,
//! their CPU time and peak memory from /proc, and stopping them.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A process serving gRPC on a loopback port; killed on drop.
pub struct Served {
    child: Child,
}

/// A free loopback port (bound, then released).
pub fn free_address() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Served {
    /// Starts `binary` with `args` (which must make it listen on `address`) and
    /// waits until it accepts gRPC connections.
    pub async fn start(
        binary: &Path,
        address: SocketAddr,
        args: &[String],
    ) -> anyhow::Result<Self> {
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let served = Self { child };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?;
            if endpoint.connect().await.is_ok() {
                return Ok(served);
            }
            if Instant::now() > deadline {
                bail!("{} did not start listening on {address}", binary.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// User plus system CPU seconds the process has used so far (Linux).
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        // The kernel's USER_HZ is 100 on every Linux this runs on.
        Some(ticks / 100.0)
    }

    /// Resident memory now, in KiB (VmRSS, Linux).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Peak resident memory in KiB (VmHWM, Linux).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
