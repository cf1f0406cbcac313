//! Generated gRPC code for the `psm.v1` API. The `.proto` files in `proto/psm/v1/` are the
//! contract; this crate only compiles them.

#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod v1 {
    tonic::include_proto!("psm.v1");
}

/// Encoded `FileDescriptorSet` of the API, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/psm_descriptor.bin"));

/// Fully qualified gRPC service names, as used by health checks and reflection.
pub mod service_names {
    /// `psm.v1.Ingest`
    pub const INGEST: &str = "psm.v1.Ingest";
    /// `psm.v1.Compute`
    pub const COMPUTE: &str = "psm.v1.Compute";
    /// `psm.v1.Keyshare`
    pub const KEYSHARE: &str = "psm.v1.Keyshare";
}
