//! [`RawEncodeCodec`]: a tonic codec that sends already-serialized protobuf.

use std::marker::PhantomData;

use bytes::{BufMut, Bytes};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

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
