//! Haven's end-to-end protocol core, **sans-IO**: keys and prekey bundles, the
//! PQXDH handshake, the Double Ratchet, sealed sender, padding and safety
//! numbers. It is told what happened and answers with bytes to send; it does no
//! networking, no storage, reads no clock and no OS randomness: time (`now`, in
//! seconds) and an `&mut impl CryptoRng` are arguments. State leaves as
//! versioned snapshots that the SDK stores, encrypted.
//!
//! What it deliberately does not do: talk to the relay, choose mailboxes, store
//! anything, or decide retention; that is the SDK's.
//!
//! Security notes: every secret type zeroizes on drop (dalek's keys, `Zeroizing`
//! buffers) and has no `Debug`; public identities have a redacting `Debug`.
//! Expected failures (a forged message, a duplicate, a message too far ahead, a
//! bundle with a swapped key) are typed errors, never panics. What the relay can
//! observe of a sealed envelope: its length (padded to a power of two from
//! 256 bytes), the mailbox it is posted to, and when.
//!
//! A whole exchange between a help-seeker and a supporter's device:
//!
//! ```
//! use haven_protocol::{Device, IdentityKeyPair, MessageKind, PrekeyBundle, Session, seal, open};
//! use rand_core::SeedableRng;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7); // the SDK passes an OS-backed CSPRNG
//! let now = 1_800_000_000;
//!
//! // The supporter's device publishes a bundle (the relay serves it).
//! let mut supporter = Device::generate(now, &mut rng);
//! supporter.generate_one_time_prekeys(10, &mut rng);
//! let one_time = supporter.one_time_prekey_ids()[0];
//! let kem_one_time = supporter.kem_one_time_prekey_ids()[0];
//! let published = supporter.bundle(Some(one_time), Some(kem_one_time)).ok_or("no bundle")?.to_bytes();
//!
//! // The help-seeker verifies the bundle and writes under a throwaway identity.
//! let help_seeker = IdentityKeyPair::generate(&mut rng);
//! let bundle = PrekeyBundle::from_bytes(&published)?;
//! let mut outbound = Session::initiate(&help_seeker, &bundle, &mut rng)?;
//! let first = outbound.encrypt(b"I'm a GP and I can't sleep. Can we talk?", &mut rng)?;
//! let envelope = seal(&help_seeker, bundle.identity(), &first, &mut rng)?;
//!
//! // The supporter's device opens it: who sent it, and the handshake inside.
//! let (sender, content) = open(supporter.identity(), &envelope)?;
//! assert_eq!(MessageKind::of(&content)?, MessageKind::Initial);
//! let (mut inbound, text) = supporter.accept(&content, &mut rng)?;
//! assert_eq!(&text[..], b"I'm a GP and I can't sleep. Can we talk?");
//!
//! // The answer goes back the same way.
//! let reply = inbound.encrypt(b"Of course. I'm here.", &mut rng)?;
//! let envelope = seal(supporter.identity(), &sender, &reply, &mut rng)?;
//! let (_, content) = open(&help_seeker, &envelope)?;
//! assert_eq!(&outbound.decrypt(&content, &mut rng)?[..], b"Of course. I'm here.");
//!
//! // Both see the same safety number.
//! assert_eq!(outbound.safety_number(), inbound.safety_number());
//! # Ok(())
//! # }
//! ```
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod codec;
mod device;
mod error;
mod identity;
mod kdf;
mod padding;
mod pqxdh;
mod prekey;
mod ratchet;
mod safety;
mod sealed;
mod session;

pub use device::{
    Device, MAX_ONE_TIME_PREKEYS, REMEMBERED_HANDSHAKES, SIGNED_PREKEY_ROTATION_SECONDS,
};
pub use error::{DecodeError, HandshakeError, MessageError, SealError, VerifyError};
pub use identity::{IDENTITY_KEY_LEN, IdentityKey, IdentityKeyPair};
pub use padding::{MAX_BUCKET, MAX_PLAINTEXT, MIN_BUCKET, bucket_for, pad, unpad};
pub use prekey::{
    KEM_CIPHERTEXT_LEN, KEM_PUBLIC_LEN, PrekeyBundle, PublicPrekey, PublishedPrekeys,
};
pub use ratchet::{MAX_SKIP, MAX_SKIPPED_KEYS};
pub use safety::SafetyNumber;
pub use sealed::{open, seal};
pub use session::{InitialInfo, MessageKind, Session};
