//! Domain and cryptography of Private Smart Metering, without networking: replicated secret
//! sharing of LWE keys, partial decryption with deterministic noise flooding, and combining.

pub mod audit;
pub mod ceremony;
pub mod keys;
pub mod linear;
pub mod lwe;
pub mod readings;
pub mod registers;
pub mod registry;
pub mod signing;
pub mod squashed;
pub mod tfhe_program;
pub mod threshold;
pub mod wire;
