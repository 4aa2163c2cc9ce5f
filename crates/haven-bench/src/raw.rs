//! The raw baseline: a minimal tonic service (in its own process, on the same
//! runtime settings as the relay) with a unary echo and a server-streaming
//! push, and loads of 1 KiB messages for each.

use std::net::SocketAddr;
use std::time::Instant;

use tonic::{Request, Response, Status};

/// Generated code of the baseline service.
#[allow(missing_docs, clippy::all, clippy::pedantic)] // reason: generated.
pub mod pb {
    tonic::include_proto!("haven.bench");
}

/// The baseline service: echo, and forwarding from unary calls to the one
/// server stream subscribed to a topic.
#[derive(Default)]
struct Echo {
    topics: std::sync::Mutex<
        std::collections::HashMap<u64, tokio::sync::mpsc::Sender<Result<pb::Payload, Status>>>,
    >,
}

type PushStream = tokio_stream::wrappers::ReceiverStream<Result<pb::Payload, Status>>;

#[tonic::async_trait]
impl pb::echo_server::Echo for Echo {
    async fn echo(&self, request: Request<pb::Payload>) -> Result<Response<pb::Payload>, Status> {
        Ok(Response::new(request.into_inner()))
    }

    type SubscribeStream = PushStream;

    async fn subscribe(
        &self,
        request: Request<pb::Topic>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        self.topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(request.into_inner().topic, sender);
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }

    async fn forward(
        &self,
        request: Request<pb::Forwarded>,
    ) -> Result<Response<pb::Topic>, Status> {
        let pb::Forwarded { topic, data } = request.into_inner();
        let sender = self
            .topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&topic)
            .cloned()
            .ok_or_else(|| Status::not_found("no subscriber"))?;
        sender
            .send(Ok(pb::Payload { data }))
            .await
            .map_err(|_| Status::unavailable("subscriber gone"))?;
        Ok(Response::new(pb::Topic { topic }))
    }
}

/// Serves the echo service until the process is killed.
pub async fn serve(address: SocketAddr) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(pb::echo_server::EchoServer::new(Echo::default()))
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

/// `total` payloads of `size` bytes from `senders` connections, each handed by
/// the server to one of `recipients` subscribed server streams; returns
/// payloads delivered per second. The same shape as the relay round, minus
/// everything that makes it a relay.
pub async fn forward(
    address: SocketAddr,
    senders: usize,
    recipients: usize,
    total: usize,
    size: usize,
) -> anyhow::Result<f64> {
    let connect = || async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
            .connect()
            .await?;
        anyhow::Ok(pb::echo_client::EchoClient::new(channel))
    };
    let per_sender = total / senders;
    let expected = per_sender * senders;
    let (delivered, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = Vec::with_capacity(recipients);
    for topic in 0..recipients as u64 {
        let mut stream = connect()
            .await?
            .subscribe(pb::Topic { topic })
            .await?
            .into_inner();
        let delivered = delivered.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(Some(_)) = stream.message().await {
                if delivered.send(()).is_err() {
                    break;
                }
            }
        }));
    }
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(senders);
    for sender in 0..senders {
        let mut client = connect().await?;
        tasks.push(tokio::spawn(async move {
            for n in 0..per_sender {
                client
                    .forward(pb::Forwarded {
                        topic: ((sender + n * 7) % recipients) as u64,
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
    for _ in 0..expected {
        arrivals
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("a subscriber stream ended early"))?;
    }
    let per_second = expected as f64 / started.elapsed().as_secs_f64();
    for reader in readers {
        reader.abort();
    }
    Ok(per_second)
}
