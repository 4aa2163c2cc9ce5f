//! A conversation between two devices: PQXDH to start, the Double Ratchet after.

use rand_core::CryptoRng;
use zeroize::Zeroizing;

use crate::codec::{Reader, Writer};
use crate::identity::{IDENTITY_KEY_LEN, IdentityKey, IdentityKeyPair};
use crate::padding::{pad, unpad};
use crate::pqxdh::{INITIAL_TAG, InitialHeader, associated_data, initiate};
use crate::prekey::PrekeyBundle;
use crate::ratchet::{MESSAGE_TAG, Ratchet};
use crate::{DecodeError, HandshakeError, MessageError, SafetyNumber};

const SNAPSHOT_TAG: u8 = 0x41;
const SNAPSHOT_VERSION: u8 = 1;

/// What kind of session message some bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// The first messages of a conversation, carrying the PQXDH handshake; the
    /// initiator sends these until the responder's first answer arrives.
    Initial,
    /// A Double Ratchet message of an established session.
    Ratchet,
}

impl MessageKind {
    /// The kind of a session message, from its leading tag.
    pub fn of(message: &[u8]) -> Result<Self, DecodeError> {
        match message.first() {
            Some(&INITIAL_TAG) => Ok(Self::Initial),
            Some(&MESSAGE_TAG) => Ok(Self::Ratchet),
            Some(&found) => Err(DecodeError::WrongFormat {
                expected: MESSAGE_TAG,
                found,
            }),
            None => Err(DecodeError::Truncated),
        }
    }
}

/// Who started an initial message, and which handshake it belongs to: the
/// initiator's base key. Lets the receiver route a repeated initial message to
/// the session it already made from the first one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct InitialInfo {
    /// The initiator's identity (verified).
    pub initiator: IdentityKey,
    /// The initiator's ephemeral key, unique per handshake.
    pub base_key: [u8; 32],
    /// Whether the handshake used one of the responder's one-time X25519
    /// prekeys (the responder's app may require it: review 2026-12-crypto #5).
    pub uses_one_time_prekey: bool,
}

impl std::fmt::Debug for InitialInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InitialInfo(..)")
    }
}

impl InitialInfo {
    /// Reads the handshake part of an initial message.
    pub fn of(message: &[u8]) -> Result<Self, DecodeError> {
        let (header, _) = InitialHeader::unwrap(message)?;
        Ok(Self {
            initiator: header.initiator,
            base_key: header.base_key,
            uses_one_time_prekey: header.one_time_prekey_id.is_some(),
        })
    }
}

/// One side of a conversation with one remote device. No `Debug`, no `Clone`:
/// it holds ratchet secrets; persist it with [`Session::to_snapshot`].
pub struct Session {
    ratchet: Ratchet,
    local: IdentityKey,
    remote: IdentityKey,
    initiator: bool,
    base_key: [u8; 32],
    /// Initiator only: sent with every message until the responder answers.
    pending: Option<InitialHeader>,
}

impl Session {
    /// Starts a conversation with the device behind `bundle` (PQXDH as initiator).
    pub fn initiate<R: CryptoRng + ?Sized>(
        identity: &IdentityKeyPair,
        bundle: &PrekeyBundle,
        rng: &mut R,
    ) -> Result<Self, HandshakeError> {
        let (shared_key, header) = initiate(identity, bundle, rng)?;
        let ratchet = Ratchet::initiator(&shared_key, bundle.signed_prekey.as_bytes(), rng)?;
        Ok(Self {
            ratchet,
            local: *identity.public(),
            remote: bundle.identity,
            initiator: true,
            base_key: header.base_key,
            pending: Some(header),
        })
    }

    pub(crate) fn accepted(ratchet: Ratchet, local: IdentityKey, header: &InitialHeader) -> Self {
        Self {
            ratchet,
            local,
            remote: header.initiator,
            initiator: false,
            base_key: header.base_key,
            pending: None,
        }
    }

    /// The remote device's identity.
    pub fn remote_identity(&self) -> &IdentityKey {
        &self.remote
    }

    /// The handshake this session came from (the initiator's base key).
    pub fn base_key(&self) -> &[u8; 32] {
        &self.base_key
    }

    /// Whether this side started the conversation.
    pub fn is_initiator(&self) -> bool {
        self.initiator
    }

    /// Whether the initiator still attaches the handshake (no answer received yet).
    pub fn awaiting_first_reply(&self) -> bool {
        self.pending.is_some()
    }

    /// The conversation's safety number.
    pub fn safety_number(&self) -> SafetyNumber {
        SafetyNumber::new(&self.local, &self.remote)
    }

    fn associated_data(&self) -> Vec<u8> {
        if self.initiator {
            associated_data(&self.local, &self.remote)
        } else {
            associated_data(&self.remote, &self.local)
        }
    }

    /// Pads and encrypts a message. Until the responder's first answer has been
    /// decrypted, the result is an initial message carrying the handshake.
    /// `rng` draws the message's salt (see `ratchet`).
    pub fn encrypt<R: CryptoRng + ?Sized>(
        &mut self,
        plaintext: &[u8],
        rng: &mut R,
    ) -> Result<Vec<u8>, MessageError> {
        let padded = Zeroizing::new(pad(plaintext)?);
        let message = self
            .ratchet
            .encrypt(&padded, &self.associated_data(), rng)?;
        Ok(match &self.pending {
            Some(header) => header.wrap(&message),
            None => message,
        })
    }

    /// Decrypts a message of this session. Refuses duplicates, forgeries and
    /// messages too far ahead; the session is unchanged when it refuses.
    pub fn decrypt<R: CryptoRng + ?Sized>(
        &mut self,
        message: &[u8],
        rng: &mut R,
    ) -> Result<Zeroizing<Vec<u8>>, MessageError> {
        let ratchet_message = match MessageKind::of(message)? {
            MessageKind::Ratchet => message,
            MessageKind::Initial => {
                // A repeated initial message of the handshake this (responder)
                // session came from: the ratchet message inside is ordinary.
                let (header, inner) = InitialHeader::unwrap(message)?;
                if self.initiator
                    || header.base_key != self.base_key
                    || header.initiator != self.remote
                {
                    return Err(MessageError::Authentication);
                }
                inner
            }
        };
        let padded = self
            .ratchet
            .decrypt(ratchet_message, &self.associated_data(), rng)?;
        let plaintext = Zeroizing::new(unpad(&padded)?.to_vec());
        self.pending = None;
        Ok(plaintext)
    }

    /// The session's state as versioned bytes, for the SDK to store (encrypted).
    pub fn to_snapshot(&self) -> Zeroizing<Vec<u8>> {
        // Room for a session with many skipped keys before it must grow (and
        // growing zeroes the old buffer anyway).
        let mut writer = Writer::with_capacity(SNAPSHOT_TAG, SNAPSHOT_VERSION, 4096);
        writer
            .fixed(&self.local.to_bytes())
            .fixed(&self.remote.to_bytes())
            .u8(u8::from(self.initiator))
            .fixed(&self.base_key);
        match &self.pending {
            Some(header) => {
                writer.u8(1);
                header.write(&mut writer);
            }
            None => {
                writer.u8(0);
            }
        }
        self.ratchet.write(&mut writer);
        Zeroizing::new(writer.finish())
    }

    /// Restores a session from [`Session::to_snapshot`].
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes, SNAPSHOT_TAG, SNAPSHOT_VERSION)?;
        let identity = |reader: &mut Reader<'_>| -> Result<IdentityKey, DecodeError> {
            IdentityKey::from_bytes(&reader.array::<IDENTITY_KEY_LEN>()?)
                .map_err(|_| DecodeError::Invalid("identity"))
        };
        let local = identity(&mut reader)?;
        let remote = identity(&mut reader)?;
        let initiator = match reader.u8()? {
            0 => false,
            1 => true,
            _ => return Err(DecodeError::Invalid("role")),
        };
        let base_key = reader.array::<32>()?;
        let pending = match reader.u8()? {
            0 => None,
            1 => Some(InitialHeader::read(&mut reader)?),
            _ => return Err(DecodeError::Invalid("pending handshake flag")),
        };
        let ratchet = Ratchet::read(&mut reader)?;
        reader.finish()?;
        Ok(Self {
            ratchet,
            local,
            remote,
            initiator,
            base_key,
            pending,
        })
    }
}
