//! What travels inside the ratchet plaintext between apps: the first contact,
//! the supporter's first answer (where to write from now on), and text. The
//! relay never sees these kinds; padding hides their lengths.

use crate::Error;

const VERSION: u8 = 1;
const FIRST_CONTACT: u8 = 1;
const HELLO: u8 = 2;
const TEXT: u8 = 3;
const END: u8 = 4;
const SYNC_HELLO: u8 = 5;
const SYNC_COPY: u8 = 6;
const SYNC_END: u8 = 7;
const RETENTION: u8 = 8;
const SYNC_RETENTION: u8 = 9;
const DECLINED: u8 = 10;
const SYNC_CAPACITY: u8 = 11;
/// Longest text accepted in one message (the padding's largest bucket bounds it anyway).
const MAX_TEXT: usize = 16 * 1024;

/// One app message. Every key a peer supplies is checked at decode (a valid,
/// non-weak Ed25519 point), so a hostile peer's key never reaches the relay.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum AppMessage {
    /// From the help-seeker, first message to a supporter device: where to
    /// answer, and the key the device must secure its conversation mailbox to.
    FirstContact {
        reply_sender_id: [u8; 16],
        sender_key: [u8; 32],
        text: String,
    },
    /// From a supporter device, its first answer: its conversation mailbox, and
    /// the key the help-seeker must secure its reply mailbox to.
    Hello {
        conversation_sender_id: [u8; 16],
        sender_key: [u8; 32],
        text: String,
    },
    /// Text.
    Text { text: String },
    /// The sender ended the conversation: delete everything of it.
    End,
    /// From a supporter device, instead of a conversation: it is not taking new
    /// conversations (its capacity is used up or paused); pick another supporter.
    Declined,
    /// The sender set the conversation's retention: keep history this long.
    Retention { seconds: u64 },
    /// From the approving device to a newly linked one, the first message between
    /// them: where to send sync copies (a mailbox secured to the sender key the new
    /// device showed in its link code), the key the new device must secure its own
    /// sync mailbox to, the single-use secret of the link code, and the supporter
    /// key whose signed device list must name both devices.
    SyncHello {
        sync_sender_id: [u8; 16],
        sender_key: [u8; 32],
        link_secret: [u8; 32],
        supporter_key: [u8; 32],
    },
    /// Between a supporter's own devices: the capacity the supporter set.
    SyncCapacity { capacity: u32 },
    /// Between a supporter's own devices: a message this device sent to `peer`.
    SyncCopy { peer: [u8; 128], text: String },
    /// Between a supporter's own devices: this device ended the conversation with `peer`.
    SyncEnd { peer: [u8; 128] },
    /// Between a supporter's own devices: this device set the retention of the
    /// conversation with `peer`.
    SyncRetention { peer: [u8; 128], seconds: u64 },
}

/// Message text, ids and keys stay out of logs: only the kind is printed.
impl std::fmt::Debug for AppMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AppMessage::FirstContact { .. } => "FirstContact(..)",
            AppMessage::Hello { .. } => "Hello(..)",
            AppMessage::Text { .. } => "Text(..)",
            AppMessage::End => "End",
            AppMessage::Declined => "Declined",
            AppMessage::Retention { .. } => "Retention(..)",
            AppMessage::SyncHello { .. } => "SyncHello(..)",
            AppMessage::SyncCopy { .. } => "SyncCopy(..)",
            AppMessage::SyncCapacity { .. } => "SyncCapacity(..)",
            AppMessage::SyncEnd { .. } => "SyncEnd(..)",
            AppMessage::SyncRetention { .. } => "SyncRetention(..)",
        })
    }
}

/// A sender key from the other side must be one the relay will accept: a
/// canonical, non-weak Ed25519 point. Checked here, once, so that a hostile
/// peer's key is refused as that envelope's fault and never makes a relay call
/// fail (which would stop the whole sync).
fn sender_key(bytes: [u8; 32]) -> Result<[u8; 32], Error> {
    // The relay's own check, so that what passes here passes there.
    haven_proto::auth::public_key(&bytes)
        .map(|_| bytes)
        .map_err(|_| {
            Error::Protocol("a message from the other side carries an invalid sender key".into())
        })
}

fn text_field(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn malformed() -> Error {
    Error::Protocol("a message from the other side is malformed".into())
}

impl AppMessage {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        match self {
            AppMessage::FirstContact {
                reply_sender_id,
                sender_key,
                text,
            } => {
                out.push(FIRST_CONTACT);
                out.extend_from_slice(reply_sender_id);
                out.extend_from_slice(sender_key);
                text_field(&mut out, text);
            }
            AppMessage::Hello {
                conversation_sender_id,
                sender_key,
                text,
            } => {
                out.push(HELLO);
                out.extend_from_slice(conversation_sender_id);
                out.extend_from_slice(sender_key);
                text_field(&mut out, text);
            }
            AppMessage::Text { text } => {
                out.push(TEXT);
                text_field(&mut out, text);
            }
            AppMessage::End => out.push(END),
            AppMessage::Declined => out.push(DECLINED),
            AppMessage::SyncCapacity { capacity } => {
                out.push(SYNC_CAPACITY);
                out.extend_from_slice(&capacity.to_be_bytes());
            }
            AppMessage::Retention { seconds } => {
                out.push(RETENTION);
                out.extend_from_slice(&seconds.to_be_bytes());
            }
            AppMessage::SyncRetention { peer, seconds } => {
                out.push(SYNC_RETENTION);
                out.extend_from_slice(peer);
                out.extend_from_slice(&seconds.to_be_bytes());
            }
            AppMessage::SyncHello {
                sync_sender_id,
                sender_key,
                link_secret,
                supporter_key,
            } => {
                out.push(SYNC_HELLO);
                out.extend_from_slice(sync_sender_id);
                out.extend_from_slice(sender_key);
                out.extend_from_slice(link_secret);
                out.extend_from_slice(supporter_key);
            }
            AppMessage::SyncCopy { peer, text } => {
                out.push(SYNC_COPY);
                out.extend_from_slice(peer);
                text_field(&mut out, text);
            }
            AppMessage::SyncEnd { peer } => {
                out.push(SYNC_END);
                out.extend_from_slice(peer);
            }
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let (&version, rest) = bytes.split_first().ok_or_else(malformed)?;
        if version != VERSION {
            return Err(Error::Protocol(format!(
                "message format version {version} is not supported; update the app"
            )));
        }
        let (&kind, rest) = rest.split_first().ok_or_else(malformed)?;
        let text = |bytes: &[u8]| -> Result<String, Error> {
            let len = u32::from_be_bytes(
                bytes
                    .get(..4)
                    .ok_or_else(malformed)?
                    .try_into()
                    .map_err(|_| malformed())?,
            ) as usize;
            if len > MAX_TEXT || bytes.len() != 4 + len {
                return Err(malformed());
            }
            String::from_utf8(bytes[4..].to_vec()).map_err(|_| malformed())
        };
        let ids = |bytes: &[u8]| -> Result<([u8; 16], [u8; 32]), Error> {
            let id = bytes
                .get(..16)
                .ok_or_else(malformed)?
                .try_into()
                .map_err(|_| malformed())?;
            let key = bytes
                .get(16..48)
                .ok_or_else(malformed)?
                .try_into()
                .map_err(|_| malformed())?;
            Ok((id, key))
        };
        match kind {
            FIRST_CONTACT => {
                let (reply_sender_id, key) = ids(rest)?;
                Ok(AppMessage::FirstContact {
                    reply_sender_id,
                    sender_key: sender_key(key)?,
                    text: text(&rest[48..])?,
                })
            }
            HELLO => {
                let (conversation_sender_id, key) = ids(rest)?;
                Ok(AppMessage::Hello {
                    conversation_sender_id,
                    sender_key: sender_key(key)?,
                    text: text(&rest[48..])?,
                })
            }
            TEXT => Ok(AppMessage::Text { text: text(rest)? }),
            END if rest.is_empty() => Ok(AppMessage::End),
            DECLINED if rest.is_empty() => Ok(AppMessage::Declined),
            SYNC_CAPACITY => Ok(AppMessage::SyncCapacity {
                capacity: u32::from_be_bytes(rest.try_into().map_err(|_| malformed())?),
            }),
            RETENTION => Ok(AppMessage::Retention {
                seconds: u64::from_be_bytes(rest.try_into().map_err(|_| malformed())?),
            }),
            SYNC_RETENTION if rest.len() == 128 + 8 => Ok(AppMessage::SyncRetention {
                peer: rest[..128].try_into().map_err(|_| malformed())?,
                seconds: u64::from_be_bytes(rest[128..].try_into().map_err(|_| malformed())?),
            }),
            SYNC_HELLO if rest.len() == 16 + 3 * 32 => Ok(AppMessage::SyncHello {
                sync_sender_id: rest[..16].try_into().map_err(|_| malformed())?,
                sender_key: sender_key(rest[16..48].try_into().map_err(|_| malformed())?)?,
                link_secret: rest[48..80].try_into().map_err(|_| malformed())?,
                supporter_key: rest[80..].try_into().map_err(|_| malformed())?,
            }),
            SYNC_END => Ok(AppMessage::SyncEnd {
                peer: rest.try_into().map_err(|_| malformed())?,
            }),
            SYNC_COPY => {
                let peer = rest
                    .get(..128)
                    .ok_or_else(malformed)?
                    .try_into()
                    .map_err(|_| malformed())?;
                Ok(AppMessage::SyncCopy {
                    peer,
                    text: text(&rest[128..])?,
                })
            }
            _ => Err(malformed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> [u8; 32] {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
            .verifying_key()
            .to_bytes()
    }

    #[test]
    fn messages_roundtrip_and_garbage_is_refused() {
        for message in [
            AppMessage::FirstContact {
                reply_sender_id: [1; 16],
                sender_key: key(2),
                text: "hei".into(),
            },
            AppMessage::Hello {
                conversation_sender_id: [3; 16],
                sender_key: key(4),
                text: String::new(),
            },
            AppMessage::SyncHello {
                sync_sender_id: [7; 16],
                sender_key: key(8),
                link_secret: [9; 32],
                supporter_key: key(10),
            },
            AppMessage::Text {
                text: "æøå ✓".into(),
            },
            AppMessage::End,
            AppMessage::Declined,
            AppMessage::SyncCapacity { capacity: 3 },
            AppMessage::Retention { seconds: 3600 },
            AppMessage::SyncRetention {
                peer: [5; 128],
                seconds: u64::MAX,
            },
            AppMessage::SyncEnd { peer: [6; 128] },
        ] {
            assert_eq!(AppMessage::decode(&message.encode()).ok(), Some(message));
        }
        for garbage in [
            &[][..],
            &[1],
            &[2, 3],
            &[1, 99],
            &[1, 3, 0, 0, 0, 5, b'a'],
            &[1, 8, 0, 0, 1],
            &[1, 9, 0, 0, 0, 0, 0, 0, 0, 1],
        ] {
            assert!(AppMessage::decode(garbage).is_err());
        }
    }

    #[test]
    fn a_peer_supplied_sender_key_that_the_relay_would_refuse_is_refused_at_decode() {
        // The all-zero key (a weak point), the identity point, and bytes that are
        // no point at all: each would make the relay's Secure fail.
        let mut identity = [0; 32];
        identity[0] = 1;
        let not_a_point = (0..=u8::MAX)
            .map(|byte| [byte; 32])
            .find(|bytes| ed25519_dalek::VerifyingKey::from_bytes(bytes).is_err())
            .expect("some repeated byte is not a point");
        for bad in [[0; 32], identity, not_a_point] {
            for message in [
                AppMessage::FirstContact {
                    reply_sender_id: [1; 16],
                    sender_key: bad,
                    text: "hei".into(),
                },
                AppMessage::Hello {
                    conversation_sender_id: [3; 16],
                    sender_key: bad,
                    text: String::new(),
                },
                AppMessage::SyncHello {
                    sync_sender_id: [7; 16],
                    sender_key: bad,
                    link_secret: [9; 32],
                    supporter_key: key(10),
                },
            ] {
                let refused = AppMessage::decode(&message.encode());
                assert!(
                    matches!(&refused, Err(Error::Protocol(m)) if m.contains("invalid sender key")),
                    "{refused:?}"
                );
            }
        }
    }

    #[test]
    fn debug_prints_no_text_ids_or_keys() {
        let shown = format!(
            "{:?}",
            AppMessage::FirstContact {
                reply_sender_id: [0xab; 16],
                sender_key: key(2),
                text: "a secret line".into(),
            }
        );
        assert_eq!(shown, "FirstContact(..)");
    }
}
