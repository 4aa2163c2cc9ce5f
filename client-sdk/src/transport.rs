//! The connection to the relay: one lazily connected channel, loopback-only
//! plaintext, and the generated clients. Generated types stop here and in the
//! modules that convert them.

use std::sync::{Arc, Mutex};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::Error;
use crate::sync::FetchLimits;

/// The relay's clients over one channel.
#[derive(Clone)]
pub(crate) struct Transport {
    channel: Channel,
    /// The fetch limits learned from the relay's `GetInfo`, once asked. A
    /// std mutex: never held across an await.
    fetch_limits: Arc<Mutex<Option<FetchLimits>>>,
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Transport {
    /// A channel to `url` that connects on first use (so the app works offline
    /// until it needs the relay). `https` uses `ca_certificate` when given;
    /// `http` is allowed only to loopback addresses.
    pub(crate) fn new(url: &str, ca_certificate: Option<&[u8]>) -> Result<Self, Error> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| Error::BadRelayAddress(e.to_string()))?;
        let uri = endpoint.uri();
        let host = uri
            .host()
            .ok_or_else(|| Error::BadRelayAddress("no host".into()))?;
        let endpoint = match uri.scheme_str() {
            Some("https") => {
                let mut tls = ClientTlsConfig::new().domain_name(host.to_owned());
                if let Some(pem) = ca_certificate {
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                endpoint
                    .tls_config(tls)
                    .map_err(|e| Error::BadRelayAddress(e.to_string()))?
            }
            Some("http") if is_loopback(host) => endpoint,
            Some("http") => return Err(Error::InsecureRelay),
            _ => {
                return Err(Error::BadRelayAddress(
                    "use an http:// (loopback) or https:// address".into(),
                ));
            }
        };
        Ok(Self {
            channel: endpoint.tcp_nodelay(true).connect_lazy(),
            fetch_limits: Arc::new(Mutex::new(None)),
        })
    }

    /// The fetch limits, if the relay's were learned already.
    pub(crate) fn fetch_limits(&self) -> Option<FetchLimits> {
        *self
            .fetch_limits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn set_fetch_limits(&self, limits: FetchLimits) {
        *self
            .fetch_limits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(limits);
    }

    /// The mailbox client, decoding responses up to the fetch limit learned
    /// from the relay (tonic's default until then).
    pub(crate) fn mailbox(&self) -> haven_proto::v1::mailbox_client::MailboxClient<Channel> {
        let client = haven_proto::v1::mailbox_client::MailboxClient::new(self.channel.clone());
        match self.fetch_limits() {
            Some(limits) => client.max_decoding_message_size(limits.decode_limit),
            None => client,
        }
    }

    pub(crate) fn relay(&self) -> haven_proto::v1::relay_client::RelayClient<Channel> {
        haven_proto::v1::relay_client::RelayClient::new(self.channel.clone())
    }

    pub(crate) fn keys(&self) -> haven_proto::v1::keys_client::KeysClient<Channel> {
        haven_proto::v1::keys_client::KeysClient::new(self.channel.clone())
    }

    pub(crate) fn directory(&self) -> haven_proto::v1::directory_client::DirectoryClient<Channel> {
        haven_proto::v1::directory_client::DirectoryClient::new(self.channel.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plaintext_only_to_loopback() {
        assert!(Transport::new("http://127.0.0.1:50051", None).is_ok());
        assert!(Transport::new("http://[::1]:50051", None).is_ok());
        assert!(Transport::new("http://localhost:50051", None).is_ok());
        assert!(matches!(
            Transport::new("http://relay.example.org:50051", None),
            Err(Error::InsecureRelay)
        ));
        assert!(matches!(
            Transport::new("ftp://x", None),
            Err(Error::BadRelayAddress(_))
        ));
        assert!(matches!(
            Transport::new("not a url", None),
            Err(Error::BadRelayAddress(_))
        ));
    }
}
