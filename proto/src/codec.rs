//! [`RawEncodeCodec`]: a tonic codec that sends already-serialized protobuf;
//! [`LeanCodec`]: the prost codec of the generated services, with small
//! initial buffers.

use std::marker::PhantomData;

use bytes::{BufMut, Bytes};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a stream's encode and decode buffers ([`LeanCodec`]).
pub const LEAN_BUFFER: usize = 1024;

/// The codec of the generated `Transfer` and `FileExt` stubs: tonic's
/// prost codec whose per-stream encode and decode buffers start at
/// [`LEAN_BUFFER`] (1 KiB) instead of tonic's 8 KiB each. A center holds
/// one `Transfer` stream per agent, mostly idle (a heartbeat a minute, a
/// few commands), so the two 8 KiB buffers were 16 KiB of every agent
/// connection; the buffers still grow to the largest message a stream
/// carries (and keep that size), so a busy stream pays a few reallocations
/// once.
#[derive(Debug)]
pub struct LeanCodec<T, U> {
    _pd: PhantomData<fn(T) -> U>,
}

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Clone for LeanCodec<T, U> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// tonic's default yield threshold (an encoded batch is sent at 32 KiB).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn lean_settings() -> BufferSettings {
    BufferSettings::new(LEAN_BUFFER, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> ProstEncoder<T> {
        ProstCodec::<T, U>::raw_encoder(lean_settings())
    }

    fn decoder(&mut self) -> ProstDecoder<U> {
        ProstCodec::<T, U>::raw_decoder(lean_settings())
    }
}

/// A tonic [`Codec`] whose requests are already-encoded protobuf messages
/// (`bytes::Bytes`, written as-is) and whose responses decode into the prost
/// message `M`.
///
/// The agent encodes `PackagedData` straight from its ring buffer with
/// `elkeid_core::packet` and sends those bytes without building prost
/// structs:
///
/// ```no_run
/// use bytes::Bytes;
/// use elkeid_proto::codec::RawEncodeCodec;
/// use elkeid_proto::grpc::Command;
/// use elkeid_proto::snappy::SnappyClient;
/// use tonic::codegen::http::uri::PathAndQuery;
///
/// async fn transfer<T>(transport: T, packets: tokio_stream::Iter<std::vec::IntoIter<Bytes>>)
///     -> Result<(), tonic::Status>
/// where
///     T: tonic::client::GrpcService<tonic::body::Body>,
///     T::Error: Into<tonic::codegen::StdError>,
///     T::ResponseBody: tonic::codegen::Body<Data = Bytes> + Send + 'static,
///     <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
/// {
///     let mut grpc = tonic::client::Grpc::new(transport);
///     grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.into().to_string()))?;
///     let path = PathAndQuery::from_static("/grpc.Transfer/Transfer");
///     let codec = RawEncodeCodec::<Command>::new();
///     let mut commands = grpc
///         .streaming(tonic::Request::new(packets), path, codec)
///         .await?
///         .into_inner();
///     while let Some(cmd) = commands.message().await? {
///         let _ = cmd.task;
///     }
///     Ok(())
/// }
/// # let _ = transfer::<SnappyClient<tonic::transport::Channel>>;
/// ```
#[derive(Debug)]
pub struct RawEncodeCodec<M> {
    _decode: PhantomData<fn() -> M>,
}

impl<M> RawEncodeCodec<M> {
    /// A new codec.
    pub const fn new() -> Self {
        Self {
            _decode: PhantomData,
        }
    }
}

impl<M> Default for RawEncodeCodec<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> Clone for RawEncodeCodec<M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M> Copy for RawEncodeCodec<M> {}

impl<M> Codec for RawEncodeCodec<M>
where
    M: prost::Message + Default + Send + 'static,
{
    type Encode = Bytes;
    type Decode = M;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<M>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder { _priv: () }
    }

    fn decoder(&mut self) -> ProstDecoder<M> {
        ProstDecoder::new(BufferSettings::default())
    }
}

/// Encoder of [`RawEncodeCodec`]: copies the message bytes into the frame.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder {
    _priv: (),
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.len());
        dst.put(item);
        Ok(())
    }
}
