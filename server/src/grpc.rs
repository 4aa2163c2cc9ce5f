//! The tonic edge: services, the connection stream, and the one mapping of
//! errors to statuses. Generated types are used here and nowhere else in the relay.

pub mod convert;
pub mod incoming;
pub mod info;
pub mod mailbox;
pub mod status;
