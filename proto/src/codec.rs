//! The gRPC codec of both services: prost, with small initial buffers.
//!
//! tonic's default gives every stream an 8 KiB decode buffer and an 8 KiB encode buffer up
//! front; with 10,000 mostly idle peers that is most of the memory a peer costs. Signaling
//! messages are a few hundred bytes (an SDP offer a few KiB), so buffers start small and grow on
//! demand. The yield threshold (how much is encoded before the writer yields) stays tonic's.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial bytes of a stream's decode and encode buffers.
pub const INITIAL_BUFFER: usize = 512;
/// Bytes encoded before the response writer yields (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// Prost encoding with [`INITIAL_BUFFER`]-sized buffers; used by the generated code.
#[derive(Debug, Clone)]
pub struct SmallBuffers<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        SmallBuffers(PhantomData)
    }
}

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD))
    }
}
