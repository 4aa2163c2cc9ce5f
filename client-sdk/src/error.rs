//! The SDK's one error type: what went wrong, in words an app can show or log.
//! No message carries a key, id or message text.

use haven_proto::directory::DirectoryError;

/// What the relay said when it refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayRefusal {
    /// The request was malformed or outside the relay's limits.
    InvalidArgument,
    /// A signature or timestamp was refused (check the device clock).
    Unauthenticated,
    /// A proof of work or a document signature was refused.
    PermissionDenied,
    /// A quota or capacity is used up.
    ResourceExhausted,
    /// The mailbox, device or supporter does not exist.
    NotFound,
    /// The relay is not in a state to do this (e.g. a stale device list).
    FailedPrecondition,
    /// The relay is shutting down or overloaded; retry later.
    Unavailable,
    /// Anything else.
    Other,
}

/// Why an SDK call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The relay refused the request.
    #[error("the relay refused the request ({kind:?}): {message}")]
    Relay {
        /// The kind of refusal.
        kind: RelayRefusal,
        /// The relay's explanation.
        message: String,
    },
    /// The relay could not be reached.
    #[error("cannot reach the relay: {0}")]
    Unreachable(String),
    /// The relay address is not a valid URL.
    #[error("invalid relay address: {0}")]
    BadRelayAddress(String),
    /// Plaintext was asked for a relay that is not on this device.
    #[error("plaintext is only allowed to a relay on this device (loopback); use https")]
    InsecureRelay,
    /// A directory document was refused (distinct reasons inside).
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// The storage key does not open this data directory (or a value was tampered with).
    #[error("the storage key does not open this data directory")]
    WrongStorageKey,
    /// The data directory holds state older than this device last wrote: its
    /// files were restored from a copy or tampered with. Going on would rewind
    /// ratchets and bring back consumed prekeys, so the SDK refuses; restore
    /// the newest copy, or set the device up again.
    #[error(
        "this data directory holds older state than this device last wrote (restored from a copy or tampered with); it is not used"
    )]
    RolledBack,
    /// On-device storage failed.
    #[error("on-device storage failed: {0}")]
    Storage(String),
    /// This device has no supporter identity yet.
    #[error("no supporter identity on this device; create one first")]
    NoSupporterIdentity,
    /// A device in a supporter's device list does not verify.
    #[error("a device identity in the directory does not verify")]
    BadDeviceIdentity,
    /// The supporter is not taking new conversations now; choose another or try later.
    #[error("this supporter is not taking new conversations right now")]
    NotTakingConversations,
    /// The relay handed out a bundle for a device that is not in the supporter's
    /// signed device list (or an incomplete one).
    #[error("the relay returned a prekey bundle for a device the supporter did not list")]
    BundleMismatch,
    /// A prekey bundle does not verify (a swapped or forged key).
    #[error("a prekey bundle does not verify: {0}")]
    Bundle(haven_protocol::VerifyError),
    /// No conversation with this id on this device.
    #[error("no such conversation on this device")]
    UnknownConversation,
    /// Something only the help-seeker of a conversation may do (keeping a transcript).
    #[error("only the help-seeker of a conversation may do this")]
    OnlyHelpSeeker,
    /// An argument is not acceptable (the message says which and why).
    #[error("{0}")]
    InvalidArgument(String),
    /// The message (or other change) is saved on this device and was not yet
    /// accepted by the relay (unreachable or busy): it is posted again, the same
    /// bytes, by the next `send` or `sync_once` of this client. Show it as
    /// pending, not as failed.
    #[error(
        "saved on this device, not yet delivered to the relay; it is sent with the next sync: {0}"
    )]
    Queued(String),
    /// A protocol step failed (decryption, handshake, sealing).
    #[error("protocol: {0}")]
    Protocol(String),
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let kind = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => RelayRefusal::InvalidArgument,
            Code::Unauthenticated => RelayRefusal::Unauthenticated,
            Code::PermissionDenied => RelayRefusal::PermissionDenied,
            Code::ResourceExhausted => RelayRefusal::ResourceExhausted,
            Code::NotFound => RelayRefusal::NotFound,
            Code::FailedPrecondition => RelayRefusal::FailedPrecondition,
            Code::Unavailable => {
                // tonic reports connection failures as UNAVAILABLE without a relay message.
                if status.message().contains("transport") || status.message().contains("connect") {
                    return Error::Unreachable(status.message().to_owned());
                }
                RelayRefusal::Unavailable
            }
            _ => RelayRefusal::Other,
        };
        Error::Relay {
            kind,
            message: status.message().to_owned(),
        }
    }
}

impl Error {
    /// For a relay call made with what another party sent (a key, a mailbox id,
    /// a supporter key inside a message): a refusal that says the request itself
    /// was wrong is that envelope's fault, so it condemns the envelope instead of
    /// stopping the sync. Anything else (unreachable, unavailable) stays as it is
    /// and the envelope is tried again.
    pub(crate) fn caused_by_peer(self) -> Error {
        match self {
            // Fixed words: the relay's own text never reaches the app this way.
            Error::Relay {
                kind:
                    kind @ (RelayRefusal::InvalidArgument
                    | RelayRefusal::NotFound
                    | RelayRefusal::FailedPrecondition
                    | RelayRefusal::PermissionDenied),
                ..
            } => Error::Protocol(format!(
                "the relay refused what the other side sent ({kind:?})"
            )),
            other => other,
        }
    }

    /// Whether the error is about an envelope's content (undecryptable, forged,
    /// malformed, a duplicate): such an envelope is dropped. Any other error
    /// (relay unreachable, storage) stops processing without acknowledging, so
    /// the envelope comes again on the next sync.
    pub(crate) fn condemns_envelope(&self) -> bool {
        matches!(
            self,
            Error::Protocol(_)
                | Error::Directory(_)
                | Error::BadDeviceIdentity
                | Error::Bundle(_)
                | Error::BundleMismatch
        )
    }
}
