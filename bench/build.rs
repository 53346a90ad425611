//! Gives the `prefixd` binary an rpath to the UCX that ucx-bindings linked, so it runs without
//! LD_LIBRARY_PATH (build scripts' link arguments do not reach dependents on their own).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_UCP_LIB_DIR");
    if let Ok(dir) = std::env::var("DEP_UCP_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
