//! The protobuf codec every generated client and server uses: prost's, with
//! smaller buffers.
//!
//! tonic gives every call an 8 KiB decode buffer and an 8 KiB encode buffer up
//! front, and a `Receive` stream holds both for as long as it is open: most of
//! what an idle stream costs the relay (measured with `haven-bench idle`). Haven's
//! messages are small (an ack is a few ids, an envelope about 1 KiB padded), and
//! the buffers still grow to whatever a message needs, so 1 KiB is where they
//! start. Streams batch outgoing messages up to 16 KiB before a write (tonic's
//! default is 32 KiB; one envelope window of 64 padded chat messages is 16 KiB).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Where encode and decode buffers start.
const BUFFER_START: usize = 1024;
/// How much a stream batches before a write.
const YIELD_THRESHOLD: usize = 16 * 1024;

/// prost encoding with these buffer settings; named by `build.rs` as the codec of every
/// generated service.
#[derive(Debug, Clone, Copy)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_START, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_START, YIELD_THRESHOLD))
    }
}
