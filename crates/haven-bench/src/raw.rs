//! The raw baseline: a minimal tonic echo service (in its own process, on the
//! same runtime settings as the relay) and a load of unary 1 KiB echoes.

use std::net::SocketAddr;
use std::time::Instant;

use tonic::{Request, Response, Status};

/// Generated code of the baseline service.
#[allow(missing_docs, clippy::all, clippy::pedantic)] // reason: generated.
pub mod pb {
    tonic::include_proto!("haven.bench");
}

struct Echo;

#[tonic::async_trait]
impl pb::echo_server::Echo for Echo {
    async fn echo(&self, request: Request<pb::Payload>) -> Result<Response<pb::Payload>, Status> {
        Ok(Response::new(request.into_inner()))
    }
}

/// Serves the echo service until the process is killed.
pub async fn serve(address: SocketAddr) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(pb::echo_server::EchoServer::new(Echo))
        .serve(address)
        .await?;
    Ok(())
}

/// `total` echoes of `size` bytes from `clients` concurrent connections;
/// returns echoes per second.
pub async fn load(
    address: SocketAddr,
    clients: usize,
    total: usize,
    size: usize,
) -> anyhow::Result<f64> {
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
            .connect()
            .await?;
        connections.push(pb::echo_client::EchoClient::new(channel));
    }
    let per_client = total / clients;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for mut client in connections {
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_client {
                client
                    .echo(pb::Payload {
                        data: vec![0x5a; size],
                    })
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((per_client * clients) as f64 / started.elapsed().as_secs_f64())
}
