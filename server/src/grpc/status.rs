//! The one mapping from the relay's errors to gRPC statuses.

use tonic::{Code, Status};

use crate::relay::RelayError;

impl From<RelayError> for Status {
    fn from(error: RelayError) -> Self {
        match error {
            RelayError::InvalidArgument(message) => Status::invalid_argument(message),
            RelayError::Unauthenticated(message) => Status::unauthenticated(message),
            RelayError::PermissionDenied(message) => Status::permission_denied(message),
            RelayError::ResourceExhausted(message) => Status::resource_exhausted(message),
            RelayError::NotFound(message) => Status::not_found(message),
            RelayError::FailedPrecondition(message) => Status::failed_precondition(message),
            RelayError::Unavailable(message) => Status::unavailable(message),
            RelayError::Internal(details) => {
                // Internal details never carry ids (store errors are written that
                // way), and they stay in the log: the client learns nothing.
                tracing::error!(%details, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// The status code's name as go-grpc-prometheus writes it in `grpc_code`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}
