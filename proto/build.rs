//! Generates the prost types and tonic stubs with the pure-Rust `protox`
//! compiler, so no `protoc` is needed on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/grpc.proto", "proto/mq.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Payload bytes stay `Bytes`: the center never copies record bodies.
        .bytes(".grpc.EncodedRecord.data")
        .bytes(".grpc.FileUploadRequest.data")
        .bytes(".grpc.MQData.body")
        // 1 KiB initial stream buffers instead of 8 KiB (see codec::LeanCodec)
        .codec_path("crate::codec::LeanCodec")
        .build_transport(false)
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
