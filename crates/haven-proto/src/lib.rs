//! Haven's wire contract: the code generated from `proto/haven/v1`, plus the few
//! rules both ends must compute byte for byte the same way.
//!
//! - [`v1`]: the generated messages, clients and servers of package `haven.v1`.
//! - [`auth`]: the canonical payloads that recipients and senders sign.
//! - [`pow`]: the hashcash-style proof-of-work stamps (intake sends, claims, `Create`).
//! - [`keys`]: the prekey-upload digest and the bundle-claim stamp input.
//! - [`directory`]: signing and verification of directory documents (supporter
//!   entries, device lists, revocations) and shareable supporter links.
//!
//! What this crate deliberately does not do: no networking, no storage, no
//! end-to-end cryptography (that is `haven-protocol`'s). The relay and the SDK
//! both depend on it, so a rule defined here cannot drift between them.
//!
//! ```
//! use haven_proto::pow;
//!
//! let sender_id = [7u8; 16];
//! let envelope_id = [9u8; 16];
//! let ciphertext = b"sealed bytes";
//! let made_at_ms = 1_767_225_600_000; // sent as `SendRequest.pow_timestamp_ms`
//! let stamp =
//!     pow::solve_intake(&sender_id, &envelope_id, ciphertext, made_at_ms, 8, u64::MAX).unwrap();
//! assert!(pow::intake_stamp_ok(&sender_id, &envelope_id, ciphertext, made_at_ms, stamp, 8));
//! ```

pub mod auth;
pub mod codec;
pub mod directory;
pub mod keys;
pub mod pow;

/// Generated code for package `haven.v1`.
#[allow(missing_docs)] // reason: generated; the comments live in the .proto files.
#[allow(clippy::all, clippy::pedantic)] // reason: generated code.
pub mod v1 {
    tonic::include_proto!("haven.v1");
}

/// The encoded `FileDescriptorSet` of `haven.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("haven_v1_descriptor");

/// Length in bytes of every mailbox id (recipient and sender ids).
pub const MAILBOX_ID_LEN: usize = 16;
/// Length in bytes of every envelope id.
pub const ENVELOPE_ID_LEN: usize = 16;
/// Length in bytes of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length in bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
