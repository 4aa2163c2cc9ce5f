//! Push wake-ups: when an envelope arrives for a mailbox that no `Receive`
//! stream watches, tell the device to fetch, without telling anyone anything.
//!
//! The wake-up is `POST <endpoint>` with `{"token":"<base64url>"}`: only the
//! opaque token the device registered, never a mailbox id, envelope id, size or
//! time beyond the request's own. Per mailbox at most one wake-up goes out per
//! `push.interval_seconds` while the mailbox is not read (a Fetch or a stream
//! resets it). The decision and the request run on a task of their own: a slow
//! or dead endpoint never delays or fails a `Send`. At most
//! `push.max_in_flight` requests are out at once; past that, new wake-ups are
//! dropped and counted (and the mailbox is not marked as woken). A 404 or 410 answer removes the
//! registration (the UnifiedPush and gateway convention for "gone").
//!
//! Nothing of a registration is logged: endpoints and tokens identify devices.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use haven_store::{MailboxId, PushRegistration, Store};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

use crate::config::PushConfig;
use crate::relay::RelayError;

/// Longest endpoint URL accepted, bytes.
pub const MAX_ENDPOINT_LEN: usize = 1024;
/// Longest token accepted, bytes (an FCM registration token is ~160 characters).
pub const MAX_TOKEN_LEN: usize = 256;
/// Past this many remembered wake-ups, entries older than the interval are dropped.
const RECENT_PRUNE_AT: usize = 10_000;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Sends push wake-ups. No `Debug`: it is plumbing around registrations.
pub struct Pusher {
    store: Arc<dyn Store>,
    config: PushConfig,
    /// `None` when push is off, or no CA certificates could be loaded.
    client: Option<HttpsClient>,
    /// When each mailbox was last woken, while it has not been read since.
    recent: Mutex<HashMap<MailboxId, Instant>>,
    /// Bounds the wake-up requests out at once.
    in_flight: Semaphore,
}

impl Pusher {
    /// A pusher for `store`'s registrations.
    pub fn new(store: Arc<dyn Store>, config: PushConfig) -> Self {
        let client = if config.enabled {
            match hyper_rustls::HttpsConnectorBuilder::new().with_native_roots() {
                Ok(builder) => {
                    let builder = if config.allow_local_endpoints {
                        builder.https_or_http()
                    } else {
                        builder.https_only()
                    };
                    let connector = builder.enable_http1().build();
                    Some(Client::builder(TokioExecutor::new()).build(connector))
                }
                Err(error) => {
                    tracing::warn!(%error, "push wake-ups are off: no CA certificates could be loaded");
                    None
                }
            }
        } else {
            None
        };
        Self {
            store,
            in_flight: Semaphore::new(config.max_in_flight),
            config,
            client,
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Checks a registration from a client: an https URL with a host (http and
    /// local addresses only with `push.allow_local_endpoints`), bounded sizes.
    pub fn validate(&self, endpoint: &str, token: &[u8]) -> Result<(), RelayError> {
        if endpoint.len() > MAX_ENDPOINT_LEN {
            return Err(RelayError::invalid(format!(
                "endpoint is {} bytes; at most {MAX_ENDPOINT_LEN}",
                endpoint.len()
            )));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(RelayError::invalid(format!(
                "token is {} bytes; at most {MAX_TOKEN_LEN}",
                token.len()
            )));
        }
        let uri: hyper::Uri = endpoint
            .parse()
            .map_err(|_| RelayError::invalid("endpoint is not a URL"))?;
        let host = uri
            .host()
            .ok_or_else(|| RelayError::invalid("endpoint has no host"))?;
        let local = self.config.allow_local_endpoints;
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if local => {}
            _ => {
                return Err(RelayError::invalid(
                    "endpoint must be an https URL (a UnifiedPush endpoint or a push gateway)",
                ));
            }
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if !local && is_local(host) {
            return Err(RelayError::invalid(
                "endpoint points at a local or private address; this relay only sends wake-ups \
                 to public hosts",
            ));
        }
        if !self.config.enabled {
            return Err(RelayError::FailedPrecondition(
                "this relay does not send push wake-ups (push.enabled = false)".into(),
            ));
        }
        Ok(())
    }

    /// An envelope was stored for `id`. Everything after this (is any stream
    /// attached, on any node? was the device woken lately? the request) runs
    /// on a task of its own, so the `Send` that stored it never waits for it.
    pub fn arrived(self: &Arc<Self>, id: &MailboxId) {
        if self.client.is_none() {
            return;
        }
        let this = Arc::clone(self);
        let id = *id;
        tokio::spawn(async move {
            if let Some(result) = this.wake(&id).await {
                metrics::counter!("haven_push_wakeups_total", "result" => result).increment(1);
            }
        });
    }

    /// Wakes the device behind `id` unless a stream watches it, it was woken
    /// within the interval, or too many requests are out; `None` when a stream
    /// watches (nothing to count).
    async fn wake(&self, id: &MailboxId) -> Option<&'static str> {
        // The store knows about streams on every relay node (Redis asks the cluster).
        if self.store.watched(id).await {
            return None;
        }
        let interval = Duration::from_secs(self.config.interval_seconds);
        let _permit = {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            if recent.get(id).is_some_and(|at| at.elapsed() < interval) {
                return Some("coalesced");
            }
            let Ok(permit) = self.in_flight.try_acquire() else {
                return Some("dropped");
            };
            if recent.len() >= RECENT_PRUNE_AT {
                recent.retain(|_, at| at.elapsed() < interval);
            }
            recent.insert(*id, Instant::now());
            permit
        };
        Some(self.deliver(id).await)
    }

    /// The mailbox was read: the next arrival wakes the device again at once.
    pub fn read(&self, id: &MailboxId) {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Sends one wake-up; returns the outcome for the metric.
    async fn deliver(&self, id: &MailboxId) -> &'static str {
        let Some(client) = &self.client else {
            return "off";
        };
        let registration = match self.store.push(id).await {
            Ok(Some(registration)) => registration,
            Ok(None) => return "unregistered",
            Err(error) => {
                tracing::warn!(%error, "push registration could not be read");
                return "failed";
            }
        };
        if self.config.jitter_ms > 0 {
            let jitter = rand::random_range(0..=self.config.jitter_ms);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
        }
        let body = format!(
            "{{\"token\":\"{}\"}}",
            URL_SAFE_NO_PAD.encode(&registration.token)
        );
        let Ok(request) = hyper::Request::post(registration.endpoint.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            // UnifiedPush / Web Push: a wake-up is worth nothing after a day.
            .header("TTL", "86400")
            .header("Urgency", "high")
            .body(Full::new(Bytes::from(body)))
        else {
            return "failed";
        };
        let timeout = Duration::from_secs(self.config.timeout_seconds);
        match tokio::time::timeout(timeout, client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => "sent",
            Ok(Ok(response)) if matches!(response.status().as_u16(), 404 | 410) => {
                self.forget(id, &registration).await;
                "gone"
            }
            Ok(Ok(_)) => "refused",
            // Neither the endpoint nor the error text is logged: both can name the device's push service.
            Ok(Err(_)) => "failed",
            Err(_) => "timeout",
        }
    }

    /// Removes a registration the endpoint called gone, unless the device has
    /// registered another one meanwhile.
    async fn forget(&self, id: &MailboxId, gone: &PushRegistration) {
        match self.store.push(id).await {
            Ok(Some(current)) if current == *gone => {
                if let Err(error) = self.store.set_push(id, None).await {
                    tracing::warn!(%error, "a gone push registration could not be removed");
                }
            }
            _ => {}
        }
    }
}

/// Whether `host` (a name or an IP literal) is loopback, private, link-local or
/// otherwise not a public host. Names that resolve to such addresses are not
/// caught here: keep the relay's egress behind a firewall (docs/operations.md).
fn is_local(host: &str) -> bool {
    use std::net::IpAddr;
    if host.eq_ignore_ascii_case("localhost") || host.ends_with(".localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => {
            ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64 // 100.64/10 (CGNAT)
        }
        Ok(IpAddr::V6(ip)) => {
            ip.is_loopback()
                || ip.is_unspecified()
                || (ip.segments()[0] & 0xfe00) == 0xfc00 // unique local
                || (ip.segments()[0] & 0xffc0) == 0xfe80 // link-local
                || ip.to_ipv4_mapped().is_some_and(|v4| is_local(&v4.to_string()))
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_hosts_are_recognised() {
        for host in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.4",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "localhost",
            "relay.localhost",
        ] {
            assert!(is_local(host), "{host}");
        }
        for host in ["push.example.org", "8.8.8.8", "2001:4860::8888", "ntfy.sh"] {
            assert!(!is_local(host), "{host}");
        }
    }
}
