//! The relay's one error type: what a client did wrong, or that the relay failed.

use haven_store::StoreError;

/// Why a request was refused. Every message says what was wrong and never
/// contains an id, key, address or envelope content. The gRPC edge maps each
/// variant to exactly one status code (`grpc::status`).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The request is malformed or outside the relay's limits.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request's authentication is missing, stale, replayed or wrong.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this (a missing or weak proof-of-work stamp).
    #[error("{0}")]
    PermissionDenied(String),
    /// A quota or a capacity limit is reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The mailbox does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The mailbox is not in a state that allows this.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The relay is shutting down or temporarily unable to serve; retry.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a storage failure; the details are logged, the client sees none.
    #[error("internal error")]
    Internal(String),
}

impl RelayError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }
}

impl From<StoreError> for RelayError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::MailboxNotFound => Self::NotFound("mailbox not found".into()),
            StoreError::IdInUse => Self::Internal("random mailbox id collided".into()),
            StoreError::AlreadySecured => {
                Self::FailedPrecondition("mailbox is already secured to another sender key".into())
            }
            StoreError::SenderKeyChanged => Self::Unauthenticated(
                "this mailbox was secured meanwhile: sends must be signed by its sender key".into(),
            ),
            // Only the quota, which GetInfo publishes anyway: a sender (anyone,
            // for an intake) told how much a mailbox holds could watch its
            // owner's acks and so their activity (review F15).
            StoreError::CountQuota { limit, .. } => Self::ResourceExhausted(format!(
                "mailbox is full: it holds at most {limit} envelopes until its owner takes some"
            )),
            StoreError::ByteQuota { limit, .. } => Self::ResourceExhausted(format!(
                "mailbox is full: it holds at most {limit} bytes until its owner takes some"
            )),
            StoreError::AlreadyExpired => Self::invalid("envelope would already be expired"),
            StoreError::Closed => Self::Unavailable("relay is shutting down; retry".into()),
            StoreError::Unavailable(_) => Self::Unavailable(format!("{error}; retry")),
            StoreError::CapacityExhausted => {
                Self::ResourceExhausted("not taking new conversations".into())
            }
            StoreError::NoPrekeys => Self::FailedPrecondition(error.to_string()),
            StoreError::TooManyPrekeys { .. } => Self::ResourceExhausted(error.to_string()),
            StoreError::StaleDocument { .. } | StoreError::ConflictingDocument { .. } => {
                Self::FailedPrecondition(error.to_string())
            }
            other => Self::Internal(other.to_string()),
        }
    }
}
