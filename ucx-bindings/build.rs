//! Finds UCX and tells rustc how to link it.
//!
//! Order: `UCX_HOME`, then `pkg-config ucx`, then the Python wheel `libucx-cu13` (found through
//! `python3 -c 'import libucx'`). The FFI declarations are committed (`src/sys/bindings.rs`), so
//! building needs neither libclang nor UCX headers: only `libucp.so` and `libucs.so`.
//!
//! Binaries, tests and examples of this crate get an rpath to the library folder, so they run
//! without `LD_LIBRARY_PATH`. Dependent crates read `DEP_UCP_LIB_DIR` (from `links = "ucp"`) and
//! add the same rpath in their own build scripts: a build script's `rustc-link-arg` only reaches
//! its own package.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL_HINT: &str = "UCX not found: run `python3 -m pip install libucx-cu13` (or set UCX_HOME \
     to a UCX >= 1.22 install prefix)";

fn main() {
    for var in ["UCX_HOME", "PKG_CONFIG_PATH", "PREFIXD_PYTHON"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    let Some((lib_dir, how)) = find_ucx() else {
        eprintln!("error: {INSTALL_HINT}");
        println!("cargo:warning={INSTALL_HINT}");
        std::process::exit(1);
    };

    // Found in a temporary folder (pip's isolated build environment, say), the answer goes stale
    // with that folder: look again whenever the library it names changes or disappears.
    println!("cargo:rerun-if-changed={}", lib_dir.join("libucp.so").display());
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=ucp");
    println!("cargo:rustc-link-lib=dylib=ucs");
    // rpath for this crate's own binaries and tests.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    // Exported to dependents as DEP_UCP_LIB_DIR / DEP_UCP_FOUND_BY.
    println!("cargo:lib_dir={}", lib_dir.display());
    println!("cargo:found_by={how}");
}

/// A folder counts as a UCX library folder when it holds `libucp.so` (the link-time name).
fn has_ucp(dir: &Path) -> bool {
    dir.join("libucp.so").exists()
}

fn find_ucx() -> Option<(PathBuf, &'static str)> {
    if let Some(home) = env::var_os("UCX_HOME") {
        let home = PathBuf::from(home);
        for lib in ["lib", "lib64"] {
            let dir = home.join(lib);
            if has_ucp(&dir) {
                return Some((dir, "UCX_HOME"));
            }
        }
        eprintln!(
            "error: UCX_HOME={} has no lib/libucp.so; unset it or point it at a UCX install prefix",
            home.display()
        );
        std::process::exit(1);
    }
    if let Some(dir) = from_pkg_config() {
        return Some((dir, "pkg-config"));
    }
    from_python_wheel().map(|dir| (dir, "python wheel libucx-cu13"))
}

/// `pkg-config --variable=libdir ucx`. The wheel ships a `.pc` whose prefix is its build folder,
/// so the answer is only taken when the folder really holds the library.
fn from_pkg_config() -> Option<PathBuf> {
    let out = Command::new("pkg-config").args(["--variable=libdir", "ucx"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    has_ucp(&dir).then_some(dir)
}

fn from_python_wheel() -> Option<PathBuf> {
    let python = env::var("PREFIXD_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let out = Command::new(python)
        .args(["-c", "import libucx, os; print(os.path.dirname(libucx.__file__))"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim()).join("lib");
    has_ucp(&dir).then_some(dir)
}
