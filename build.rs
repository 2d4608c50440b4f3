//! Generates the gRPC code and the descriptor set served by reflection.
//! `protoc` comes from the `protoc-bin-vendored` crate: no system protoc needed.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // Edition 2024 marks set_var unsafe; a build script is single-threaded and
        // prost-build reads PROTOC from the environment.
        #[allow(clippy::disallowed_methods)]
        unsafe {
            env::set_var("PROTOC", protoc)
        };
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // Separate descriptor sets: reflection on the gateway must not list the demo
    // service, which only the protected-server example serves.
    // `ValidateResponse.claims` is shared between the answers for one verified
    // token (`crate::proto::SharedClaims`); the `Claims` message it holds comes
    // from a second run over the same file, without services, in `claims/`.
    // The gateway's own server side is not an adopter's API (their clients are):
    // compiled with the gateway feature only.
    tonic_prost_build::configure()
        .server_mod_attribute(".", r#"#[cfg(feature = "gateway")]"#)
        .extern_path(".m2m.gateway.v1.Claims", "crate::proto::SharedClaims")
        .file_descriptor_set_path(out_dir.join("gateway_descriptor.bin"))
        .compile_protos(
            &[
                "proto/m2m/gateway/v1/gateway.proto",
                "proto/m2m/gateway/admin/v1/admin.proto",
            ],
            &["proto"],
        )?;
    let claims_dir = out_dir.join("claims");
    std::fs::create_dir_all(&claims_dir)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .out_dir(&claims_dir)
        .compile_protos(&["proto/m2m/gateway/v1/gateway.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("demo_descriptor.bin"))
        .compile_protos(&["proto/m2m/demo/v1/echo.proto"], &["proto"])?;
    // AuthPolicy::from_descriptors reads descriptor sets through this view.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(
            &["proto/m2m/auth/internal/descriptor_view.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    // For dependents' build scripts (DEP_M2M_GATEWAY_PROTO): where
    // m2m/auth/v1/options.proto is, to import it without a copy.
    let protos = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo::metadata=proto={}", protos.display());
    Ok(())
}
